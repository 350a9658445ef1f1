"""Where two engines part, drawn (`forks.show()`, `forks.to_html()`): every prompt's fork and its kind, and the fork
step side by side: what each engine offered there, what float64 says, and where each run went after.

Why side by side: a fork is a question about one step, answered by reading both engines' candidates at once: two
tokens a hair apart on both sides and in float64 (a near-tie), or a choice one side's processors moved, or two
prompts that were never the same. The numbers are `Forks.frame` and `Forks.side_by_side`; this shows them.

Why HTML in stock ipywidgets 8: it renders in JupyterLab, Notebook 7, VS Code and Voilà with no front-end code of
ours. A prompt is picked with a dropdown; its panel is built once (a few milliseconds) and kept, and the summary
table's selected row is a one-line <style>, so a pick is answered at once. Each engine's trace opens in the trace
view (`dl-forks-open-a`/`-b`) at the fork step.

Every part carries a CSS class: `dl-forks-...` in the widget (`CSS_CLASSES`), `dlf-...` inside the panels and the
static page, which holds no JavaScript, carries the trace page's Content-Security-Policy, and escapes every string
from the model, the tokenizer or the user (`display.escape`).
"""
from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from .display import (TABLE_CSS, escape, format_number, format_prob, format_rank, is_missing, prefixed, token_label,
                      visible_text)
from .html import CSP, PAGE_CSS
from .kit import classed

if TYPE_CHECKING:
    from ..analysis.forks import Forks

__all__ = ["ForksView", "show_forks", "forks_html", "fork_panel", "summary_table", "CSS_CLASSES", "FORKS_CSS"]

CSS_CLASSES = {
    "dl-forks-view": "the whole forks view (forks.show())",
    "dl-forks-header": "the two engines, and how many prompts forked of each kind",
    "dl-forks-prompt": "the prompt picker (each option: the kind of its fork, the step, the prompt)",
    "dl-forks-table": "every prompt in one table: forked or not, where, the two tokens, the gaps, the kind (HTML)",
    "dl-forks-style": "the selected prompt's row marked in the table (a one-line style)",
    "dl-forks-step": "the selected prompt's fork step side by side: the common prefix, the two tokens, each "
                     "engine's and float64's candidates, and where each run went after (HTML)",
    "dl-forks-open-a": "open engine a's trace in the trace view, at the fork step",
    "dl-forks-open-b": "open engine b's trace in the trace view, at the fork step",
    "dl-forks-trace": "where the opened trace view appears",
}

COLOURS = {"a": "#3182bd", "b": "#e6550d", "float64": "#636363"}  # engine a, engine b, the float64 re-run
KIND_COLOURS = {"same": "#e5f5e0", "near-tie": "#deebf7", "real": "#fee0d2"}
_VIEW_IDS = itertools.count()

FORKS_CSS = prefixed(TABLE_CSS, "dlf") + """
.dlf-box code,.dlf-tok{font:12px var(--jp-code-font-family, ui-monospace, monospace);white-space:pre}
.dlf-kind{display:inline-block;border-radius:3px;padding:0 5px;font-weight:600}
.dlf-why{color:#333;margin:2px 0 6px;max-width:70em}
.dlf-prefix{white-space:pre-wrap;word-break:break-word;font:12px/1.9 var(--jp-code-font-family, monospace);
  background:#f6f6f6;border-radius:3px;padding:2px 4px;max-width:70em}
.dlf-fork{display:inline-block;border:2px solid;border-radius:3px;padding:0 3px;margin:0 2px;font-weight:700}
.dlf-bar{height:9px;border-radius:2px;min-width:1px}
.dlf-track{width:80px}
.dlf-chosen td{font-weight:700}
.dlf-pick{outline:2px solid #636363;outline-offset:-2px}
.dlf-after{white-space:pre-wrap;word-break:break-word;max-width:60em}
.dlf-note{color:#666}
.dlf-row td{cursor:default}
"""


