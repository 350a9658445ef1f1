"""What the plots, the HTML page and the widgets share: one spelling for one thing.

Why a module of its own: a reader moves between a figure, the offline page and the widgets, and must
see a token, a probability, a colour and a strategy written the same way in all three. When each view
kept its own copy of these helpers the copies drifted (a formatter that printed "–" for a missing
value in one view and raised in another; two wordings of the same strategy). Here each exists once.

Why only the standard library: importing this module loads neither matplotlib, torch, ipywidgets nor
any decoderlab module but `formats` (text written one way for the whole package, re-exported here), so a
view that needs no figure (the HTML page) can use it without paying for matplotlib.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from ..formats import (char_escape, escape, format_bytes, format_number, format_prob, format_rank, is_invisible,
                       is_missing, short_processor, token_label, visible_text)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

__all__ = ["TraceLike", "PROB_SCALE", "prob_colour", "commit_colour", "NEVER_COMMITTED", "token_label", "is_invisible",
           "char_escape", "visible_text", "TABLE_CSS", "prefixed", "format_prob", "format_rank", "format_number",
           "format_bytes", "is_missing", "escape", "short_processor", "strategy_summary", "STRATEGY_WORDS"]


class TraceLike(Protocol):
    """What the views (plots, the HTML page, the widgets) read of a trace: its public facts, frames and
    accessors, nothing else. `decoderlab.trace.Trace` is one. The views name this instead of importing
    the trace module, so drawing code depends on no trace internals, and trace.py can hand itself to
    the HTML page (`to_html`, `_repr_html_`) without an import circle."""

    prompt: str
    prompt_ids: Any
    model_name: str
    strategy: dict
    chooser: str
    processor_names: list
    stop_reason: str | None
    token_text: dict
    attention_layers: list
    attention_heads: list
    branch: int
    parent: int | None
    fork_step: int | None

    @property
    def num_steps(self) -> int: ...
    @property
    def rows(self) -> int: ...
    @property
    def steps(self) -> "pd.DataFrame": ...
    @property
    def choices(self) -> "pd.DataFrame": ...
    @property
    def candidates(self) -> "pd.DataFrame": ...
    @property
    def processors(self) -> "pd.DataFrame": ...
    @property
    def has_attention(self) -> bool: ...
    @property
    def has_lens(self) -> bool: ...
    @property
    def lens_layers(self) -> int: ...
    @property
    def lens_computed(self) -> bool: ...
    @property
    def has_beams(self) -> bool: ...
    @property
    def beams(self) -> "pd.DataFrame": ...
    @property
    def runs(self) -> "pd.DataFrame": ...
    def array(self, name: str) -> "np.ndarray": ...
    def alive_steps(self, row: int = 0) -> "np.ndarray": ...
    def context_length(self, step: int) -> int: ...
    def context_tokens(self, step: int, row: int = 0) -> list: ...
    def attention_weights(self, step: int, row: int = 0) -> "np.ndarray": ...
    def lens_for(self, steps: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> "pd.DataFrame": ...
    def lens_stats_for(self, steps: Sequence[int] | None = None,
                       layers: Sequence[int] | None = None) -> "pd.DataFrame": ...

# ---- colours ---------------------------------------------------------------------------------------------
PROB_SCALE = ("#ef8a62", "#f7f7f7", "#67a9cf")  # p = 0, 0.5, 1: red to blue, colour-blind safe
WEIGHT_SCALE = ("#f7fbff", "#6baed6", "#08306b")  # 0 .. max weight: attention (matplotlib's "Blues")
LENS_SCALE = ("#f7fcf5", "#74c476", "#00441b")  # lens probability 0 .. 1 (matplotlib's "Greens")
RAW_COLOR = "#9ecae1"  # raw (model) probability
FINAL_COLOR = "#3182bd"  # final probability, after the processors
CHOSEN_RAW_COLOR = "#fdae6b"  # the chosen token's bars
CHOSEN_FINAL_COLOR = "#e6550d"
CHOSEN_EDGE = "#d62728"  # outline of the chosen token's cell


def scale_colour(x: float | None, scale: Sequence[str] = PROB_SCALE) -> str:
    """The colour of x in [0, 1] on a three-colour `scale` as '#rrggbb' (x clamped; None and NaN count as 0)."""
    x = 0.0 if x is None or not math.isfinite(x) else min(1.0, max(0.0, float(x)))
    lo, mid, hi = (tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in scale)
    a, b, t = (lo, mid, x * 2) if x < 0.5 else (mid, hi, x * 2 - 1)
    r, g, bl = (round(u + (v - u) * t) for u, v in zip(a, b))
    return f"#{r:02x}{g:02x}{bl:02x}"


def scale_colours(xs: "np.ndarray", scale: Sequence[str] = PROB_SCALE) -> list[str]:
    """`scale_colour` of many values at once (a context of hundreds of tokens, shaded in one go)."""
    import numpy as np

    x = np.clip(np.nan_to_num(np.asarray(xs, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    lo, mid, hi = (np.array([int(c[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float64) for c in scale)
    low = x[:, None] < 0.5
    t = np.where(x < 0.5, x * 2, x * 2 - 1)[:, None]  # [N, 1]: one t per value
    rgb = np.rint(np.where(low, lo + (mid - lo) * t, mid + (hi - mid) * t)).astype(int)
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in rgb.tolist()]


# The tables of a view's side panel (the sample tree's, the forks'), one style for all: `.P-` stands for the view's
# own class prefix (`prefixed`), so that a notebook's <style> of one view never restyles another.
TABLE_CSS = """
.P-box{font:12px/1.45 var(--jp-ui-font-family, system-ui, sans-serif);color:#111}
.P-box table{border-collapse:collapse;margin:4px 0 8px}
.P-box td,.P-box th{padding:1px 6px;border-bottom:1px solid #e4e4e4;text-align:left;vertical-align:top}
.P-box th{color:#555;font-weight:600}
.P-num{text-align:right!important;font-variant-numeric:tabular-nums;white-space:nowrap}
"""


def prefixed(css: str, prefix: str) -> str:
    """A style template's `.P-` classes as `.{prefix}-` classes."""
    return css.replace(".P-", f".{prefix}-")


NEVER_COMMITTED = "#bdbdbd"  # a step whose token is not the last layer's top-1: no commit layer


def commit_colour(layer: float | None, layers: int) -> str:
    """The colour of a step's commit layer (`trace.steps.commit_layer`) on the probability scale: blue for a token
    settled in the first layers, white halfway, red for one settled only at the last; grey where it never is."""
    if is_missing(layer) or layer < 0:
        return NEVER_COMMITTED
    return scale_colour(1.0 - float(layer) / max(layers - 1, 1), PROB_SCALE)


def prob_colour(p: float | None) -> str:
    """The colour of probability p on `PROB_SCALE`: red (unlikely) through white (0.5) to blue (likely).
    Out-of-range p is clamped; None and NaN count as 0 (a missing value looks unlikely)."""
    return scale_colour(p, PROB_SCALE)


def text_colour(background: str) -> str:
    """Black or white, whichever reads better on `background` ('#rrggbb')."""
    r, g, b = (int(background[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"


# ---- the strategy in one line ------------------------------------------------------------------------------
# Strategy words worth showing, with the value at which they do nothing (None: show whenever set).
STRATEGY_WORDS: dict[str, Any] = {
    "do_sample": None, "num_beams": 1, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "max_new_tokens": None, "seed": None,
    "logprobs": None, "entropy": None,  # a server's trace: what its logprobs and entropies are, in words
}


def strategy_summary(trace: TraceLike) -> str:
    """How a trace chose its tokens, in one line: 'chooser: sample · do_sample=True · temperature=0.7 · ...'.

    The chooser is the trace's own (a scored text says 'given' whatever its strategy); settings at the
    value where they do nothing (top_p=1.0, ...) are left out, so what is listed is what acted."""
    words = [f"chooser: {trace.chooser}"]
    for word, neutral in STRATEGY_WORDS.items():
        value = trace.strategy.get(word)
        if value is None or (neutral is not None and value == neutral):
            continue
        words.append(f"{word}={value}")
    return " · ".join(words)
