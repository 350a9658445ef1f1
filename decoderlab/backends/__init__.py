"""Where tokens come from: a local model (`LM`, `load`), a model behind an OpenAI-compatible server
(`APIBackend`, `connect`), the blog post's `CustomDecoder`, and the sessions that step, force, rewind and branch.
"""
from .api import APIBackend, connect
from .custom_decoder import CustomDecoder
from .local import DEFAULT_SYSTEM, LM, load
from .session import Session

__all__ = ["APIBackend", "connect", "CustomDecoder", "DEFAULT_SYSTEM", "LM", "load", "Session"]
