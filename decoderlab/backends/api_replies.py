"""A server's replies as steps (token text, logprob, top alternatives), and those steps as a `Trace`.

Why a module of its own: the three reply shapes (chat `logprobs.content`, its streamed chunks, and the
legacy completions' `tokens`/`token_logprobs`/`top_logprobs` dicts) carry the same facts in different
places, and servers order and fill them differently: vLLM lists the sampled token first,
llama-cpp-python adds the chosen token to the alternatives even when it is outside the top k, and
dicts merge tokens with equal text. Here each step's alternatives are put in one order (most likely
first), de-duplicated by text and cut to the k asked for, so a rank means a rank.

What a top-k cannot give is said, not guessed: the entropy is a lower bound computed from the top k
plus the rest merged into one outcome, and the mass outside the top k is kept per step
(`trace.array("top_k_missing_mass")`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..trace.builder import from_tokens
from ..trace.trace import Trace

__all__ = ["TokenStep", "chat_steps", "completion_steps", "build", "ENTROPY_NOTE", "MISSING_MASS"]

MISSING_MASS = "top_k_missing_mass"
ENTROPY_NOTE = ("a lower bound from the top {k} (the rest merged into one outcome); the mass outside the top {k} "
                f"is trace.array('{MISSING_MASS}')")


@dataclass
class TokenStep:
    """One generated (or given) token as a server reported it."""

    text: str
    logprob: float | None
    alternatives: list[tuple[str, float]] = field(default_factory=list)  # most likely first, unique texts


def token_text(token: str, raw: Sequence[int] | None) -> str:
    """The token's text; from its bytes where the server sent them (a piece of a multi-byte character
    shows as its escaped bytes, as decoderlab shows local tokens, instead of a replacement character)."""
    if raw is None:
        return token
    data = bytes(raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="backslashreplace")


def ordered(alternatives: Iterable[tuple[str, float]], k: int) -> list[tuple[str, float]]:
    """Most likely first, one entry per text (the likelier kept), at most k."""
    seen: dict[str, float] = {}
    for text, lp in sorted(alternatives, key=lambda a: -a[1]):
        if text not in seen and lp is not None and math.isfinite(lp):
            seen[text] = float(lp)
    return list(seen.items())[:k]


def chat_steps(content: Iterable[Any] | None, k: int) -> list[TokenStep]:
    """`choice.logprobs.content` of a chat reply (or of one streamed chunk) as steps."""
    steps = []
    for item in content or []:
        alts = [(token_text(a.token, getattr(a, "bytes", None)), a.logprob) for a in (item.top_logprobs or [])]
        steps.append(TokenStep(token_text(item.token, getattr(item, "bytes", None)), item.logprob, ordered(alts, k)))
    return steps


def completion_steps(logprobs: Any, k: int, start: int = 0) -> list[TokenStep]:
    """A legacy completion's `logprobs` (tokens, token_logprobs, top_logprobs dicts) as steps, from `start`."""
    if logprobs is None:
        return []
    tops = logprobs.top_logprobs or [None] * len(logprobs.tokens)
    return [TokenStep(text, lp, ordered((top or {}).items(), k))
            for text, lp, top in list(zip(logprobs.tokens, logprobs.token_logprobs, tops))[start:]]


def numeric_fault(steps: Sequence[TokenStep]) -> tuple[int, str] | None:
    """The first step whose chosen token's logprob cannot be one (NaN, or +inf), and what it was; None if none.
    (An alternative with such a logprob is left out of the step's candidates, `ordered`.)"""
    for i, step in enumerate(steps):
        lp = step.logprob
        if lp is not None and (math.isnan(lp) or lp == math.inf):
            return i, "NaN" if math.isnan(lp) else "+inf"
    return None


def top_k_estimates(steps: Sequence[TokenStep]) -> tuple[np.ndarray, np.ndarray]:
    """Per step: the entropy's lower bound from the alternatives, and the mass outside them (NaN without any)."""
    entropy = np.full((len(steps), 1), np.nan, np.float32)
    missing = np.full((len(steps), 1), np.nan, np.float32)
    for s, step in enumerate(steps):
        if not step.alternatives:
            continue
        p = np.exp(np.array([lp for _, lp in step.alternatives], dtype=np.float64))
        rest = max(0.0, 1.0 - float(p.sum()))
        terms = -(p * np.log(np.clip(p, 1e-300, None))).sum() - (rest * math.log(rest) if rest > 0 else 0.0)
        entropy[s, 0], missing[s, 0] = terms, rest
    return entropy, missing


def build(steps: Sequence[TokenStep], *, vocab: dict[str, int] | None, prompt: str, prompt_tokens: Sequence[str] = (),
          model_name: str, chooser: str, strategy: dict, stop_reason: str | None,
          forced: Sequence[int] = ()) -> Trace:
    """The trace of these steps through the one builder (`from_tokens`), with the top-k estimates."""
    entropy, missing = top_k_estimates(steps)
    has_lp = any(s.logprob is not None for s in steps)
    return from_tokens(
        [s.text for s in steps],
        [np.nan if s.logprob is None else s.logprob for s in steps] if has_lp else None,
        [s.alternatives for s in steps], prompt=prompt, prompt_tokens=prompt_tokens, model_name=model_name,
        chooser=chooser, strategy=strategy, stop_reason=stop_reason, forced=forced, vocab=vocab,
        arrays={"entropy": entropy, MISSING_MASS: missing} if steps else None,
    )
