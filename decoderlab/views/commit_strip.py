"""The trace view's commit strip: where the model made up its mind, one cell per step of the shown row.

Why computed after the view is up: a commit layer needs the logit lens of every layer of every step (a second or
two for 64 steps of the default model on 2 cores), and the view must open at once. So the strip says "computing…"
and the lens runs on the kernel's event loop just after the cell that made the view, like the playground's forward;
not a thread, since the model's norm and unembedding are shared with whatever the next cell runs. Where no loop
runs (a script, a test), `wait()` computes it. A trace whose lens is at hand (a loaded one) is drawn at once.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import ipywidgets as W

from . import panels
from .display import TraceLike, escape
from .kit import classed

if TYPE_CHECKING:
    import pandas as pd

DELAY_S = 0.05  # after the cell's reply: the cell shows as done while the lens is computed


class CommitStrip(W.VBox):
    """The commit layers of one row of a trace with a lens (`trace.steps.commit_layer`), the selected step outlined.
    Hidden for a trace without a lens."""

    def __init__(self):
        self.strip = classed(W.HTML(), "dl-commit")
        self.progress = classed(W.HTML(), "dl-commit-progress")
        self._trace: TraceLike | None = None
        self._row = 0
        self._steps: "pd.DataFrame | None" = None  # the row's step, token, commit_layer; None: not computed yet
        self._scheduled = False
        title = W.HTML("<b>" + escape("where the model made up its mind: the first layer from which each chosen token "
                                      "stays the lens's top-1") + "</b>")
        super().__init__([title, self.progress, self.strip], layout=W.Layout(width="100%", display="none"))

    @property
    def pending(self) -> bool:
        """Whether the strip of a trace with a lens is still to be computed."""
        return self._trace is not None and self._steps is None

    def show(self, trace: TraceLike | None, row: int, selected: int) -> None:
        """Point the strip at `row` of `trace` (None: hide it): drawn at once when the lens is at hand, else
        "computing…" and the lens scheduled on the running event loop."""
        self._trace, self._row, self._steps = (trace if trace is not None and trace.has_lens else None), row, None
        self.layout.display = None if self._trace is not None else "none"
        self.strip.value = ""
        if self._trace is None:
            return
        if self._trace.lens_computed:
            self.fill(selected)
            return
        self.progress.value = panels.message(
            f"computing commit layers… the logit lens of {trace.num_steps} steps × {trace.lens_layers} layers "
            "(it fills in when done)")
        self.schedule(selected)

    def schedule(self, selected: int) -> None:
        if not self.pending or self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a script or a test: wait() computes it
            return
        self._scheduled = True
        loop.call_later(DELAY_S, self.fill, selected)

    def fill(self, selected: int) -> None:
        """Compute the commit layers (the lens of every step, once) and draw; an error is shown, not raised."""
        self._scheduled = False
        if not self.pending:
            return
        try:
            st = self._trace.steps
            self._steps = st.loc[st["row"] == self._row, ["step", "token", "commit_layer"]]
        except Exception as err:  # shown, not lost in the kernel log
            self.progress.value = panels.message(
                f"the commit layers could not be computed: {type(err).__name__}: {err}", "error")
            return
        self.progress.value = ""
        self.select(selected)

    def select(self, step: int) -> None:
        """Outline `step` (the view's selection)."""
        if self._steps is not None:
            self.strip.value = panels.commit_strip(self._steps, self._trace.lens_layers, step)