# ---- the parts ------------------------------------------------------------------------------------------------
def kind_badge(kind: str) -> str:
    """A fork's kind as a coloured label: green for the same path, blue for a near-tie, red for a real difference."""
    colour = KIND_COLOURS.get("real" if kind.startswith("real") else kind.split(" ")[0], "#eee")
    return f'<span class="dlf-kind" style="background:{colour}">{escape(kind)}</span>'


def _tok(text: Any, width: int = 24) -> str:
    """A token as a short visible label in code type; '–' where there is none (a prompt that did not fork)."""
    if not isinstance(text, str):
        return "–"
    return f'<code class="dlf-tok">{escape(token_label(text, width))}</code>'


def summary_table(forks: "Forks") -> str:
    """Every prompt in one table (`forks.frame`): where the runs part, the two tokens, each side's top-2 gap, the
    engines' measured difference, float64's pick and the kind. Row i carries `data-i` for the selection's style."""
    rows = []
    for i, r in enumerate(forks.frame.itertuples(index=False)):
        step = "–" if is_missing(r.fork_step) else str(int(r.fork_step))
        rows.append(
            f'<tr class="dlf-row" data-i="{i}"><td class="dlf-num">{i}</td>'
            f"<td>{escape(token_label(r.prompt.replace(chr(10), ' '), 48))}</td><td>{kind_badge(r.kind)}</td>"
            f'<td class="dlf-num">{step}</td><td>{_tok(r.token_a)} · {_tok(r.token_b)}</td>'
            f'<td class="dlf-num">{format_number(r.gap_a, 3)} · {format_number(r.gap_b, 3)}</td>'
            f'<td class="dlf-num">{format_number(r.delta, 3)}</td><td>{_tok(r.float64_token)}</td></tr>')
    head = ("<tr><th>#</th><th>prompt</th><th>kind</th><th>fork step</th><th>token a · b</th>"
            "<th>top-2 gap a · b</th><th>engines differ by</th><th>float64 picks</th></tr>")
    return f'<div class="dlf-box"><table>{head}{"".join(rows)}</table></div>'


def _bar(lp: float, top: float, colour: str) -> str:
    """A logprob as a probability bar (as wide as the table's likeliest token is full) and its number."""
    p = 0.0 if is_missing(lp) else math.exp(lp)
    return (f'<td class="dlf-track"><div class="dlf-bar" style="width:{100 * min(p / top, 1):.1f}%;'
            f'background:{colour}"></div></td><td class="dlf-num" title="p={format_prob(p)}">{format_number(lp, 3)}'
            "</td>")


def _side_table(forks: "Forks", i: int, top: int) -> str:
    frame = forks.side_by_side(i).head(top)
    f64 = bool(frame["logprob_float64"].notna().any())
    most = max(math.exp(frame[c].max()) for c in ("logprob_a", "logprob_b", "logprob_float64")
               if frame[c].notna().any())
    head = (f"<tr><th>token</th><th colspan=3>a: {escape(forks.names[0])}</th><th colspan=3>b: "
            f"{escape(forks.names[1])}</th>" + ("<th colspan=3>float64</th>" if f64 else "") + "</tr>"
            "<tr><th></th>" + "<th>rank</th><th colspan=2>logprob</th>" * (3 if f64 else 2) + "</tr>")
    rows = []
    for r in frame.itertuples(index=False):
        marks = (" ◀a" if r.chosen_a else "") + (" ◀b" if r.chosen_b else "") + (" ★" if r.float64_pick else "")
        cells = [f'<td class="dlf-num">{format_rank(r.rank_a)}</td>{_bar(r.logprob_a, most, COLOURS["a"])}',
                 f'<td class="dlf-num">{format_rank(r.rank_b)}</td>{_bar(r.logprob_b, most, COLOURS["b"])}']
        if f64:
            cells.append(f'<td class="dlf-num">{format_rank(r.rank_float64)}</td>'
                         f'{_bar(r.logprob_float64, most, COLOURS["float64"])}')
        cls = " dlf-chosen" if r.chosen_a or r.chosen_b else ""
        rows.append(f'<tr class="dlf-cand{cls}"><td>{_tok(r.token, 28)}{escape(marks)}</td>{"".join(cells)}</tr>')
    note = ('<div class="dlf-note">◀a, ◀b: the token each engine chose · ★ float64\'s pick · logprob: '
            f'{escape(forks.frame["scores"].iat[i])}; bars: probability, the likeliest in the table full</div>')
    return f'<table class="dlf-side">{head}{"".join(rows)}</table>{note}'


