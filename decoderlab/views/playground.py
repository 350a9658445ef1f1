"""A sampler playground: one recorded step of your own model, reshaped live by the sampling knobs.

Why: sampler visualisers show canned distributions; what a reader wants to see is what top-p 0.9 or
min-p 0.1 does to *this* step of *this* model, where the run hesitated. The playground takes a step's
raw logits (recorded, or one forward of the model), and each move of a slider (temperature, top-k, top-p,
min-p, typical-p) runs transformers' own processors over them, through the same machinery as
`trace.what_if` (`decoderlab.analysis.whatif`): the kept set, the mass removed, the final distribution, the most
likely token and the chance of the token the run chose.

Why HTML panels (built with `decoderlab.panels`' helpers and `decoderlab.display`'s colours): a slider move
must answer within 200 ms; a panel is a string built from the numbers in milliseconds, swapped into an
`ipywidgets.HTML` in place. The slider values are the words `generate` takes (`sliders.words()`), so what you
settle on pastes into `lm.generate(...)` as it is. The run's other processor words (repetition_penalty,
no_repeat_ngram_size, epsilon_cutoff, ...) stay as the run had them and are listed in the summary.

Why the forward waits until the widget is up: a trace recorded without logits needs one forward of the model over
the prompt and the row (seconds on a CPU). Done in the constructor, the cell showed nothing until it was over; so
the playground opens at once, greyed, saying "computing logits…" (with a moving mark drawn by the browser), and the
forward runs on the kernel's own event loop just after the cell that made it has finished, then fills the panels
in. Not a thread: the model is shared with whatever the next cell runs, and a recording attaches its capture to the
model, so a forward running beside it would be recorded into that run. Where no event loop runs (a script, a test),
the forward runs when it is first needed: `view.wait()`, `view.what_if`.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import ipywidgets as W
import numpy as np

from . import panels
from .kit import classed
from ..analysis import whatif
from .display import (CHOSEN_FINAL_COLOR, CHOSEN_RAW_COLOR, FINAL_COLOR, RAW_COLOR, STRATEGY_WORDS, TraceLike, escape,
                      format_number, format_prob, short_processor)

if TYPE_CHECKING:
    from ..backends.local import LM

__all__ = ["playground", "Playground", "CSS_CLASSES", "SLIDER_WORDS"]

# The stable selectors, for notebooks that restyle and for browser tests.
CSS_CLASSES = {
    "dl-playground": "the whole sampler playground (dl.playground)",
    "dl-playground-header": "the model, the step, its context's last tokens and the token the run chose",
    "dl-playground-step": "the step slider (the row's steps)",
    "dl-playground-temperature": "temperature slider",
    "dl-playground-top-k": "top-k slider (0: off)",
    "dl-playground-top-p": "top-p slider (1: off)",
    "dl-playground-min-p": "min-p slider (0: off)",
    "dl-playground-typical-p": "typical-p slider (1: off)",
    "dl-playground-reset": "button: the sliders back to the run's own strategy",
    "dl-playground-summary": "kept tokens, mass removed, entropy, the most likely token, the run token's chance (HTML)",
    "dl-playground-bars": "the top candidates: raw and final probability bars, kept or removed (HTML)",
    "dl-playground-processors": "each processor in order: mass removed, tokens left (HTML)",
    "dl-playground-problems": "why the last move could not be answered (empty when all is well)",
    "dl-playground-progress": "while the step's logits are computed (a trace without recorded logits): what is being "
                              "done, with a moving mark (empty when they are in)",
}

# slider word -> (label, minimum, maximum, step, the value at which it does nothing)
SLIDER_WORDS: dict[str, tuple[str, float, float, float, float]] = {
    "temperature": ("temperature", 0.05, 3.0, 0.05, 1.0),
    "top_k": ("top-k", 0, 200, 1, 0),
    "top_p": ("top-p", 0.01, 1.0, 0.01, 1.0),
    "min_p": ("min-p", 0.0, 1.0, 0.01, 0.0),
    "typical_p": ("typical-p", 0.01, 1.0, 0.01, 1.0),
}
# The run's words the playground does not keep: the sliders' own, and those of strategies with a rule of their own.
_NOT_BASE = set(SLIDER_WORDS) | {"do_sample", "num_beams", "length_penalty", "early_stopping", "num_return_sequences",
                                 "num_beam_groups", "diversity_penalty", "penalty_alpha", "dola_layers"}

_NOT_SHOWN = ("eos_token_id", "pad_token_id", "max_new_tokens")  # words that act on no distribution shown here

PLAYGROUND_CSS = """
.dlp tr.dlp-removed td{color:#999}
.dlp tr.dlp-removed code{text-decoration:line-through}
.dlp-massbar{display:flex;width:240px;height:10px;border-radius:2px;overflow:hidden;background:#d9d9d9}
@keyframes dlp-spin{to{transform:rotate(360deg)}}
.dlp-spinner{display:inline-block;width:11px;height:11px;margin:0 6px -1px 0;border:2px solid #c8c8c8;
 border-top-color:#2b6cb0;border-radius:50%;animation:dlp-spin .8s linear infinite}
"""
FORWARD_DELAY_S = 0.05  # after the cell's reply: the cell shows as done while the forward runs


def slider_values(trace: TraceLike) -> dict[str, float]:
    """The sliders' starting values: the run's own sampling words (as resolved), else values that do nothing."""
    s = trace.strategy
    sampled = bool(s.get("do_sample"))
    out = {}
    for word, (_, lo, hi, _, neutral) in SLIDER_WORDS.items():
        value = s.get(word) if sampled else None
        out[word] = neutral if value is None else min(max(value, lo), hi) if word != "top_k" else int(value)
    return out


def base_words(trace: TraceLike) -> dict[str, Any]:
    """The run's words the sliders leave alone (penalties, EOS, other cut-offs), kept as the run had them; those
    at the value where they do nothing (`display.STRATEGY_WORDS`, min_length 0) are left out."""
    out = {}
    for word, value in whatif.run_words(trace).items():
        neutral = STRATEGY_WORDS.get(word, 0 if word == "min_length" else None)
        if word not in _NOT_BASE and not (neutral is not None and value == neutral):
            out[word] = value
    return out


def words(values: dict[str, float], base: dict[str, Any]) -> dict[str, Any]:
    """`generate`'s words for slider values: sampling, each knob at its value (min_p 0 leaves min-p out)."""
    out = {**base, "do_sample": True, "temperature": float(values["temperature"]), "top_k": int(values["top_k"]),
           "top_p": float(values["top_p"]), "typical_p": float(values["typical_p"])}
    if values["min_p"] > 0:
        out["min_p"] = float(values["min_p"])
    return out


# ---- panels -----------------------------------------------------------------------------------------------------
def summary_panel(w: whatif.WhatIf, name: str, fixed: dict[str, Any]) -> str:
    """The strategy's effect in one block: processors, kept set, mass removed (a bar), entropy, the most likely token,
    and the chance of the token the run chose."""
    s = w.summary[w.summary["strategy"] == name].iloc[0]
    vocab = len(w.raw_probs)
    removed = float(s["mass_removed"])
    chain = " → ".join(short_processor(p) for p in s["processors"]) or "none (the raw distribution)"
    run_p = float(s["run_token_prob"])
    fate = "kept" if s["run_token_kept"] else "removed"
    bar = (f"<div class='dlp-massbar' title='kept {100 * (1 - removed):.2f}% of the raw mass'>"
           f"<div style='width:{100 * (1 - removed):.2f}%;background:{FINAL_COLOR}'></div></div>")
    extra = " · ".join(f"{escape(k)}={escape(v)}" for k, v in fixed.items() if k not in _NOT_SHOWN)
    lines = [
        f"<div><b>processors</b>: {escape(chain)}{' · also as the run: ' + extra if extra else ''}</div>",
        f"<div><b>kept</b> {int(s['kept'])} of {vocab} tokens · <b>mass removed</b> {100 * removed:.2f}% {bar}</div>",
        f"<div><b>entropy</b> {format_number(w.raw_entropy)} → {format_number(s['entropy'])} nats · <b>most likely"
        f"</b> now {panels._code(s['top_token'])} (p={format_prob(s['top_prob'])})</div>",
        f"<div><b>the run's token</b> {panels._code(w.run_token)}: {fate}, drawn with p={format_prob(run_p)}</div>",
    ]
    return f"<div class='dlp'>{''.join(lines)}</div>"


def bars_panel(w: whatif.WhatIf, name: str) -> str:
    """The tokens the what-if shows (the model's top candidates, any the strategy lifts into its own top, and the
    run's token), by raw rank: raw and final probability bars, removed tokens struck through."""
    t = w.tokens[w.tokens["strategy"] == name]
    raw = t["raw_prob"].to_numpy(np.float64)
    final = t["final_prob"].to_numpy(np.float64)
    top = float(max(raw.max(initial=0.0), final.max(initial=0.0), 1e-12))
    rows = []
    for x, p, fp in zip(t.itertuples(index=False), raw, final):
        mine = bool(x.run_token)
        cls = " ".join(c for c in ("dlp-chosen" if mine else "", "" if x.kept else "dlp-removed") if c)
        attr = f" class='{cls}'" if cls else ""
        rows.append(
            f"<tr{attr} title='{escape(repr(x.token))} · id {int(x.token_id)}'>"
            f"<td class='num'>{int(x.raw_rank)}</td><td>{panels._code(x.token, 20)}{' ◀ run' if mine else ''}</td>"
            f"{panels._bar(p, top, CHOSEN_RAW_COLOR if mine else RAW_COLOR)}"
            f"{panels._bar(fp, top, CHOSEN_FINAL_COLOR if mine else FINAL_COLOR)}"
            f"<td>{'kept' if x.kept else 'removed'}</td></tr>")
    s = w.summary[w.summary["strategy"] == name].iloc[0]
    shown_kept = int(t["kept"].sum())
    rest = float(1.0 - final[t["kept"].to_numpy(bool)].sum())
    note = ""
    if int(s["kept"]) > shown_kept:
        note = (f"<div class='dlp-note'>{shown_kept} of the {int(s['kept'])} kept tokens shown; the others hold "
                f"{100 * max(rest, 0.0):.2f}% of the final mass</div>")
    head = "<tr><th>raw #</th><th>token</th><th colspan=2>raw p (model)</th><th colspan=2>final p</th><th></th></tr>"
    return f"<div class='dlp'><table>{head}{''.join(rows)}</table>{note}</div>"


def processors_panel(w: whatif.WhatIf, name: str) -> str:
    """Each processor in order: the mass it removed (of the distribution it was given) and the tokens left."""
    p = w.processors[w.processors["strategy"] == name]
    if not len(p):
        return panels.message("no processor acts: the final distribution is the model's")
    rows = "".join(f"<tr><td><code>{escape(short_processor(x.processor))}</code></td>"
                   f"<td class='num'>{100 * x.mass_removed:.2f}%</td><td class='num'>{int(x.kept)}</td></tr>"
                   for x in p.itertuples(index=False))
    head = "<tr><th>processor</th><th>mass removed</th><th>tokens left</th></tr>"
    return f"<div class='dlp'><table>{head}{rows}</table></div>"


# ---- the widget ---------------------------------------------------------------------------------------------------
class Playground(W.VBox):
    """One step of a trace under the sampling knobs; see the module docstring. `view.words()` gives the sliders'
    strategy as `generate`'s words; `view.what_if` the latest answer (a `decoderlab.analysis.whatif.WhatIf`)."""

    NAME = "playground"

    def __init__(self, trace: TraceLike, *, step: int = 0, row: int = 0, lm: "LM | None" = None, k: int = 20):
        whatif.check_step(trace, step, row)  # a clear error for a step or row the trace does not have
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise whatif.WhatIfError(f"k={k!r}: must be a whole number >= 1 (candidates shown)")
        self.trace, self.row, self.lm, self.k = trace, int(row), lm, k
        self._steps = len(trace.alive_steps(row))
        self._pending = not whatif.has_logits(trace)  # the row's forward is still to run (see the module docstring)
        if self._pending and lm is None:
            self._forward_row(trace, row, lm)  # raises the error that says what to pass
        self._logits = None
        self._scheduled = False
        self._base = base_words(trace)
        self._busy = False
        self._what_if: whatif.WhatIf | None = None

        self.style = W.HTML(f"<style>{panels.PANEL_CSS}{PLAYGROUND_CSS}</style>", layout=W.Layout(display="none"))
        self.header = classed(W.HTML(), "dl-playground-header")
        self.step_slider = classed(W.IntSlider(value=0, min=0, max=max(self._steps - 1, 0), description="step",
                                                continuous_update=False, layout=W.Layout(width="420px")),
                                    "dl-playground-step")
        start = slider_values(trace)
        self.sliders: dict[str, W.Widget] = {}
        for word, (label, lo, hi, inc, _) in SLIDER_WORDS.items():
            if word == "top_k":
                s = W.IntSlider(value=int(start[word]), min=int(lo), max=max(int(hi), int(start[word])), step=1)
            else:
                s = W.FloatSlider(value=float(start[word]), min=lo, max=hi, step=inc, readout_format=".2f")
            s.description, s.continuous_update = label, True
            s.layout = W.Layout(width="300px")
            self.sliders[word] = classed(s, f"dl-playground-{word.replace('_', '-')}")
        self.reset_button = classed(W.Button(description="as the run", tooltip="the run's own strategy",
                                              layout=W.Layout(width="110px")), "dl-playground-reset")
        self.summary = classed(W.HTML(), "dl-playground-summary")
        self.bars = classed(W.HTML(), "dl-playground-bars")
        self.processors = classed(W.HTML(), "dl-playground-processors")
        self.problems = classed(W.HTML(), "dl-playground-problems")
        self.progress = classed(W.HTML(), "dl-playground-progress")
        knobs = W.Box(list(self.sliders.values()) + [self.reset_button],
                      layout=W.Layout(display="flex", flex_flow="row wrap", align_items="center"))
        title = lambda text: W.HTML(f"<b>{escape(text)}</b>")  # noqa: E731
        body = W.Box([W.VBox([title("top candidates: raw vs final"), self.bars],
                             layout=W.Layout(flex="1 1 520px", margin="0 12px 8px 0")),
                      W.VBox([title("what the knobs do"), self.summary, title("each processor"), self.processors],
                             layout=W.Layout(flex="1 1 360px"))],
                     layout=W.Layout(display="flex", flex_flow="row wrap", align_items="flex-start", width="100%"))
        super().__init__([self.style, self.header, self.step_slider, knobs, self.progress, self.problems, body],
                         layout=W.Layout(width="100%"))
        self.add_class("dl-playground")
        self.step_slider.observe(self._on_step, names="value")
        for s in self.sliders.values():
            s.observe(self._on_knob, names="value")
        self.reset_button.on_click(lambda _: self.reset())
        self._busy = True
        self.step_slider.value = whatif.check_step(trace, step, row)
        self._busy = False
        if self._pending:
            self._show_pending()
            self._schedule()
        else:
            self._redraw()

    # ---- public -----------------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.step_slider.value)

    def words(self) -> dict[str, Any]:
        """The strategy the sliders show, as `generate`'s words (the run's other processor words included)."""
        return words({w: s.value for w, s in self.sliders.items()}, self._base)

    def set(self, **values: float) -> None:
        """Move several sliders at once (one redraw): `view.set(top_p=0.9, temperature=0.7)`."""
        unknown = set(values) - set(SLIDER_WORDS)
        if unknown:
            raise ValueError(f"unknown slider(s) {sorted(unknown)}: the sliders are {list(SLIDER_WORDS)}")
        self._busy = True
        try:
            for word, value in values.items():
                self.sliders[word].value = value
        finally:
            self._busy = False
        self._redraw()

    def reset(self) -> None:
        """The sliders back to the run's own strategy."""
        self.set(**slider_values(self.trace))

    @property
    def what_if(self) -> whatif.WhatIf | None:
        """The latest answer (None if the last move could not be answered). Waits for the row's forward where it is
        still to run, so that code reads the numbers a displayed playground shows."""
        self.wait()
        return self._what_if

    @property
    def pending(self) -> bool:
        """Whether the row's forward (a trace without recorded logits) is still to run."""
        return self._pending

    def wait(self) -> "Playground":
        """Run the row's forward now if it is still pending, and draw; returns the view. A displayed playground runs
        it by itself once the cell is done; code (and a script, with no event loop) calls this, or reads `what_if`.
        Raises what the forward raised (the widget shows it too)."""
        if self._pending:
            self._fill(raise_errors=True)
        return self

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Shown: make sure the forward is scheduled (a playground made where no loop ran, shown in a kernel)."""
        self._schedule()
        return super()._repr_mimebundle_(**kwargs)

    # ---- drawing ------------------------------------------------------------------------------------------------
    @staticmethod
    def _forward_row(trace: TraceLike, row: int, lm: "LM | None"):
        if lm is None:
            raise whatif.WhatIfError("this trace did not record its logits: pass lm= (the model that made it) for one "
                                     "forward of the row, or record with dl.Record(logits=True)")
        return whatif.row_logits(lm, trace, row)

    def _schedule(self) -> None:
        """Run the forward on the running event loop (the kernel's) just after the current cell; none runs in a
        script or a test, where `wait()` runs it."""
        if not self._pending or self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._scheduled = True
        loop.call_later(FORWARD_DELAY_S, self._fill)

    def _controls(self) -> list[W.Widget]:
        return [self.step_slider, *self.sliders.values(), self.reset_button]

    def _show_pending(self) -> None:
        """The first frame of a playground without logits: the controls greyed, what is being computed, why."""
        for w in self._controls():
            w.disabled = True
        tokens = len(self.trace.prompt_ids) + self._steps
        self.header.value = self._header(None)
        self.progress.value = (
            f"<div class='dlp'><span class='dlp-spinner'></span><b>computing logits…</b> one forward of the model over "
            f"the prompt and the row ({tokens} tokens): this trace did not record them "
            "(<code>Record(logits=True)</code> would). The panels fill in when it is done.</div>")

    def _fill(self, raise_errors: bool = False) -> None:
        """The row's forward, then the panels; an error is shown in the widget (and raised for `wait()`)."""
        if not self._pending:
            return
        self._pending = False  # once, whatever happens
        try:
            self._logits = self._forward_row(self.trace, self.row, self.lm)
        except Exception as err:  # shown, not lost in the kernel log; the controls stay greyed: nothing to answer with
            self.progress.value = ""
            self.header.value = self._header(None)
            self.problems.value = panels.message(f"the logits could not be computed: {type(err).__name__}: {err}",
                                                 "error")
            if raise_errors:
                raise
            return
        self.progress.value = ""
        for w in self._controls():
            w.disabled = False
        self._redraw()

    def _step_logits(self, step: int):
        if self._logits is not None:
            return self._logits[step], "model forward"
        return whatif.step_logits(self.trace, step, self.row)

    def _on_step(self, change) -> None:
        if not self._busy:
            self._redraw()

    def _on_knob(self, change) -> None:
        if not self._busy:
            self._redraw()

    def _redraw(self) -> None:
        """Answer the sliders at the step: one what-if, three panels (while the logits are computed, the header
        only: the panels are drawn when they are in)."""
        step = self.step
        if self._pending:
            self.header.value = self._header(None)
            return
        try:
            logits, source = self._step_logits(step)
            w = whatif.what_if_at(self.trace, step, self.row, logits, source, {self.NAME: self.words()}, lm=self.lm,
                                  top=self.k)
        except (whatif.WhatIfError, ValueError) as err:
            self.problems.value = panels.message(str(err), "error")
            return
        self._what_if = w
        self.problems.value = ""
        self.header.value = self._header(w)
        self.summary.value = summary_panel(w, self.NAME, self._base)
        self.bars.value = bars_panel(w, self.NAME)
        self.processors.value = processors_panel(w, self.NAME)

    def _header(self, w: whatif.WhatIf | None) -> str:
        """The model, the step, its context's tail and the run's token (with its raw chance once the logits are in)."""
        tr = self.trace
        step = self.step if w is None else w.step
        tail = "".join(tr.context_tokens(step, self.row)[-8:])[-48:]
        if w is None:
            token = whatif.token_namer(tr, self.lm)([int(tr.array("token_id")[step, self.row])])[0]
            said = f"chose {panels._code(token)}"
            source = "model forward (computing…)" if self._pending else "none (the forward failed)"
        else:
            said = f"chose {panels._code(w.run_token)} (raw p={format_prob(float(w.raw_probs[w.run_token_id]))})"
            source = w.source
        return (f"<div class='dlp'><b>{escape(tr.model_name)}</b> · row {self.row} · <b>step {step}</b> · after "
                f"{panels._code('…' + tail, 60)} the run ({escape(tr.chooser)}) {said} · logits: "
                f"{escape(source)}</div>")


def playground(trace: TraceLike, *, step: int = 0, row: int = 0, lm: "LM | None" = None, k: int = 20) -> Playground:
    """The sampler playground widget on step `step` of `row` (negative counts from the row's last step); see the
    module docstring. Needs the trace's logits (`Record(logits=True)`) or `lm=` (one forward of the row)."""
    return Playground(trace, step=step, row=row, lm=lm, k=k)
