"""decoderlab: see how a language model decodes, step by step.

    import decoderlab as dl
    lm = dl.load()                                   # bundled SmolLM2-135M-Instruct, offline
    trace = lm.generate("What is the capital of France?", chat=True, max_new_tokens=32)
    trace.steps, trace.candidates, trace.processors  # tidy pandas frames
"""
from .api import APIBackend, connect
from .compare import Comparison, compare
from .custom_decoder import CustomDecoder
from .errors import (APIError, AttentionDroppedError, DecoderlabError, NumericError, RecordBudgetWarning, RecordError,
                     TraceFileError)
from .lm import DEFAULT_SYSTEM, LM, PromptError, load
from .models import ModelNotFoundError
from .record import STEP_RECORDERS, Record, recorder
from .session import Session, SessionError
from .strategy import StrategyError, greedy, sample
from .trace import Trace

__version__ = "0.1.0"


def show(trace, **kwargs):
    """The trace explorer widget (Jupyter); for a `Comparison` (`dl.compare`), its runs side by side."""
    if isinstance(trace, Comparison):
        from .compare_view import show_comparison

        return show_comparison(trace, **kwargs)
    from .widgets import show as _show

    return _show(trace, **kwargs)


def explore(session, **kwargs):
    """The step-through widget for a `Session` (Jupyter)."""
    from .widgets import explore as _explore

    return _explore(session, **kwargs)


def playground(trace, *, step: int = 0, row: int = 0, lm=None, k: int = 20):
    """The sampler playground (Jupyter): one step of `trace` reshaped live by temperature, top-k, top-p, min-p
    and typical-p sliders (needs `Record(logits=True)` or `lm=`); see `decoderlab.playground_view`."""
    from .playground_view import playground as _playground

    return _playground(trace, step=step, row=row, lm=lm, k=k)


__all__ = ["load", "LM", "compare", "Comparison", "Record", "Trace", "Session", "CustomDecoder", "show", "explore", "playground", "recorder",
           "STEP_RECORDERS", "greedy", "sample", "PromptError", "StrategyError", "SessionError",
           "ModelNotFoundError", "DEFAULT_SYSTEM", "DecoderlabError", "NumericError", "RecordError", "TraceFileError",
           "AttentionDroppedError", "RecordBudgetWarning",
           "connect", "APIBackend", "APIError"]
