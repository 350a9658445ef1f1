"""`dl.show(cmp)`: a comparison's runs side by side, aligned by step, each token coloured by probability.

Why this view: a comparison's frames say *that* strategies differ (perplexity, repetition, Self-BLEU);
reading the runs one under another, step k of every run in one column, says *where* and *how*: where
the runs part ways, what each chose there, and what the model offered at that step. Click a token:
that step is outlined in every run and the clicked run's candidates at that step show below; open the
run in the full trace view (`dl.show(cmp.trace(...))`) for everything else.

Why one `ToggleButtons` per run: a click must reach the kernel with stock ipywidgets (no front-end code
of ours), and a ToggleButtons reports the index of the button clicked, so a run's tokens are one widget
(a few dozen widgets for 8 strategies × 5 seeds), not one Button per token (thousands, seconds to open).
Its buttons carry their index (`button[value="12"]`), so the colours, the selected step and the
divergence marks are CSS rules in one <style> per view, scoped to the view by a class: a click rewrites
a style of a few lines, never the runs. Each (model, prompt, seed) choice is built once and kept.

Colours and labels are the trace view's (`kit.token_colour`, `kit.token_title`,
`display.token_label`), the candidates and processors panels are `decoderlab.panels`'.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as W

from . import panels
from .display import CHOSEN_FINAL_COLOR, escape, token_label
from .compare_runs import RunKey, RunLine, divergence_pairs, run_facts, run_keys, run_line
from .kit import classed
from .trace_view import TraceView

if TYPE_CHECKING:
    from ..analysis.compare import Comparison
    from ..trace.trace import Trace

__all__ = ["ComparisonView", "show_comparison", "CSS_CLASSES", "RunKey"]

# The stable selectors, for notebooks that restyle and for browser tests.
CSS_CLASSES = {
    "dl-cmp-view": "the whole comparison view (dl.show(cmp))",
    "dl-cmp-prompt": "the prompt picker (only when the comparison has several prompts)",
    "dl-cmp-model": "the model picker (only when the comparison has several models)",
    "dl-cmp-seed": "the seed picker: one seed, or all seeds (only when runs were sampled with several seeds)",
    "dl-cmp-strategy": "a strategy's toggle: shown or hidden",
    "dl-cmp-grid": "the runs, one line each, step k of every run in one column (scrolls sideways)",
    "dl-cmp-steps": "the step numbers above the runs; click one to select that step",
    "dl-cmp-tokens": "a run's line: its name (hover: length, stop reason, metrics) and its tokens coloured by "
                     "probability; click a token to select its run and step",
    "dl-cmp-divergence": "where the shown runs part ways, and the tokens each chose there",
    "dl-cmp-selected": "the selected run and step, as text",
    "dl-cmp-candidates": "the selected run's top candidates at the selected step (HTML)",
    "dl-cmp-processors": "what each logits processor did at the selected step (HTML)",
    "dl-cmp-open": "open the selected run in the full trace view",
    "dl-cmp-problems": "a panel that could not be drawn, and why (empty when all is well)",
    "dl-cmp-explorer": "where the opened trace view appears",
}

ALL = "all"  # the seed and model pickers' "every one" value
TOKEN_WIDTH = "64px"  # every token button has this width, so that step k of every run is in one column
PART_COLOUR = "#7b3294"  # where a run parts from the others (purple: not on the red-white-blue probability scale)
_VIEW_IDS = itertools.count()

LABEL_WIDTH = "210px"  # the runs' names, kept in view (sticky) while the tokens scroll sideways
# Scoped to one view by its class (`.V`, replaced): a <style> in a notebook applies to the whole page.
VIEW_CSS = """
.V .dl-cmp-grid{overflow-x:auto;padding-bottom:4px}
.V .dl-cmp-tokens,.V .dl-cmp-steps{display:flex;flex-direction:row;align-items:center;width:max-content;margin:0}
.V .dl-cmp-tokens>label,.V .dl-cmp-steps>label{position:sticky;left:0;z-index:2;background:var(--jp-layout-color0,#fff);
 overflow:hidden;white-space:nowrap;text-overflow:ellipsis;text-align:left;font-size:12px;margin:0 4px 0 0;flex:none}
.V .dl-cmp-tokens>div,.V .dl-cmp-steps>div{display:flex;flex-wrap:nowrap}
.V .dl-cmp-tokens button,.V .dl-cmp-steps button{height:24px;line-height:24px;margin:1px;padding:0 3px;font-size:13px;
 flex:none;box-shadow:none}
.V .dl-cmp-steps button{font-size:11px;color:#555;background:transparent}
"""


@dataclass
class Slot:
    """One line of the grid (one widget: the run's name is its description), reused for whichever run it shows."""

    tokens: W.ToggleButtons
    key: RunKey | None = None


def _close_all(widget: W.Widget) -> None:
    """Close a widget and everything inside it (their front-end models are freed)."""
    for child in getattr(widget, "children", ()):
        _close_all(child)
    widget.close()


class ComparisonView(W.VBox):
    """A comparison's runs side by side: pick the prompt, the model, the seed (or all seeds) and the
    strategies shown; click a token to select its run and step (that step is outlined in every run, and
    the run's candidates and processors at that step show below); open the selected run in the trace view.

    The same actions from code: `select(step, run=None)`, `open_trace()`, and the pickers' `.value`.
    """

    def __init__(self, cmp: "Comparison", *, prompt: str | None = None, seed: int | str | None = None,
                 model: str | None = None, strategies: list[str] | None = None, k: int = 12):
        self.cmp, self.k = cmp, k
        runs = cmp.runs
        self._keys = run_keys(runs)
        self._facts = {key: run_facts(r) for key, r in zip(self._keys, runs.itertuples(index=False))}
        self._pairs = divergence_pairs(cmp.divergence)
        self._traces: dict[RunKey, "Trace"] = {}
        self._lines: dict[RunKey, RunLine] = {}
        self._panels: dict[tuple, str] = {}
        self._slots: list[Slot] = []
        self._busy = False
        self._run: RunKey | None = None
        self._step = 0
        self._shown: list[RunKey] = []
        self._view_class = f"dl-cmp-v{next(_VIEW_IDS)}"
        # every line shares one style and one layout: a line is one widget
        self._line_style = W.ToggleButtonsStyle(button_width=TOKEN_WIDTH, description_width=LABEL_WIDTH)
        self._line_layout = W.Layout(width="max-content")

        self.prompt_picker = self._picker("prompt", self._prompt_options(), "dl-cmp-prompt")
        self.model_picker = self._picker("model", self._model_options(), "dl-cmp-model")
        self.seed_picker = self._picker("seed", self._seed_options(), "dl-cmp-seed")
        self.strategy_buttons = {name: classed(W.ToggleButton(value=True, description=name, tooltip=f"show {name}",
                                                               layout=W.Layout(width="auto")), "dl-cmp-strategy")
                                 for name in cmp.strategies}
        self._choose(prompt, seed, model, strategies)

        self.style = W.HTML(layout=W.Layout(display="none"))  # the view's sheet, the colours of the runs shown
        self.selection_style = W.HTML(layout=W.Layout(display="none"))  # the selected step and run
        self.steps_header = classed(W.ToggleButtons(options=[], index=None, description="step",
                                                     style=self._line_style, layout=self._line_layout), "dl-cmp-steps")
        self.steps_header.observe(self._on_step_header, names="index")
        self.grid = classed(W.VBox([self.steps_header], layout=W.Layout(width="100%")), "dl-cmp-grid")
        self.divergence = classed(W.HTML(), "dl-cmp-divergence")
        self.selected = classed(W.HTML(), "dl-cmp-selected")
        self.candidates = classed(W.HTML(), "dl-cmp-candidates")
        self.processors = classed(W.HTML(), "dl-cmp-processors")
        self.problems = classed(W.HTML(), "dl-cmp-problems")
        self.open_button = classed(W.Button(description="open in the trace view", icon="search",
                                             tooltip="the selected run in dl.show: every frame of it, step by step",
                                             layout=W.Layout(width="auto")), "dl-cmp-open")
        self.open_button.on_click(lambda _: self.open_trace())
        self.explorer = classed(W.VBox(layout=W.Layout(width="100%")), "dl-cmp-explorer")

        pickers = W.HBox([p for p in (self.prompt_picker, self.model_picker, self.seed_picker)
                          if len(p.options) > 1], layout=W.Layout(flex_flow="row wrap", align_items="center"))
        toggles = W.HBox([W.HTML("<b style='font-size:12px'>strategies:</b>", layout=W.Layout(margin="0 6px 0 0")),
                          *self.strategy_buttons.values()], layout=W.Layout(flex_flow="row wrap", align_items="center"))
        legend = W.HTML("<div style='font-size:12px;color:#555'>colour: the token's probability under the model "
                        "(red 0, white 0.5, blue 1); <span style='border-left:4px solid "
                        f"{PART_COLOUR};padding-left:3px'>bar</span>: where a run parts from every other run shown; "
                        "click a token for its step in every run and its candidates</div>")
        title = lambda text: W.HTML(f"<b>{escape(text)}</b>")  # noqa: E731
        details = W.Box([W.VBox([title("candidates at this step"), self.candidates],
                                layout=W.Layout(flex="1 1 480px", margin="0 12px 8px 0")),
                         W.VBox([title("what each processor did"), self.processors],
                                layout=W.Layout(flex="1 1 380px"))],
                        layout=W.Layout(display="flex", flex_flow="row wrap", width="100%", align_items="flex-start"))
        super().__init__([self.style, self.selection_style, pickers, toggles, legend, self.grid, self.divergence,
                          W.HBox([self.selected, self.open_button], layout=W.Layout(align_items="center")),
                          self.problems, details, self.explorer], layout=W.Layout(width="100%"))
        classed(self, "dl-cmp-view", self._view_class)
        for picker in (self.prompt_picker, self.model_picker, self.seed_picker):
            picker.observe(self._on_pick, names="value")
        for button in self.strategy_buttons.values():
            button.observe(self._on_pick, names="value")
        self._show_runs()

    # ---- public ----------------------------------------------------------------------------------------
    @property
    def runs_shown(self) -> list[RunKey]:
        """The runs on screen, top to bottom."""
        return list(self._shown)

    @property
    def run(self) -> RunKey | None:
        """The selected run."""
        return self._run

    @property
    def step(self) -> int:
        """The selected step."""
        return self._step

    def trace(self, run: RunKey) -> "Trace":
        """A run's trace (`cmp.trace`), kept: its frames are built once."""
        if run not in self._traces:
            self._traces[run] = self.cmp.trace(run.strategy, seed=run.seed, prompt=run.prompt, model=run.model)
        return self._traces[run]

    def select(self, step: int, run: RunKey | None = None) -> None:
        """Select `step` of `run` (default: the selected run): outline that step in every run shown, and show
        the run's candidates and processors there."""
        run = self._run if run is None else run
        if run not in self._shown:
            raise KeyError(f"run {run} is not shown; shown: {self._shown}")
        if not 0 <= step < max(1, self._max_steps()):
            raise IndexError(f"step {step} is outside the shown runs' 0–{self._max_steps() - 1}")
        self._run, self._step = run, int(step)
        self._draw_selection()

    def open_trace(self) -> TraceView:
        """Open the selected run in the full trace view (below the comparison), at the selected step."""
        tr = self.trace(self._run)
        step = min(self._step, tr.num_steps - 1) if tr.num_steps else None
        view = TraceView(tr, step=step)
        old = self.explorer.children
        self.explorer.children = [W.HTML(f"<b>{escape(self._label(self._run))}</b> in the trace view"), view]
        for w in old:
            _close_all(w)
        return view

    # ---- the pickers --------------------------------------------------------------------------------
    def _picker(self, what: str, options: list, css: str) -> W.Dropdown:
        return classed(W.Dropdown(options=options, description=what, layout=W.Layout(width="auto", max_width="520px")),
                        css)

    def _prompt_options(self) -> list[tuple[str, int]]:
        def short(p: str) -> str:
            p = " ".join(p.split())
            return p if len(p) <= 70 else p[:69] + "…"
        return [(short(p), i) for i, p in enumerate(self.cmp.prompts)]

    def _model_options(self) -> list[tuple[str, Any]]:
        models = list(self.cmp.models)
        return [(m, m) for m in models] if len(models) < 2 else [("all models", ALL)] + [(m, m) for m in models]

    def _seed_options(self) -> list[tuple[str, Any]]:
        seeds = list(dict.fromkeys(k.seed for k in self._keys if k.seed is not None))
        if not seeds:
            return [("–", None)]
        return [(f"seed {s}", s) for s in seeds] + ([("all seeds", ALL)] if len(seeds) > 1 else [])

    def _choose(self, prompt: str | None, seed: Any, model: str | None, strategies: list[str] | None) -> None:
        """The first view asked for, with clear errors naming what is allowed."""
        if prompt is not None:
            if prompt not in self.cmp.prompts:
                raise ValueError(f"prompt={prompt!r} is not one of the comparison's prompts: {self.cmp.prompts}")
            self.prompt_picker.value = self.cmp.prompts.index(prompt)
        for value, picker, word in ((seed, self.seed_picker, "seed"), (model, self.model_picker, "model")):
            if value is None:
                continue
            allowed = [v for _, v in picker.options]
            if value not in allowed:
                raise ValueError(f"{word}={value!r} is not in this comparison; allowed: {allowed}")
            picker.value = value
        if strategies is not None:
            unknown = [s for s in strategies if s not in self.strategy_buttons]
            if unknown:
                raise ValueError(f"strategies={unknown!r} are not in this comparison: {list(self.strategy_buttons)}")
            for name, button in self.strategy_buttons.items():
                button.value = name in strategies

    def _chosen_runs(self) -> list[RunKey]:
        """The runs the pickers name: for each strategy shown (and model), its run with the seed picked, or its
        one run where it does not sample; every run with "all seeds"."""
        prompt = self.cmp.prompts[self.prompt_picker.value]
        model, seed = self.model_picker.value, self.seed_picker.value
        shown = [n for n, b in self.strategy_buttons.items() if b.value]
        mine = [k for k in self._keys if k.prompt == prompt and (model == ALL or k.model == model)]
        models = list(dict.fromkeys(k.model for k in mine))
        out = []
        for name in shown:
            for m in models:
                runs = [k for k in mine if k.strategy == name and k.model == m]
                picked = [k for k in runs if seed == ALL or k.seed == seed]
                out += picked or (runs if len(runs) == 1 else [])
        return out

    # ---- drawing --------------------------------------------------------------------------------------
    def _label(self, run: RunKey) -> str:
        several_models = len(self.model_picker.options) > 1
        name = f"{run.model} · {run.strategy}" if several_models else run.strategy
        return name if run.seed is None else f"{name} · seed {run.seed}"

    def _line(self, run: RunKey) -> RunLine:
        if run not in self._lines:
            self._lines[run] = run_line(self.trace(run), self._facts[run])
        return self._lines[run]

    def _slot(self, i: int) -> Slot:
        while len(self._slots) <= i:
            tokens = classed(W.ToggleButtons(options=[], index=None, style=self._line_style, layout=self._line_layout),
                              "dl-cmp-tokens", f"dl-cmp-r{len(self._slots)}")
            slot = Slot(tokens)
            tokens.observe(lambda change, slot=slot: self._on_token(slot, change), names="index")
            self._slots.append(slot)
        return self._slots[i]

    def _max_steps(self) -> int:
        return max((len(self._line(k).options) for k in self._shown), default=0)

    def _show_runs(self) -> None:
        """Put the chosen runs on the grid (lines reused, rewritten only where the run changed), colour them,
        mark where they part, and keep the selection where it can stay."""
        self._shown = self._chosen_runs()
        self._busy = True
        try:
            for i, key in enumerate(self._shown):
                slot, line = self._slot(i), self._line(key)
                if slot.key != key:
                    with slot.tokens.hold_sync():
                        slot.tokens.options, slot.tokens.tooltips = line.options, line.tooltips
                    slot.key = key
            n = self._max_steps()
            if len(self.steps_header.options) != n:
                with self.steps_header.hold_sync():
                    self.steps_header.options = [(str(j), j) for j in range(n)]
                    self.steps_header.tooltips = [f"step {j}: select it in every run" for j in range(n)]
        finally:
            self._busy = False
        first, parts = self._parting()
        for i, key in enumerate(self._shown):
            tokens = self._slots[i].tokens
            tokens.description, tokens.tooltip = self._label(key), self._facts_with_parting(key, parts[key])
        self.grid.children = [self.steps_header] + [self._slots[i].tokens for i in range(len(self._shown))]
        self.style.value = f"<style>{self._colour_css(first, parts)}</style>"
        self.divergence.value = self._divergence_html(first)
        self._keep_selection()
        self._draw_selection()

    def _keep_selection(self) -> None:
        """The same run if shown, else its strategy and seed on the prompt shown, else its strategy's first run,
        else the first run; the step clamped."""
        shown, run = self._shown, self._run
        if run not in shown:
            like = [k for k in shown if run is not None and (k.model, k.strategy, k.seed) == (run.model, run.strategy,
                                                                                            run.seed)]
            same = [k for k in shown if run is not None and k.strategy == run.strategy]
            self._run = (like or same or shown or [None])[0]
        if self._run is not None:
            self._step = min(self._step, max(len(self._line(self._run).options) - 1, 0))

    def _parting(self) -> tuple[int | None, dict[RunKey, tuple[int | None, RunKey | None]]]:
        """For the runs shown, from `cmp.divergence`: the step where they first part (None: they never do), and
        per run the step from which it differs from every other run shown, with the run it stays with longest
        (step None: another run has the same tokens, or runs on past its end)."""
        shown, pairs = self._shown, self._pairs
        out: dict[RunKey, tuple[int | None, RunKey | None]] = {}
        firsts = []
        for a in shown:
            others = [(pairs.get((a, b), None), b) for b in shown if b != a]
            firsts += [f for f, _ in others if f is not None]
            if not others or any(f is None for f, _ in others):
                same = next((b for f, b in others if f is None), None)
                out[a] = (None, same)
            else:
                out[a] = max(others, key=lambda fb: fb[0])
        return (min(firsts) if firsts else None), out

    def _facts_with_parting(self, run: RunKey, part: tuple[int | None, RunKey | None]) -> str:
        """A run's hover text: its facts, and from which step it is on its own."""
        facts = f"{self._label(run)}: {self._line(run).facts}"
        own, nearest = part
        if own is not None:
            facts += f" · its own from step {own} (with {self._label(nearest)} until then)"
        elif nearest is not None:
            facts += f" · no step of its own: {self._label(nearest)} has the same tokens (or runs on past its end)"
        return facts

    def _colour_css(self, first: int | None, parts: dict[RunKey, tuple[int | None, RunKey | None]]) -> str:
        """The view's sheet: each shown run's tokens by colour, each run's parting step, the step where the shown
        runs first part."""
        v = f".{self._view_class}"
        rules = [VIEW_CSS.replace(".V", v)]
        for i, key in enumerate(self._shown):
            r = f"{v} .dl-cmp-r{i}"
            for colour, steps in self._line(key).colours:
                rules.append(",".join(f"{r} button[value='{s}']" for s in steps) + f"{{background:{colour}}}")
            own = parts[key][0]
            if own is not None:
                rules.append(f"{r} button[value='{own}']{{box-shadow:inset 4px 0 0 {PART_COLOUR}}}")
        if first is not None:
            rules.append(f"{v} .dl-cmp-steps button[value='{first}']{{background:{PART_COLOUR};color:#fff}}")
        return "\n".join(rules)

    def _divergence_html(self, first: int | None) -> str:
        """Where the runs shown part, and the token each chose there."""
        shown = self._shown
        if len(shown) < 2:
            return panels.message("fewer than two runs shown: pick more strategies, or all seeds, to see where "
                                  "runs part")
        if first is None:
            return panels.message(f"the {len(shown)} runs shown never part (each is the same as, or a prefix of, "
                                  "the others)")
        by_token: dict[str, list[str]] = {}
        for key in shown:
            tokens = self._line(key).tokens
            tok = escape(token_label(tokens[first], 16)) if first < len(tokens) else "(ended)"
            by_token.setdefault(tok, []).append(escape(self._label(key)))
        chosen = " · ".join(f"<code>{tok}</code>: {', '.join(names)}" for tok, names in by_token.items())
        agree = f"agree on steps 0–{first - 1} and " if first > 0 else ""
        return (f"<div class='dlp'>The {len(shown)} runs shown {agree}part ways at "
                f"<b style='color:{PART_COLOUR}'>step {first}</b>: {chosen}</div>")

    def _draw_selection(self) -> None:
        """Outline the selected step in every run, the selected run's token more, and show its panels."""
        run, s, v = self._run, self._step, f".{self._view_class}"
        if run is None:
            self.selection_style.value = ""
            self.selected.value = panels.message("no run shown: pick a strategy")
            self.candidates.value = self.processors.value = ""
            self.open_button.disabled = True
            return
        i = self._shown.index(run)
        self.selection_style.value = (
            f"<style>{v} .dl-cmp-tokens button[value='{s}'],{v} .dl-cmp-steps button[value='{s}']"
            f"{{outline:2px solid #222;outline-offset:-2px}}"
            f"{v} .dl-cmp-r{i} button[value='{s}']{{outline:3px solid {CHOSEN_FINAL_COLOR};outline-offset:-3px}}"
            f"{v} .dl-cmp-r{i}>label{{font-weight:700}}</style>")
        tr = self.trace(run)
        self.open_button.disabled = False
        self.problems.value = ""
        if s >= tr.num_steps:
            self.selected.value = (f"<div class='dlp'><b>{escape(self._label(run))}</b> · step {s}: this run ended "
                                   f"after {tr.num_steps} tokens (stop: {escape(tr.runs['stop_reason'][0])})</div>")
            self.candidates.value = self.processors.value = ""
            return
        token = self._line(run).tokens[s]
        self.selected.value = (f"<div class='dlp'><b>{escape(self._label(run))}</b> · step {s}: "
                               f"<code>{escape(token_label(token, 32))}</code></div>")
        self.candidates.value = self._panel(("candidates", run, s),
                                            lambda: panels.candidates_panel(tr, s, row=0, k=self.k))
        self.processors.value = self._panel(("processors", run, s), lambda: panels.processors_panel(tr, s, row=0))

    def _panel(self, key: tuple, make: Callable[[], str]) -> str:
        """A panel's HTML, made once per (panel, run, step); one that fails is reported in `problems`."""
        if key not in self._panels:
            try:
                self._panels[key] = make()
            except Exception as err:  # one broken panel must not break the view
                self.problems.value += panels.message(f"{key[0]}: {type(err).__name__}: {err}", "error")
                return ""
        return self._panels[key]

    # ---- events ----------------------------------------------------------------------------------------
    def _on_pick(self, change) -> None:
        if not self._busy:
            self._show_runs()

    def _on_token(self, slot: Slot, change) -> None:
        """A token clicked: select its run and step, and let go of the button (the outline is the selection)."""
        if self._busy or change["new"] is None:
            return
        self._busy = True
        try:
            slot.tokens.index = None
        finally:
            self._busy = False
        self.select(int(change["new"]), slot.key)

    def _on_step_header(self, change) -> None:
        if self._busy or change["new"] is None:
            return
        self._busy = True
        try:
            self.steps_header.index = None
        finally:
            self._busy = False
        self.select(int(change["new"]))


def show_comparison(cmp: "Comparison", *, prompt: str | None = None, seed: int | str | None = None,
                    model: str | None = None, strategies: list[str] | None = None, k: int = 12) -> ComparisonView:
    """The runs of a comparison side by side, aligned by step, coloured by probability (`dl.show(cmp)`).

    `prompt`, `seed` (or "all"), `model` (or "all") and `strategies` choose the first view (the pickers change
    it); `k`: candidates listed for the selected step."""
    return ComparisonView(cmp, prompt=prompt, seed=seed, model=model, strategies=strategies, k=k)
