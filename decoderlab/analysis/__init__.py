"""Questions over runs: strategies compared side by side as one batch (`compare`), what other settings would have
done at a recorded step (`whatif`, `knobs`), where two engines part and why (`forks`), and the metrics papers compare
strategies by (`metrics`).
"""
from .compare import RUN_COLUMNS, Comparison, check_settings, compare, run_metrics, summary_of
from .forks import Engine, Forks, ForksError, forks
from .whatif import WhatIfError, run_words, what_if

__all__ = ["RUN_COLUMNS", "Comparison", "check_settings", "compare", "run_metrics", "summary_of", "WhatIfError",
           "run_words", "what_if", "Engine", "Forks", "ForksError", "forks"]
