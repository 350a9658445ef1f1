"""Questions over runs: strategies compared side by side as one batch (`compare`), what other settings would have
done at a recorded step (`whatif`), and the metrics papers compare strategies by (`metrics`).
"""
from .compare import Comparison, compare
from .whatif import WhatIfError, run_words, what_if

__all__ = ["Comparison", "compare", "WhatIfError", "run_words", "what_if"]
