"""The engine: a causal LM decoded one step at a time (the loop, its strategy words and rules, the compiled fast
path), what is captured inside the forward (attention rows, the lens's residuals), and loading models.

What other rooms may use is exported here; the modules' underscored names stay inside this room.
"""
from .loop import Observer, State, StepContext
from .models import DEFAULT_NAME, default_gguf, default_model_dir, load_pretrained
from .strategy import Chooser, Rule, Strategy
from .words import check_words, describe, resolve
from .rules.sampling import greedy, sample

__all__ = ["Observer", "State", "StepContext", "DEFAULT_NAME", "default_gguf", "default_model_dir", "load_pretrained",
           "Chooser", "Rule", "Strategy", "check_words", "describe", "resolve", "greedy", "sample"]
