"""decoderlab: see how a language model decodes, step by step.

    import decoderlab as dl
    lm = dl.load()                                   # bundled SmolLM2-135M-Instruct, offline
    trace = lm.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    trace.steps, trace.candidates, trace.processors  # tidy pandas frames

The house, one room per concern (each room's `__init__` says what it is for and what it exports):
engine/ (the step loop, strategy words and rules, models), record/ (what a run records), trace/ (the Trace,
its builder and files), backends/ (a local model, a server, the blog post's decoder, sessions), analysis/ (compare,
what-if, metrics), views/ (plots, HTML, widgets), study/ (many prompts on Ray, as Parquet). This module is the front door: it wires the rooms together
and is the only place above all of them.
"""
import os

from .analysis.compare import Comparison, compare
from .analysis.forks import Engine, Forks, ForksError, forks
from .backends.api import APIBackend, connect
from .backends.custom_decoder import CustomDecoder
from .backends.local import DEFAULT_SYSTEM, LM, load
from .backends.session import Session
from .engine.rules.sampling import greedy, sample
from .errors import (APIError, AttentionDroppedError, DecoderlabError, LensError, MissingExtraError,
                     ModelNotFoundError, NumericError, PromptError, RecordBudgetWarning, RecordError, SessionError,
                     StrategyError, StudyError, TraceFileError)
from .record import STEP_RECORDERS, Record, recorder
from .study import Study, open_study, study
from .trace import SampleTree, Trace

from .moved import install as _install_old_addresses
from .trace.trace import PRESENTERS as _TRACE_PRESENTERS

__version__ = "0.2.0"


def _trace_html(trace, **options) -> str:
    from .views.html import trace_html

    return trace_html(trace, **options)


def _coloured_text(trace) -> str:
    from .views.html import coloured_text

    return coloured_text(trace)


def _what_if(trace, step, strategies, **kwargs):
    from .analysis.whatif import what_if

    return what_if(trace, step, strategies, **kwargs)


# The trace room's methods that show or analyse a trace are served by the rooms above it, plugged in here.
def _knobs(trace, step, token, **kwargs):
    from .analysis.knobs import knobs

    return knobs(trace, step, token, **kwargs)


def _sample_tree_html(tree) -> str:
    from .views.tree_view import tree_html

    return tree_html(tree)


def _show_sample_tree(tree, **kwargs):
    from .views.tree_view import show_tree

    return show_tree(tree, **kwargs)


def _forks_html(forks, **options) -> str:
    from .views.forks_view import forks_html

    return forks_html(forks, **options)


def _show_forks(forks, **kwargs):
    from .views.forks_view import show_forks

    return show_forks(forks, **kwargs)


_TRACE_PRESENTERS.update(html=_trace_html, coloured_text=_coloured_text, what_if=_what_if, knobs=_knobs,
                         sample_tree_html=_sample_tree_html, sample_tree_show=_show_sample_tree,
                         forks_html=_forks_html, forks_show=_show_forks)

_install_old_addresses()  # `from decoderlab.whatif import ...` (the 0.1 layout) still works, with a warning

# Modules users reach as `dl.plots` / `from decoderlab import plots`: loaded on first use (matplotlib is heavy).
_LAZY_MODULES = {"plots": ".views.plots", "metrics": ".analysis.metrics"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        module = importlib.import_module(_LAZY_MODULES[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'decoderlab' has no attribute {name!r}")


def show(trace, **kwargs):
    """The trace explorer widget (Jupyter); for a `Comparison` (`dl.compare`), its runs side by side; for a
    `SampleTree` (`lm.sample_tree`), the tree; for `Forks` (`dl.forks`), where two engines part."""
    if isinstance(trace, SampleTree):
        return trace.show(**kwargs)
    if isinstance(trace, Forks):
        return _show_forks(trace, **kwargs)
    if isinstance(trace, Comparison):
        from .views.compare_view import show_comparison

        return show_comparison(trace, **kwargs)
    from .views.trace_view import show as _show

    return _show(trace, **kwargs)


def explore(session, **kwargs):
    """The step-through widget for a session (`lm.session(...)` or `api.session(...)`, Jupyter)."""
    from .views.session_explorer import explore as _explore

    return _explore(session, **kwargs)


def playground(trace, *, step: int = 0, row: int = 0, lm=None, k: int = 20):
    """The sampler playground (Jupyter): one step of `trace` reshaped live by temperature, top-k, top-p, min-p
    and typical-p sliders (needs `Record(logits=True)` or `lm=`); see `decoderlab.views.playground`."""
    from .views.playground import playground as _playground

    return _playground(trace, step=step, row=row, lm=lm, k=k)


def tuned_lens(lm: LM, folder: str | os.PathLike):
    """A tuned lens for `lm`'s model, read from a folder in the format the `tuned-lens` package saves (config.json,
    params.pt; `tools/train_tuned_lens.py` makes one): `trace.with_lens(dl.tuned_lens(lm, folder))` is the run
    read through it. See `decoderlab.engine.lens.TunedLens`."""
    from .engine.tuned_lens import TunedLens

    lens = TunedLens(lm.model, folder)
    lens.token_text = lm.token_text
    return lens


def show_lenses(*traces: Trace, step: int | None = None, row: int = 0):
    """The same run through several lenses side by side (Jupyter): per lens its commit strip and, at the step the
    slider picks, what each layer would say. `dl.show_lenses(trace, trace.with_lens(dl.tuned_lens(lm, folder)))`;
    see `decoderlab.views.lens_pair`."""
    from .views.lens_pair import LensPair

    return LensPair(traces, step=step, row=row)


__all__ = ["load", "LM", "compare", "Comparison", "Record", "Trace", "Session", "CustomDecoder", "show", "explore",
           "playground", "recorder", "STEP_RECORDERS", "greedy", "sample", "PromptError", "StrategyError",
           "SessionError", "ModelNotFoundError", "DEFAULT_SYSTEM", "DecoderlabError", "NumericError", "RecordError",
           "TraceFileError", "AttentionDroppedError", "RecordBudgetWarning", "connect", "APIBackend", "APIError",
           "MissingExtraError", "study", "open_study", "Study", "StudyError", "LensError", "tuned_lens", "show_lenses", "SampleTree", "forks", "Forks", "Engine", "ForksError",
           "__version__"]
