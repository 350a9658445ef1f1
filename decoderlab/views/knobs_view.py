"""Which knob decided, in the trace view: `trace.knobs(step, token)` as one heatmap per grid of sampler settings
(`panels.knobs_heatmaps`, which the offline page draws too).

Why a toggle and the event loop: a step's 132 grid points cost about 0.2 s on 2 cores, which every click would pay.
So the panel is off until its toggle is on; then each click shows "computing…" at once and the grid runs on the
kernel's event loop just after, cached per (row, step, token). Not a thread: `trace.knobs(lm=...)` may run the
model, which is shared with whatever the next cell runs.
"""
from __future__ import annotations

import asyncio

import ipywidgets as W

from . import panels
from .display import TraceLike
from .kit import classed

__all__ = ["KnobsPanel"]

DELAY_S = 0.02  # after the click's reply: the click shows "computing…" while the grid runs


class KnobsPanel(W.VBox):
    """The trace view's "which knob decided" panel: a toggle, a token picker over the step's candidates, and the
    heatmaps of the picked token (default: the chosen one) at the selected step."""

    def __init__(self):
        self.toggle = classed(W.ToggleButton(value=False, description="which knob decided?",
                                             layout=W.Layout(width="200px")), "dl-knobs-toggle")
        self.token = classed(W.Dropdown(description="token", layout=W.Layout(width="260px")), "dl-knobs-token")
        self.body = classed(W.HTML(), "dl-knobs")
        self._trace: TraceLike | None = None
        self._row = self._step = 0
        self._cache: dict[tuple, str] = {}
        self._scheduled = False
        self._busy = False
        style = W.HTML(f"<style>{panels.KNOBS_CSS}</style>", layout=W.Layout(display="none"))
        super().__init__([style, W.HBox([self.toggle, self.token], layout=W.Layout(align_items="center")), self.body],
                         layout=W.Layout(width="100%"))
        self.toggle.observe(lambda _: self._refresh(), names="value")
        self.token.observe(lambda _: None if self._busy else self._draw(), names="value")

    @property
    def pending(self) -> bool:
        """Whether the shown step's grid is still to be computed (the toggle on, no event loop has run it yet)."""
        return self.toggle.value and self._key() not in self._cache and self._trace is not None

    def wait(self) -> None:
        """Compute the shown step's grid now (a script or a test; a displayed view does it on its own)."""
        if self.pending:
            self._fill()

    def show(self, trace: TraceLike | None, row: int, step: int) -> None:
        """Point the panel at `step` of `row` (None: forget the trace), its token picker at the step's candidates."""
        if trace is not self._trace:
            self._cache.clear()
        self._trace, self._row, self._step = trace, row, step
        self._refresh()

    def _refresh(self) -> None:
        """The token picker and the heatmaps of the shown step; nothing is read while the toggle is off."""
        if self.toggle.value:
            self._set_tokens()
        self._draw()

    def _key(self) -> tuple:
        return (self._row, self._step, self.token.value)

    def _set_tokens(self) -> None:
        tr = self._trace
        opts: list[tuple[str, int]] = []
        if tr is not None and tr.num_steps:
            chosen = tr.choices
            chosen = chosen[(chosen["step"] == self._step) & (chosen["row"] == self._row)]
            cand = tr.candidates
            cand = cand[(cand["step"] == self._step) & (cand["row"] == self._row)] if len(cand) else cand
            ids = list(dict.fromkeys([int(i) for i in chosen["token_id"]] + [int(i) for i in cand.get("token_id", [])]))
            text = dict(zip(cand.get("token_id", []), cand.get("token", []))) | dict(zip(chosen["token_id"], chosen["token"]))
            opts = [(("chosen " if n == 0 else "") + repr(text.get(i, f"<{i}>")), i) for n, i in enumerate(ids)]
        self._busy = True
        try:
            self.token.options = opts
            self.token.value = opts[0][1] if opts else None
        finally:
            self._busy = False

    def _draw(self) -> None:
        self.token.layout.display = None if self.toggle.value else "none"
        if not self.toggle.value or self._trace is None or self.token.value is None:
            self.body.value = ""
            return
        key = self._key()
        if key in self._cache:
            self.body.value = self._cache[key]
            return
        self.body.value = panels.message(f"computing… the chance of this token over {self._grid_size()} sampler "
                                         "settings at this step")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a script or a test: wait() computes it
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(DELAY_S, self._fill)

    @staticmethod
    def _grid_size() -> int:
        from ..analysis.knobs import GRIDS

        return sum(len(a) * (len(b) if k2 else 1) for _, a, k2, b in GRIDS.values())

    def _fill(self) -> None:
        self._scheduled = False
        if not self.pending:
            return
        key, token = self._key(), self.token.value
        try:
            frame = self._trace.knobs(self._step, int(token), row=self._row)
            text = self._trace.token_text.get(int(token), f"<{int(token)}>")
            self._cache[key] = panels.knobs_heatmaps(frame, text)
        except Exception as err:  # shown, not lost in the kernel log: a trace without logits, say
            self._cache[key] = panels.message(f"{type(err).__name__}: {err}", "error")
        if key == self._key():  # still the step and token shown
            self.body.value = self._cache[key]
        else:
            self._draw()
