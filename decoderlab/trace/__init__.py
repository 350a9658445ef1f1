"""The trace: what a run recorded, as arrays and tidy pandas frames (`Trace`), the builder that is the only code
making arrays into a `Trace` (local runs, beams, sessions, servers), and saving and loading trace files.
"""
from .builder import ModelInfo, RunInfo, build_trace, from_beam_run, from_recording, from_tokens
from .sample_tree import SampleTree
from .trace import PRESENTERS, Trace, presenter

__all__ = ["Trace", "SampleTree", "PRESENTERS", "presenter", "ModelInfo", "RunInfo", "build_trace", "from_beam_run",
           "from_recording", "from_tokens"]
