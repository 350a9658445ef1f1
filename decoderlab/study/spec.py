"""What a study's workers need to make their own copy of the model, and the study's prompts.

Why: a worker is another process, perhaps on another machine; it cannot be handed the model object, only how to
load it (`dl.load`'s or `dl.connect`'s arguments), which `LM.source` and `APIBackend.source` remember.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import StudyError


@dataclass(frozen=True)
class ModelSpec:
    """How to make the model: `dl.load(**args)` ("local") or `dl.connect(**args)` ("api")."""

    kind: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def make(self, device: str | None = None) -> Any:
        """The model (`device`: where a local model goes when its arguments do not say)."""
        if self.kind == "api":
            from ..backends import connect

            return connect(**self.args)
        from ..backends import load

        args = dict(self.args)
        if device is not None and args.get("device") is None and args.get("device_map") is None:
            args["device"] = device
        return load(**args)

    @property
    def name(self) -> str:
        """The model's name in the study's frames."""
        if self.kind == "api":
            return str(self.args.get("model"))
        from ..engine import DEFAULT_NAME

        return str(self.args.get("path_or_id") or DEFAULT_NAME)

    def describe(self) -> dict:
        """What the study's folder records of the model (no API key)."""
        shown = {k: (str(v) if v is not None and not isinstance(v, (int, float, bool, str)) else v)
                 for k, v in self.args.items() if k != "api_key"}
        return {"kind": self.kind, "args": shown}


def model_spec(model: Any) -> ModelSpec:
    """A `ModelSpec` from what `dl.study` was given: None or "default" (the bundled model), a local path or hub
    name, a model made by `dl.load` or `dl.connect`, a mapping of `dl.load`'s arguments, or of `dl.connect`'s
    (with `base_url`)."""
    if isinstance(model, ModelSpec):
        return model
    if model is None or model == "default":
        return ModelSpec("local", {"path_or_id": None})
    if isinstance(model, (str, os.PathLike)):
        return ModelSpec("local", {"path_or_id": str(model)})
    if isinstance(model, Mapping):
        args = dict(model)
        return ModelSpec("api" if "base_url" in args else "local", args)
    source = getattr(model, "source", None)
    if isinstance(source, Mapping):
        return ModelSpec("api" if "base_url" in source else "local", dict(source))
    raise StudyError(f"dl.study: a {type(model).__name__} cannot be loaded again by the study's workers; give the "
                     "model as dl.load(...) or dl.connect(...) made it, or as its path or hub name "
                     "(dl.study('path/to/model', ...)), or None for the bundled model")


def read_prompts(prompts: Any, column: str = "prompt") -> list[str]:
    """The study's prompts from a list of strings, a pandas Series, a DataFrame's `column`, or a Parquet file's."""
    import pandas as pd

    if isinstance(prompts, (str, os.PathLike)) and str(prompts).endswith(".parquet"):
        prompts = pd.read_parquet(Path(prompts), columns=[column])
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, pd.DataFrame):
        if column not in prompts:
            raise StudyError(f"dl.study: the prompts' frame has no column {column!r} "
                             f"(columns: {list(prompts.columns)})")
        prompts = prompts[column]
    out = list(prompts) if isinstance(prompts, (Sequence, pd.Series)) else None
    if not out:
        raise StudyError("dl.study needs at least one prompt: a list of strings, a pandas Series or DataFrame "
                         f"(column {column!r}), or a .parquet file")
    bad = [i for i, p in enumerate(out) if not isinstance(p, str)]
    if bad:
        raise StudyError(f"dl.study: prompts must be strings; prompt {bad[0]} is a {type(out[bad[0]]).__name__}")
    return out
