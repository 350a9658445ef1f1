"""Every error decoderlab raises on purpose, under one base: `except dl.DecoderlabError` catches them all.

Why one module: the errors are part of the public API, and a user (or a notebook cell) should be able to
tell "decoderlab refused this, and said why" from a library's crash. Each also subclasses the built-in
error it is a kind of (`ValueError` for bad arguments, `OSError` for files and servers), so `except
ValueError` clauses written before the hierarchy existed keep working. Messages name the argument, the
value, and what is allowed or what to do.
"""
from __future__ import annotations

from typing import Any


class DecoderlabError(Exception):
    """Base of every error decoderlab raises on purpose. `trace`, where set, holds what was recorded before it."""

    trace: Any = None


class PromptError(DecoderlabError, ValueError):
    """The prompt is empty, too long for the model, or needs a chat template the model lacks."""


class StrategyError(DecoderlabError, ValueError):
    """A strategy word is unknown or its value is out of range."""


class SessionError(DecoderlabError, ValueError):
    """A session request that cannot be served (rewind past the end, an unknown token, ...)."""


class RecordError(DecoderlabError, ValueError):
    """A `Record(...)` setting that is out of range, unknown, or does not fit the model."""


class RecorderError(RecordError):
    """A recorder registered under a name that is taken."""


class AttentionDroppedError(DecoderlabError, LookupError):
    """Attention rows asked of a step whose rows were dropped to keep the recording within
    `Record(memory_budget=...)` (`trace.steps.has_attention` says which steps have them)."""


class RecordBudgetWarning(UserWarning):
    """A run's attention rows reached `Record(memory_budget=...)`: the oldest steps' rows are being dropped.
    Warned once a run; a warning, not an error, because the run and everything else it records go on."""


class ModelNotFoundError(DecoderlabError, ValueError):
    """The model a user named cannot be found or loaded here."""


class MissingExtraError(DecoderlabError, ImportError):
    """A feature whose library is an optional extra that is not installed (the message names the pip command)."""


class StudyError(DecoderlabError, ValueError):
    """A study that cannot run as asked: a model its workers cannot load, no prompts, or a folder that holds a
    different study."""


class SchemaError(DecoderlabError, ValueError):
    """Arrays that contradict the trace schema (a wrong dtype, dimension count or length)."""


class LensError(DecoderlabError, ValueError):
    """A tuned lens that cannot be read, or was trained for a model of another shape."""


class TraceFileError(DecoderlabError, ValueError):
    """A file that is not a decoderlab trace, is damaged, was written by a newer decoderlab, or contradicts the
    trace schema."""


class NumericError(DecoderlabError, FloatingPointError):
    """NaN or infinity where a number cannot be one: in the model's logits, or in the scores after a processor
    (every token at -inf leaves nothing to choose). Names the step and the processor; `trace` holds the steps
    recorded before it."""

    def __init__(self, message: str, *, step: int | None = None, processor: str | None = None):
        super().__init__(message)
        self.step, self.processor = step, processor


# ---- a model server (dl.connect): each names the server and what to do --------------------------------------
class APIError(DecoderlabError, OSError):
    """A request to a model server that failed (`dl.connect`'s backends)."""


class ServerUnreachable(APIError, ConnectionError):
    """Nothing answers at the base URL (connection refused, unknown host)."""


class ServerTimeout(APIError, TimeoutError):
    """The server did not answer within the timeout."""


class AuthenticationFailed(APIError, PermissionError):
    """401/403: the server refused the API key."""


class UnknownModel(APIError, LookupError):
    """The server does not serve a model of that name."""


class RateLimited(APIError):
    """429 after every retry."""


class ServerFailed(APIError):
    """5xx after every retry."""


class RequestRefused(APIError, ValueError):
    """400/422: the server refused the request's words."""


class NoLogprobs(APIError):
    """A reply without the logprobs that were asked for."""


class NotSupported(APIError, ValueError):
    """What was asked is something this server (or the protocol) cannot give; refused before any request."""


__all__ = ["DecoderlabError", "PromptError", "StrategyError", "SessionError", "RecordError", "RecorderError",
           "AttentionDroppedError", "RecordBudgetWarning", "ModelNotFoundError", "StudyError", "SchemaError", "TraceFileError",
           "NumericError", "APIError", "ServerUnreachable", "ServerTimeout", "AuthenticationFailed", "UnknownModel",
           "RateLimited", "ServerFailed", "RequestRefused", "NoLogprobs", "NotSupported"]