def fork_panel(forks: "Forks", i: int, *, context: int = 40, top: int = 12) -> str:
    """Prompt i as HTML: its kind and why; the last `context` tokens of the common prefix and the two tokens where
    the runs part; both engines' and float64's candidates at that step (`top` rows); and each run after it."""
    r = forks.frame.iloc[i]
    ta, tb = forks.traces(i)
    parts = [f'<div class="dlf-box"><div>{kind_badge(r["kind"])} · prompt {i}: '
             f'<code>{escape(token_label(r["prompt"].replace(chr(10), " "), 80))}</code></div>'
             f'<div class="dlf-why">{escape(r["why"])}</div>']
    if not r["forked"]:
        parts.append(f'<div class="dlf-prefix">{escape(visible_text(ta.text))}</div></div>')
        return "".join(parts)
    k = int(r["fork_step"])
    shared = ta.tokens[:k]
    cut = f'<span class="dlf-note">… {k - context} tokens …</span>' if k > context else ""
    fork = "".join(f'<span class="dlf-fork" style="border-color:{COLOURS[s]}" title="engine {s}">'
                   f"{escape(visible_text(str(r['token_' + s])))}</span>" for s in "ab")
    parts.append(f'<div><b>step {k}</b> · after {k} shared tokens · a chose {_tok(r["token_a"])} '
                 f'(logprob {format_number(r["logprob_a"], 3)}), b chose {_tok(r["token_b"])} '
                 f'(logprob {format_number(r["logprob_b"], 3)}) · engines differ by up to '
                 f'{format_number(r["delta"], 3)} nats (tolerance {format_number(r["tolerance"], 3)})'
                 + (f' · float64 picks {_tok(r["float64_token"])}, top-2 gap {format_number(r["float64_gap"], 4)}'
                    if not is_missing(r["float64_token"]) else "") + "</div>")
    prompt = "" if k > context else f'<span class="dlf-note">{escape(visible_text(ta.prompt[-160:]))}</span>'
    parts.append(f'<div class="dlf-prefix">{prompt}{cut}{escape(visible_text("".join(shared[-context:])))}{fork}</div>')
    parts.append(_side_table(forks, i, top))
    after = "".join(f'<tr><td style="color:{COLOURS[s]}"><b>{s}</b></td><td class="dlf-after">'
                    f'{escape(visible_text("".join(t.tokens[k:])))}</td></tr>' for s, t in (("a", ta), ("b", tb)))
    parts.append(f"<table><tr><th></th><th>from the fork on</th></tr>{after}</table></div>")
    return "".join(parts)


def _counts(forks: "Forks") -> str:
    counts = forks.frame["kind"].value_counts()
    return ", ".join(f"{int(n)} {kind}" for kind, n in counts.items()) or "no prompts"


# ---- the static page ------------------------------------------------------------------------------------------
def forks_html(forks: "Forks") -> str:
    """One self-contained page, no JavaScript: the engines, every prompt in one table, and each prompt's fork step
    side by side."""
    meta = [("engine a", forks.names[0]), ("engine b", forks.names[1]), ("prompts", f"{len(forks)}: {_counts(forks)}"),
            ("float64 reference", forks.reference or "none")]
    body = ["<h1>decoderlab · where two engines part</h1>", '<dl class="dlh-meta">']
    body += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in meta]
    body += ["</dl>", "<h2>Prompts</h2>", summary_table(forks)]
    body += [f"<h2>Prompt {i}</h2>{fork_panel(forks, i)}" for i in range(len(forks))]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>decoderlab · forks · {escape(forks.names[0])} vs {escape(forks.names[1])}</title>"
            f"<style>{PAGE_CSS}{FORKS_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---- the widget -----------------------------------------------------------------------------------------------
