"""What a run records: the `Record` options, the schema (the one declared list of arrays and columns), the
registry of per-step recorders, and the `Recording` that the loop calls, with its host buffers.
"""
from .heap import keep_large_allocations_apart
from .options import DEFAULT_MEMORY_BUDGET, Record, parse_budget
from .recorders import record_processors, top_candidates
from .recording import Recording
from .registry import BUILT_IN, STEP_RECORDERS, StepRecorder, recorder
from .schema import SCHEMA, SchemaError, check_arrays, conform, schema_frame

__all__ = ["keep_large_allocations_apart", "DEFAULT_MEMORY_BUDGET", "Record", "parse_budget", "record_processors",
           "top_candidates", "Recording",
           "BUILT_IN", "STEP_RECORDERS", "StepRecorder", "recorder", "SCHEMA", "SchemaError", "check_arrays", "conform",
           "schema_frame"]
