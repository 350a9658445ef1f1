"""Old addresses: the modules of decoderlab's flat layout (0.1), found at their new places in the rooms.

`from decoderlab.whatif import run_words` and the like keep working, with a DeprecationWarning that names the
new address; new code imports from the rooms (or from `decoderlab` itself).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "loop": "engine.loop", "strategy": "engine.strategy", "fast": "engine.fast", "attention": "engine.attention",
    "lens": "engine.lens", "models": "engine.models", "tokens": "engine.tokens", "beams": "engine.rules.beams",
    "group_beams": "engine.rules.group_beams", "contrastive": "engine.rules.contrastive", "dola": "engine.rules.dola",
    "schema": "record.schema", "builder": "trace.builder",
    "lm": "backends.local", "session": "backends.session", "api": "backends.api",
    "api_client": "backends.api_client", "api_replies": "backends.api_replies", "api_session": "backends.api_session",
    "custom_decoder": "backends.custom_decoder", "compare": "analysis.compare", "whatif": "analysis.whatif",
    "metrics": "analysis.metrics", "display": "views.display", "panels": "views.panels", "html": "views.html",
    "plots": "views.plots", "compare_view": "views.compare_view", "widgets": "views.trace_view",
    "playground_view": "views.playground",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:
        pass


class MovedFinder(importlib.abc.MetaPathFinder):
    """Finds `decoderlab.<old>` as the module now at `decoderlab.<new>`."""

    def find_spec(self, fullname: str, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix != "decoderlab" or old not in MOVED:
            return None
        new = f"decoderlab.{MOVED[old]}"
        warnings.warn(f"{fullname} moved to {new}; import it from there (or from decoderlab)", DeprecationWarning,
                      stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