class ForksView(W.VBox):
    """Two engines over many prompts in Jupyter: a table of every prompt, a prompt picker, and the picked prompt's
    fork step side by side; buttons open each engine's trace at the fork. `view.select(i)` picks from code."""

    def __init__(self, forks: "Forks", *, prompt: int | None = None, top: int = 12):
        if not len(forks):
            raise ValueError("this Forks holds no prompts (it was interrupted before the first): nothing to show")
        self.forks, self.top = forks, top
        self._panels: dict[int, str] = {}
        self._selected = -1
        self._view_class = f"dl-forks-v{next(_VIEW_IDS)}"
        f = forks.frame
        self.header = classed(W.HTML(f"<b>a</b>: {escape(forks.names[0])} · <b>b</b>: {escape(forks.names[1])} · "
                                     f"{len(forks)} prompts: {escape(_counts(forks))}"), "dl-forks-header")
        options = [(f"{i} · {r.kind}" + ("" if is_missing(r.fork_step) else f" at step {int(r.fork_step)}")
                    + f" · {token_label(r.prompt.replace(chr(10), ' '), 48)}", i)
                   for i, r in enumerate(f.itertuples())]
        self.picker = classed(W.Dropdown(options=options, description="prompt", layout=W.Layout(width="640px")),
                              "dl-forks-prompt")
        self.table = classed(W.HTML(summary_table(forks)), "dl-forks-table")
        self.style = classed(W.HTML(layout=W.Layout(display="none")), "dl-forks-style")
        self.panel = classed(W.HTML(), "dl-forks-step")
        self.open_a = classed(W.Button(description="open a's trace", layout=W.Layout(width="auto")), "dl-forks-open-a")
        self.open_b = classed(W.Button(description="open b's trace", layout=W.Layout(width="auto")), "dl-forks-open-b")
        self.trace_box = classed(W.VBox(layout=W.Layout(width="100%")), "dl-forks-trace")
        sheet = W.HTML(f"<style>{FORKS_CSS}</style>", layout=W.Layout(display="none"))
        super().__init__([sheet, self.style, self.header, self.table, self.picker, self.panel,
                          W.HBox([self.open_a, self.open_b]), self.trace_box], layout=W.Layout(width="100%"))
        classed(self, "dl-forks-view", self._view_class)
        self.picker.observe(lambda ch: self.select(ch["new"]), names="value")
        self.open_a.on_click(lambda _: self.open_trace("a"))
        self.open_b.on_click(lambda _: self.open_trace("b"))
        forked = [i for i, x in enumerate(f["forked"]) if x]
        self.select(prompt if prompt is not None else (forked[0] if forked else 0))

    @property
    def selected(self) -> int:
        """The prompt shown."""
        return self._selected

    def select(self, i: int) -> None:
        """Show prompt `i` (its position in `forks.frame`)."""
        i = self.forks.index(i)
        if i == self._selected:
            return
        self._selected = i
        if self.picker.value != i:
            self.picker.value = i  # -> observe -> select(i): returns at once
        panel = self._panels.get(i)
        if panel is None:
            panel = self._panels[i] = fork_panel(self.forks, i, top=self.top)
        self.panel.value = panel
        self.style.value = (f'<style>.{self._view_class} .dlf-row[data-i="{i}"] td{{background:#fff3e0;'
                            "font-weight:600}</style>")
        self.trace_box.children = ()

    def open_trace(self, side: str) -> Any:
        """Open engine `side`'s ("a" or "b") trace of the shown prompt in the trace view, at the fork step."""
        from .trace_view import TraceView

        trace = self.forks.traces(self._selected)["ab".index(side)]
        step = self.forks.frame["fork_step"].iat[self._selected]
        at = None if is_missing(step) or int(step) >= trace.num_steps else int(step)
        view = TraceView(trace, step=at)
        self.trace_box.children = (W.HTML(f"<b>{side}</b>: {escape(self.forks.names['ab'.index(side)])}"), view)
        return view


def show_forks(forks: "Forks", **kwargs: Any) -> ForksView:
    """The forks widget (`forks.show()`): see `ForksView`."""
    return ForksView(forks, **kwargs)
