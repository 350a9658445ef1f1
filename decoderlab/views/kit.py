"""What the Jupyter views share: a widget's CSS classes (each view lists its selectors in its `CSS_CLASSES`),
and token buttons, one layout and one style per (colour, forced), coloured and titled the same way in the
trace view, the session explorer and the compare view.
"""
from __future__ import annotations

from typing import Any

import ipywidgets as W

from .display import format_prob, format_rank, prob_colour

# -------------------------------------------------------------------------------------
# Every token button shares one layout, and one style per (colour, forced): a button is one widget, not three.
TOKEN_LAYOUT = W.Layout(width="auto", height="24px", margin="1px", padding="0 3px")
_TOKEN_STYLES: dict[tuple[str, bool], W.ButtonStyle] = {}


def token_colour(prob: float) -> str:
    """A token's background: its probability's colour, to 1% (so that tokens share few styles). Every view
    that colours generated text by probability (this one, the comparison view) uses this."""
    return prob_colour(round(float(prob), 2) if prob == prob else prob)


def token_title(step: int, token: str, prob: float, rank: Any, final_prob: float, how: str) -> str:
    """A token's hover text: its step, exact text, raw probability and rank, final probability and how it
    was chosen ('forced', 'sample', ...)."""
    return (f"step {step}: {token!r} · p={format_prob(prob)} (rank {format_rank(rank)})"
            f" · final p={format_prob(final_prob)} · {how}")


def token_style(prob: float, forced: bool) -> W.ButtonStyle:
    """The shared style of a token button: background by probability (to 1%), forced tokens bold and underlined."""
    colour = token_colour(prob)
    style = _TOKEN_STYLES.get((colour, forced))
    if style is None:
        style = _TOKEN_STYLES[(colour, forced)] = W.ButtonStyle(
            button_color=colour, font_size="13px", font_weight="bold" if forced else "normal",
            text_decoration="underline" if forced else "none")
    return style

def classed(widget: W.Widget, *classes: str) -> W.Widget:
    for c in classes:
        widget.add_class(c)
    return widget
