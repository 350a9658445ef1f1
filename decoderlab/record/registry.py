"""The recorder registry: per-step scores as small named functions (as inseq's step functions), each taking the
loop's `StepContext` and the run's `Record` and returning named tensors [B, ...] for that step.

`@decoderlab.recorder("name")` adds yours; `Record(extra=["name"])` runs it.
"""
from __future__ import annotations

from typing import Any, Callable

from ..engine.loop import StepContext
from ..errors import RecorderError

# A recorder takes the step's context and the run's Record, and returns named tensors [B, ...].
StepRecorder = Callable[[StepContext, Any], dict]
STEP_RECORDERS: dict[str, StepRecorder] = {}
BUILT_IN = ("choice", "candidates", "processors", "logits")


def recorder(name: str, *, replace: bool = False):
    """Register a per-step recorder under `name`.

    A taken name (a built-in such as "choice", whose arrays `trace.steps` reads, or another of yours)
    is refused unless `replace=True`, so a recorder cannot silently break the frames.
    """
    if not isinstance(name, str) or not name:
        raise RecorderError(f"recorder({name!r}): the name must be a non-empty string")
    if name in STEP_RECORDERS and not replace:
        raise RecorderError(f"a recorder named {name!r} is already registered "
                            f"({'built in' if name in BUILT_IN else 'by you'}): choose another name, "
                            "or pass replace=True to replace it")

    def register(fn: StepRecorder) -> StepRecorder:
        if not callable(fn):
            raise RecorderError(f"recorder({name!r}) decorates a function (ctx, record) -> dict of tensors")
        STEP_RECORDERS[name] = fn
        return fn

    return register
