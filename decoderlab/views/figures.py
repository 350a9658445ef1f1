"""What every figure shares: the figure class that shows itself in Jupyter without pyplot, windowed and thinned
token axes, the checks on a step and a row, and the colour maps (the same scales as the HTML and the widgets).
"""
from __future__ import annotations

import io
import math
from typing import Sequence

from matplotlib.figure import Figure

from .display import PROB_SCALE, TraceLike, short_processor

MAX_LABELS = 60  # the most tick labels one axis carries
DEFAULT_WINDOW = 60  # steps or positions shown when no window is given

CHOSEN_HATCH = "//"

class TraceFigure(Figure):
    """A plain matplotlib Figure that also shows itself as a PNG in Jupyter, without pyplot (so it is
    shown once, where it is returned, and freed when dropped)."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


# ---- shared helpers ---------------------------------------------------------------------------------
def check_row(trace: TraceLike, row: int) -> int:
    if not 0 <= row < trace.rows:
        raise IndexError(f"row {row} is outside this trace's {trace.rows} rows")
    return row


def check_step(trace: TraceLike, step: int) -> int:
    n = trace.num_steps
    if n == 0:
        raise ValueError("this trace has no steps")
    s = step + n if step < 0 else step
    if not 0 <= s < n:
        raise IndexError(f"step {step} is outside this trace's {n} steps")
    return s


def window_of(n: int, start: int | None, window: int | None) -> tuple[int, int]:
    """[a, b) of at most `window` items out of n; by default the most recent ones."""
    if window is None:
        window = n
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    if start is None:
        start = max(0, n - window)
    elif start < 0:
        start = max(0, n + start)
    start = min(start, max(n - 1, 0))
    return start, min(n, start + window)


def token_ticks(axis, positions: Sequence[float], labels: Sequence[str], rotation: float = 90,
                 max_labels: int = MAX_LABELS, **kw) -> None:
    """Put token labels on an axis, every n-th one when there are more than `max_labels`."""
    stride = max(1, math.ceil(len(labels) / max_labels))
    idx = range(0, len(labels), stride)
    axis.set_ticks([positions[i] for i in idx], [labels[i] for i in idx], rotation=rotation, **kw)


def processor_lines(trace: TraceLike, step: int, row: int) -> list[str]:
    """'Name  mass%' per processor at one step, with the chosen token's rank change where it moved."""
    proc = trace.processors
    if not len(proc):
        return []
    p = proc[(proc["step"] == step) & (proc["row"] == row)].sort_values("order")
    width = max(len(short_processor(n)) for n in p["processor"])
    lines = []
    for r in p.itertuples(index=False):
        line = f"{short_processor(r.processor):<{width}} {100 * r.mass_removed:6.2f}%"
        if r.rank_changed:
            line += f"  (chosen rank {int(r.rank_before)}→{int(r.rank_after)})"
        lines.append(line)
    return lines


# ---- colour maps -----------------------------------------------------------------------------------
def prob_cmap():
    """Low probability red, high blue: `display.PROB_SCALE`, the scale of the HTML page and the widgets too."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("dl_prob", list(PROB_SCALE))


def heat_cmap(name: str = "viridis"):
    from matplotlib import colormaps

    return colormaps[name].copy()
