"""The trace view (`dl.show`): a Jupyter widget over a trace; the session explorer (`dl.explore`) builds on it.

Why this module: the frames hold everything, but "which token was unsure, and why?" is answered
fastest by clicking a token and seeing that step's candidates, what each processor did, where the
new token looked and what each layer was about to say. And a session invites the next question
("what if it had said X?"), so the explorer adds next-token, force-a-candidate, rewind and fork.

Why only stock ipywidgets 8: they render in JupyterLab, Notebook 7, VS Code and Voilà with no
front-end code of ours and nothing fetched from a CDN. A click must be answered at once (200 ms), so
a step's panels are HTML built from its numbers (`decoderlab.panels`, milliseconds; a matplotlib
figure costs half a second), cached per step/layer/head and swapped into `ipywidgets.HTML.value`:
moving through steps redraws in place, with no flicker and no output area that keeps growing.

Every part a user or a browser test needs to find carries a CSS class (`dl-...`, see `CSS_CLASSES`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as W
import numpy as np

from . import panels
from .display import (TraceLike, escape, format_number, format_prob, format_rank, short_processor, strategy_summary,
                      token_label)
from .commit_strip import CommitStrip
from .knobs_view import KnobsPanel
from .kit import TOKEN_LAYOUT, classed, token_colour, token_style, token_title

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["show", "TraceView", "CSS_CLASSES", "token_colour", "token_title"]

# The stable selectors, for notebooks that restyle and for browser tests.
CSS_CLASSES = {
    "dl-trace-view": "the whole trace view (show)",
    "dl-explorer": "the whole session explorer (explore)",
    "dl-header": "model, strategy and stop reason",
    "dl-text": "the generated text: one dl-token button per token",
    "dl-token": "a token of the text; click to select its step (dl-selected marks the current one)",
    "dl-row": "the row picker, for a trace of several rows (a batch of seeds); absent for one row",
    "dl-commit": "where the model made up its mind: one cell per step coloured by its commit layer (a trace with a lens)",
    "dl-commit-progress": "while the commit layers are computed (the lens of every step): what is being computed",
    "dl-knobs-toggle": "which knob decided: shows the selected step's token over grids of sampler settings",
    "dl-knobs-token": "which knob decided: the token (the chosen one, or a candidate)",
    "dl-knobs": "which knob decided: one heatmap per grid (the token's chance; ★ greedy; cut)",
    "dl-step-slider": "the step slider",
    "dl-step-label": "the selected step's number, token and how it was chosen, as text",
    "dl-distribution": "the selected step's top candidates, raw and final probability bars (HTML)",
    "dl-processors": "what each logits processor did at the selected step (HTML table)",
    "dl-attention": "the selected step's attention over its context (HTML)",
    "dl-layer": "attention layer picker",
    "dl-head": "attention head picker",
    "dl-lens": "the selected step's logit lens, layers x top tokens (HTML)",
    "dl-next": "explorer: decode the next token",
    "dl-next-10": "explorer: decode ten tokens",
    "dl-candidates": "explorer: the next step's candidates",
    "dl-candidate": "explorer: a candidate; click to force it as the next token",
    "dl-rewind-to": "explorer: the step to rewind to",
    "dl-rewind": "explorer: rewind",
    "dl-fork": "explorer: fork a new branch here",
    "dl-branches": "explorer: the branch shown",
    "dl-beams": "a beam search's tree (PNG), for beam traces only",
    "dl-problems": "a panel that could not be drawn, and why (empty when all is well)",
    "dl-status": "explorer: what the last action did (dl-error when it failed)",
}


# The selected token's outline, and the panels' style: one sheet per view.
VIEW_CSS = """
.dl-token.dl-selected{outline:2px solid #222;outline-offset:-1px}
"""


# ---- the trace view --------------------------------------------------------------------------------------
class TraceView(W.VBox):
    """A trace, one step at a time: the text (click a token), a step slider, and that step's panels.

    A trace of several rows (a batch of seeds) shows one row at a time, picked with the `dl-row`
    dropdown (only there when the trace has more than one row); a row's padding steps after its EOS
    are not shown. `view.select(step)` and `view.select_row(row)` move it from code;
    `view.set_trace(trace)` swaps in a new trace in place; `on_step(step)`, if given, is called after
    each redraw. `commitment=False` leaves out the commit strip (the session explorer does: each new token would
    unembed every step again).
    """

    def __init__(self, trace: TraceLike, *, row: int = 0, k: int = 12, window: int = 40, lens_layers: int = 16,
                 step: int | None = None, on_step: Callable[[int], None] | None = None, commitment: bool = True):
        self.k = k
        self.commitment = commitment
        self.window = window
        self.lens_layers = lens_layers
        self.on_step = on_step
        self._trace: TraceLike | None = None
        self._row = 0
        self._steps_shown = 0  # the shown row's steps before it finished (padding after them is not text)
        self._cache: dict[tuple, str] = {}  # rendered panels, by (panel, row, step, ...)
        self._busy = False
        self._token_buttons: list[W.Button] = []
        self._text_key = None  # the numbers the token buttons show (see _draw_text)
        self._text_owner = None

        self.header = classed(W.HTML(), "dl-header")
        self.text = classed(W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", align_items="center",
                                                     width="100%", max_height="220px", overflow="auto",
                                                     padding="2px", border="1px solid #e0e0e0")), "dl-text")
        self.row_picker = classed(W.Dropdown(description="row", layout=W.Layout(width="200px")), "dl-row")
        self.slider = classed(W.IntSlider(value=0, min=0, max=0, description="step", continuous_update=False,
                                           layout=W.Layout(width="420px")), "dl-step-slider")
        self.step_label = classed(W.HTML(layout=W.Layout(margin="0 0 0 12px", flex="1 1 auto")), "dl-step-label")
        self.style = W.HTML(f"<style>{VIEW_CSS}{panels.PANEL_CSS}</style>", layout=W.Layout(display="none"))
        self.distribution = classed(W.HTML(), "dl-distribution")
        self.processors = classed(W.HTML(), "dl-processors")
        self.layer = classed(W.Dropdown(description="layer", layout=W.Layout(width="200px")), "dl-layer")
        self.head = classed(W.Dropdown(description="head", layout=W.Layout(width="200px")), "dl-head")
        self.attention = classed(W.HTML(layout=W.Layout(width="100%")), "dl-attention")
        self.lens = classed(W.HTML(), "dl-lens")
        self.problems = classed(W.HTML(), "dl-problems")
        self.commit_panel = CommitStrip()
        self.knobs_panel = KnobsPanel()
        self._no_tokens = W.HTML(panels.message("no tokens yet"))

        title = lambda text: W.HTML(f"<b>{escape(text)}</b>")  # noqa: E731
        self.distribution_panel = W.VBox([title("candidates at this step"), self.distribution,
                                          title("what each processor did"), self.processors, self.knobs_panel],
                                         layout=W.Layout(flex="1 1 500px", min_width="360px", margin="0 12px 8px 0"))
        self.lens_panel = W.VBox([title("logit lens: what each layer would have said"), self.lens],
                                 layout=W.Layout(flex="1 1 500px", min_width="360px", margin="0 0 8px 0"))
        self.attention_panel = W.VBox([W.HBox([title("attention of this step's query"), self.layer, self.head],
                                              layout=W.Layout(align_items="center")), self.attention],
                                      layout=W.Layout(width="100%"))
        self.panels = W.VBox([
            W.Box([self.distribution_panel, self.lens_panel],
                  layout=W.Layout(display="flex", flex_flow="row wrap", width="100%", align_items="flex-start")),
            self.attention_panel,
        ], layout=W.Layout(width="100%"))
        self.controls = W.HBox([self.slider, self.step_label], layout=W.Layout(align_items="center", width="100%"))
        self.beam_tree = classed(W.Image(format="png", layout=W.Layout(max_width="100%", height="auto")), "dl-beams")
        self.beam_panel = W.VBox([title("beam search: every candidate, the returned rows in colour"), self.beam_tree],
                                 layout=W.Layout(width="100%", display="none"))
        super().__init__([self.style, self.header, self.text, self.commit_panel, self.controls, self.problems, self.beam_panel,
                          self.panels], layout=W.Layout(width="100%"))
        self.add_class("dl-trace-view")

        self.row_picker.observe(self._on_row, names="value")
        self.slider.observe(self._on_slider, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.head.observe(self._on_head, names="value")
        self.set_trace(trace, step=step, row=row)

    # ---- public -------------------------------------------------------------------------------------
    @property
    def trace(self) -> TraceLike:
        return self._trace  # type: ignore[return-value]

    @property
    def row(self) -> int:
        """The row shown (0 for a trace of one row)."""
        return self._row

    @property
    def step(self) -> int:
        """The selected step."""
        return int(self.slider.value)

    def select(self, step: int) -> None:
        """Show step `step` of the shown row (negative counts from its end)."""
        n = self._steps_shown
        if n == 0:
            return
        step = step + n if step < 0 else step
        if not 0 <= step < n:
            raise IndexError(f"step {step} is outside row {self.row}'s {n} steps")
        if step == self.slider.value:
            self._redraw()
        else:
            self.slider.value = step  # -> _on_slider -> _redraw

    def select_row(self, row: int) -> None:
        """Show row `row`: its text, and its panels at the same step (its last step if it ended sooner)."""
        if not 0 <= row < self.trace.rows:
            raise IndexError(f"row {row} is outside this trace's {self.trace.rows} rows")
        if row != self._row:
            self.row_picker.value = row  # -> _on_row -> _show_row

    @property
    def pending(self) -> bool:
        """Whether the commit strip (a trace with a lens whose lens is not computed yet) is still to be computed."""
        return self.commit_panel.pending

    def wait(self) -> "TraceView":
        """Compute the commit strip now if it is pending, and draw it; returns the view. A displayed view computes it
        by itself once the cell is done (the lens of every step: a second or two for 64 steps of the default model
        on 2 cores); code and scripts call this."""
        self.commit_panel.fill(self.step)
        return self

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Shown: make sure the commit strip is scheduled (a view made where no loop ran, shown in a kernel)."""
        self.commit_panel.schedule(self.step)
        return super()._repr_mimebundle_(**kwargs)

    def forget_trace(self) -> None:
        """Let go of the shown trace until `set_trace` gives a newer one: a session's next trace can then
        reuse the host buffers in place instead of copying them (nothing else holds the old views)."""
        self._trace = None
        self._cache.clear()

    def set_trace(self, trace: TraceLike, step: int | None = None, row: int | None = None) -> None:
        """Show another trace (a session's newer state) in place; select `row` (default: the row shown,
        if the new trace has it, else 0) and `step` (default: the last)."""
        if row is not None and not 0 <= row < trace.rows:
            raise IndexError(f"row {row} is outside this trace's {trace.rows} rows")
        row = row if row is not None else self._row if self._row < trace.rows else 0
        owner = (trace.chooser, trace.model_name)
        if owner != self._text_owner:
            self._text_key = None  # the buttons' words name the chooser: write them all again
        self._text_owner = owner
        self._trace = trace
        self._cache.clear()
        self._busy = True
        try:
            self._set_row_picker(row)
            self._set_pickers()
        finally:
            self._busy = False
        self._draw_header()
        self._draw_beam_tree()
        self._show_row(row, step)
        self._start_commit()

    # ---- building -------------------------------------------------------------------------------------
    def _show_row(self, row: int, step: int | None) -> None:
        """Point the slider, the text and the panels at `row`, at `step` (default: its last)."""
        self._row = row
        n = self._steps_shown = len(self.trace.alive_steps(row))  # a prefix: a finished row stays finished
        self._busy = True
        try:
            self.slider.max = max(n - 1, 0)
            self.slider.disabled = n == 0
            target = (n - 1 if step is None else (step + n if step < 0 else step)) if n else 0
            self.slider.value = min(max(target, 0), max(n - 1, 0))
        finally:
            self._busy = False
        self._draw_text()
        self._redraw()

    def _set_row_picker(self, row: int) -> None:
        """The row picker's options for this trace; in the controls only when there is a row to pick."""
        tr = self.trace
        opts = [(f"row {r} · {len(tr.alive_steps(r))} steps", r) for r in range(tr.rows)]
        if list(self.row_picker.options) != opts:
            self.row_picker.options = opts
        self.row_picker.value = row
        shown = [self.row_picker, self.slider, self.step_label] if tr.rows > 1 else [self.slider, self.step_label]
        if list(self.controls.children) != shown:
            self.controls.children = shown

    def _draw_beam_tree(self) -> None:
        """A beam search's tree, drawn once per trace (a figure, so it costs a few hundred ms when the view
        opens, never on a click)."""
        import io

        tr = self.trace
        if not tr.has_beams:
            self.beam_panel.layout.display = "none"
            return
        from . import plots

        buf = io.BytesIO()
        plots.beam_tree(tr).savefig(buf, format="png", dpi=80)
        self.beam_tree.value = buf.getvalue()
        self.beam_panel.layout.display = None

    def _draw_header(self) -> None:
        tr = self.trace
        procs = ", ".join(short_processor(p) for p in tr.processor_names) or "none"
        rows = f" × {tr.rows} rows" if tr.rows > 1 else ""
        branch = f" · branch {tr.branch}" + (f" (from {tr.parent} at step {tr.fork_step})" if tr.parent is not None else "")
        prompt = tr.prompt if len(tr.prompt) <= 2000 else "…" + tr.prompt[-2000:]
        self.header.value = (
            f"<div style='font-size:13px;line-height:1.5'><b>{escape(tr.model_name or 'trace')}</b>"
            f" · {tr.num_steps} steps{rows} · {escape(strategy_summary(tr))} · processors: {escape(procs)}"
            f"{' · stop: ' + escape(tr.stop_reason) if tr.stop_reason else ''}{escape(branch)}"
            f"<details><summary style='cursor:pointer;color:#555'>prompt</summary>"
            f"<pre style='white-space:pre-wrap;font-size:12px;margin:2px 0'>{escape(prompt)}</pre></details></div>")

    def _row_steps(self) -> "pd.DataFrame":
        """The steps frame of the shown row, in step order."""
        st = self.trace.choices
        return st[st["row"] == self._row]

    def _draw_text(self) -> None:
        """One button per token, coloured by its probability. Buttons are reused, share one layout and
        one style per colour, and are touched only where what they show changed: a session's next step
        sends the front end one new button, not four hundred updates."""
        n = self._steps_shown
        rows = self._row_steps() if n else None
        while len(self._token_buttons) < n:
            b = classed(W.Button(layout=TOKEN_LAYOUT), "dl-token")
            b.on_click(self._on_token)
            b._dl_shown = None
            self._token_buttons.append(b)
        if n:
            # what each button shows, as numbers: only buttons whose numbers changed are written again
            key = np.column_stack([rows[c].to_numpy(np.float64, na_value=np.nan)
                                   for c in ("token_id", "prob", "final_prob", "rank", "forced")])
            prev = self._text_key
            same = np.zeros(n, dtype=bool)
            if prev is not None:
                m = min(n, len(prev))
                same[:m] = ((key[:m] == prev[:m]) | (np.isnan(key[:m]) & np.isnan(prev[:m]))).all(axis=1)
            self._text_key = key
            changed = np.flatnonzero(~same)
            sub = rows.iloc[changed] if len(changed) < n else rows
            cols = zip(changed.tolist(), sub["token"], sub["prob"], sub["rank"], sub["final_prob"], sub["forced"],
                       sub["choice"])
            for i, token, prob, rank, final_prob, forced, choice in cols:
                b = self._token_buttons[i]
                forced = bool(forced)
                shown = (token_label(token, 24),
                         token_title(i, token, prob, rank, final_prob, "forced" if forced else choice),
                         token_style(prob, forced))
                if b._dl_shown != shown:
                    b.description, b.tooltip, b.style = shown
                    b._dl_shown = shown
                b._dl_step = i
        shown = self._token_buttons[:n] or [self._no_tokens]
        if list(self.text.children) != shown:
            self.text.children = shown
        # the dl-selected class stays on its button (classes outlive a rewrite): _redraw moves it from there

    def _start_commit(self) -> None:
        self.commit_panel.show(self.trace if self.commitment and self._steps_shown else None, self._row, self.step)

    def _set_pickers(self) -> None:
        tr = self.trace
        layers = list(tr.attention_layers) if tr.has_attention else []
        opts = [("every layer", "every")] + [(str(x), str(x)) for x in layers]
        if [o[1] for o in self.layer.options] != [o[1] for o in opts]:
            self.layer.options = opts
            self.layer.value = "every"
        self._set_head_options()

    def _set_head_options(self) -> None:
        tr = self.trace
        heads = list(tr.attention_heads) if tr.has_attention else []
        opts = [("mean", "mean")] + ([("every head", "all")] if self.layer.value not in (None, "every") else [])
        opts += [(str(h), str(h)) for h in heads]
        if [o[1] for o in self.head.options] != [o[1] for o in opts]:
            keep = self.head.value if self.head.value in [o[1] for o in opts] else "mean"
            self.head.options = opts
            self.head.value = keep

    # ---- drawing ---------------------------------------------------------------------------------------
    def _panel(self, key: tuple, make: Callable[[], str]) -> str:
        """A panel's HTML, made once per key (a step revisited is shown from the cache)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def _attention_args(self) -> tuple[int | None, int | str | None]:
        layer = None if self.layer.value in (None, "every") else int(self.layer.value)
        head: int | str | None = self.head.value
        if head in (None, "mean"):
            head = None
        elif head != "all":
            head = int(head)
        return layer, head

    def _redraw(self) -> None:
        """Draw the selected step's panels, then the tokens' selection and the step label, last: once the
        label names a step, every panel shows that step."""
        tr, n, row = self.trace, self._steps_shown, self._row
        if tr is None:  # between forget_trace and set_trace (a failed rebuild): nothing to draw
            return
        if n == 0:
            self._mark_selected(None)
            self.step_label.value = "step –: nothing decoded yet"
            self.panels.layout.display = "none"
            return
        self.panels.layout.display = None
        s = self.step
        problems = []

        def panel(name: str, draw: Callable[[], None]) -> None:
            try:
                draw()
            except Exception as err:  # one broken panel must not blank the others
                problems.append(f"{name}: {type(err).__name__}: {err}")

        # cache keys name the row too: step 3 of row 0 and step 3 of row 1 are different panels
        panel("candidates", lambda: setattr(self.distribution, "value", self._panel(
            ("dist", row, s), lambda: panels.candidates_panel(tr, s, row=row, k=self.k))))
        panel("processors", lambda: setattr(self.processors, "value", self._panel(
            ("proc", row, s), lambda: panels.processors_panel(tr, s, row=row))))
        self.attention_panel.layout.display = None if tr.has_attention else "none"
        if tr.has_attention:
            layer, head = self._attention_args()
            panel("attention", lambda: setattr(self.attention, "value", self._panel(
                ("att", row, s, layer, head), lambda: panels.attention_panel(tr, s, row=row, layer=layer, head=head))))
        self.lens_panel.layout.display = None if tr.has_lens else "none"
        if tr.has_lens:
            panel("lens", lambda: setattr(self.lens, "value", self._panel(
                ("lens", row, s), lambda: panels.lens_panel(tr, s, row=row, max_layers=self.lens_layers))))
        panel("knobs", lambda: self.knobs_panel.show(tr, row, s))
        self.problems.value = "<br>".join(panels.message(p, "error") for p in problems)

        r = self._row_steps().iloc[s]
        how = "forced" if bool(r["forced"]) else str(r["choice"])
        which = f"row {row} · " if tr.rows > 1 else ""
        self._mark_selected(s)
        self.commit_panel.select(s)
        self.step_label.value = "<br>".join(panels.message(p, "error") for p in problems)
        self.step_label.value = (
            f"<span style='font-size:14px'>{which}<b>step {s}</b> of 0–{n - 1}: "
            f"<code>{escape(token_label(r['token'], 32))}</code>"
            f" · {escape(how)} · p={format_prob(r['prob'])} (rank {format_rank(r['rank'])})"
            f" · final p={format_prob(r['final_prob'])} · entropy {format_number(r['entropy'])}</span>")
        if self.on_step is not None:
            self.on_step(s)

    def _mark_selected(self, step: int | None) -> None:
        """Outline the selected token (the `dl-selected` class), touching only the old and the new one."""
        old = getattr(self, "_selected", None)
        if old == step:
            return
        if old is not None and old < len(self._token_buttons):
            self._token_buttons[old].remove_class("dl-selected")
        if step is not None:
            self._token_buttons[step].add_class("dl-selected")
        self._selected = step

    # ---- events ----------------------------------------------------------------------------------------
    def _on_row(self, change) -> None:
        if not self._busy and change["new"] is not None and change["new"] != self._row:
            self._show_row(int(change["new"]), self.step)
            self._start_commit()

    def _on_slider(self, change) -> None:
        if not self._busy:
            self._redraw()

    def _on_layer(self, change) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            self._set_head_options()
        finally:
            self._busy = False
        self._redraw()

    def _on_head(self, change) -> None:
        if not self._busy:
            self._redraw()

    def _on_token(self, button: W.Button) -> None:
        self.select(button._dl_step)


# ---- entry points ----------------------------------------------------------------------------------------
def show(trace: TraceLike, *, row: int = 0, step: int | None = None, k: int = 12, window: int = 40,
         lens_layers: int = 16, commitment: bool = True) -> TraceView:
    """The trace explorer: click a token or slide through steps to see that step's candidates,
    processors, attention (layer/head pickers) and logit lens, where the trace recorded them.

    `row`: the row shown first, of a trace of several rows (a row picker switches); `step`: the step
    shown first (default: the row's last); `k`: candidates plotted; `window`: context positions in the
    attention plot; `lens_layers`: at most this many layers in the lens plot; `commitment`: the strip of commit
    layers under the text, for a trace with a lens (computed once the view is up; `view.wait()` in a script)."""
    return TraceView(trace, row=row, k=k, window=window, lens_layers=lens_layers, step=step, commitment=commitment)
