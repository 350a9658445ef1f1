"""One run through several lenses side by side (`dl.show_lenses`): the logit lens beside a tuned lens, say.

Why side by side: a tuned lens reads the middle layers differently (its translators undo each layer's own basis),
and what it changes is seen best against the plain lens at the same step: where each token settled (the commit
strips) and what each layer would have said (the lens tables). Each column is the trace view's own parts
(`CommitStrip`, `panels.lens_panel`) over one trace; the step slider moves them together.
"""
from __future__ import annotations

from typing import Sequence

import ipywidgets as W

from . import panels
from .commit_strip import CommitStrip
from .display import TraceLike, escape
from .kit import classed

__all__ = ["LensPair"]


class LensPair(W.VBox):
    """Columns of lenses over the same run (traces made by `trace.with_lens`), one step slider for all."""

    def __init__(self, traces: Sequence[TraceLike], *, step: int | None = None, row: int = 0, lens_layers: int = 16):
        if not traces or not all(t.has_lens for t in traces):
            raise ValueError("show_lenses takes traces with a lens: record with Record(lens=True), then "
                             "trace.with_lens(dl.tuned_lens(lm, folder)) for another lens")
        lengths = {len(t.alive_steps(row)) for t in traces}
        if len(lengths) != 1:
            raise ValueError(f"show_lenses takes the same run through several lenses; these have {sorted(lengths)} "
                             "steps")
        self.traces, self.row, self.lens_layers = list(traces), row, lens_layers
        n = lengths.pop()
        self.slider = classed(W.IntSlider(value=n - 1 if step is None else step, min=0, max=max(n - 1, 0),
                                          description="step", continuous_update=False), "dl-step-slider")
        self.strips = [CommitStrip() for _ in traces]
        self.tables = [classed(W.HTML(), "dl-lens") for _ in traces]
        columns = [W.VBox([W.HTML(f"<b>{escape(getattr(t.lens_object, 'name', None) or 'lens')}</b>"), strip, table],
                          layout=W.Layout(flex="1 1 480px", min_width="360px", margin="0 12px 0 0"))
                   for t, strip, table in zip(traces, self.strips, self.tables)]
        style = W.HTML(f"<style>{panels.PANEL_CSS}</style>", layout=W.Layout(display="none"))
        super().__init__([style, self.slider, W.Box(columns, layout=W.Layout(display="flex", flex_flow="row wrap"))])
        self.add_class("dl-lens-pair")
        for trace, strip in zip(self.traces, self.strips):
            strip.show(trace, row, self.slider.value)
        self.slider.observe(lambda _: self._draw(), names="value")
        self._draw()

    @property
    def pending(self) -> bool:
        """Whether a commit strip is still to be computed (`wait()` computes them in a script)."""
        return any(s.pending for s in self.strips)

    def wait(self) -> "LensPair":
        for strip in self.strips:
            strip.fill(self.slider.value)
        return self

    def _draw(self) -> None:
        step = self.slider.value
        for trace, strip, table in zip(self.traces, self.strips, self.tables):
            table.value = panels.lens_panel(trace, step, row=self.row, max_layers=self.lens_layers)
            strip.select(step)

    def _repr_mimebundle_(self, **kwargs):
        for strip in self.strips:
            strip.schedule(self.slider.value)
        return super()._repr_mimebundle_(**kwargs)
