"""`Record`: what a run records at every step, checked when it is made; the columns and arrays it gives are
declared once in `record.schema`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import RecordError
from .registry import STEP_RECORDERS

DEFAULT_MEMORY_BUDGET = 2**30  # Record(memory_budget=...): 1 GiB of attention rows
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Record:
    """What to record at every step. The defaults are cheap: the docs' benchmarks page gives their measured cost
    against plain `generate`."""

    top_k: int = 20  # candidates kept per step
    processors: bool = True  # what each logits processor did
    logits: bool = False  # the full raw logits, as float16
    attention: bool = False  # the new token's attention row, every layer and head
    attention_layers: Sequence[int] | None = None
    attention_heads: Sequence[int] | None = None
    prefill_attention: bool = False  # also the prompt's full N×N matrices
    lens: bool = False  # logit lens: each layer's residual at the new position
    lens_top_k: int = 5
    extra: Sequence[str] = ()  # names of your own recorders (registered with @decoderlab.recorder)
    # the most memory attention rows may take (bytes, or text such as "512MiB", "2GiB"; None: no limit): past it
    # the oldest steps' rows are dropped, with one RecordBudgetWarning (see `Recording._keep_within_budget`)
    memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET

    def __post_init__(self):
        object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
        for word in ("top_k", "lens_top_k"):
            v = getattr(self, word)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecordError(f"Record({word}={v!r}): must be a whole number >= 1")
        for word in ("processors", "logits", "attention", "prefill_attention", "lens"):
            if not isinstance(getattr(self, word), bool):
                raise RecordError(f"Record({word}={getattr(self, word)!r}): must be True or False")
        for word in ("attention_layers", "attention_heads"):
            v = getattr(self, word)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or not v or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
                raise RecordError(f"Record({word}={v!r}): must be a non-empty list of indices >= 0, or None for all")
            object.__setattr__(self, word, tuple(v))
        extra = (self.extra,) if isinstance(self.extra, str) else tuple(self.extra)
        unknown = [n for n in extra if n not in STEP_RECORDERS]
        if unknown:
            raise RecordError(f"Record(extra={list(extra)!r}): no recorder registered as {unknown}; "
                             f"known: {sorted(STEP_RECORDERS)}")
        object.__setattr__(self, "extra", extra)

    @property
    def captures_forward(self) -> bool:
        """Whether this record captures inside the model's forward (attention rows, lens residuals), one row per
        run: such a run needs its own forward per row (no shared prefill) and cannot be scored or compared as a
        batch of other runs."""
        return self.attention or self.prefill_attention or self.lens

    def names(self) -> list[str]:
        """The per-step recorders this record runs, in order."""
        names = ["choice", "candidates"]
        if self.processors:
            names.append("processors")
        if self.logits:
            names.append("logits")
        return names + [n for n in self.extra if n not in names]

    def check(self, model) -> None:
        """Layer and head indices against the model they will be recorded from."""
        cfg = model.config.get_text_config()
        for word, size, what in (("attention_layers", getattr(cfg, "num_hidden_layers", None), "layers"),
                                 ("attention_heads", getattr(cfg, "num_attention_heads", None), "heads")):
            wanted = getattr(self, word)
            if wanted is not None and size is not None and max(wanted) >= size:
                raise RecordError(f"Record({word}={list(wanted)}): the model has {size} {what} (0..{size - 1})")


def parse_budget(value: int | str | None) -> int | None:
    """`Record(memory_budget=...)` as bytes: a whole number of bytes, or text "<number><unit>" with a unit of
    B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); None for no limit."""
    if value is None:
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number is None or number < 1:
        raise RecordError(f"Record(memory_budget={value!r}): must be a number of bytes >= 1, text such as "
                          "'512MiB' or '2GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), or None for no limit")
    return number
