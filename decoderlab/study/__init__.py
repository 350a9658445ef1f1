"""Studies: many prompts × strategies × seeds, run on Ray (a local one started on demand, or a cluster), written
as Parquet that any tool reads, and read back with the frames, summary and plots of `dl.compare`.
"""
from .results import Study, open_study
from .runner import study
from .spec import ModelSpec, model_spec

__all__ = ["Study", "open_study", "study", "ModelSpec", "model_spec"]
