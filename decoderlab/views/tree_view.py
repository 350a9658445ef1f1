"""A sample tree drawn (`tree.show()`, `tree.to_html()`): n runs of one prompt as one tree whose branches are as
wide as the runs that take them, each token coloured by the probability the model gave it.

Why a drawing: the tree's frames (`SampleTree.nodes`, `where_they_part`) hold every number, but where runs part
and how unevenly is a question of shape. The tree runs left to right, one column per generated token, so splits
at the same step line up; the branch most runs take at a split goes straight on, the others fan out below it.
Chains of nodes that the same runs share are drawn as one edge with one label (`SampleTree.segments`), so that
64 runs of 32 tokens stay a few dozen labelled edges. Hovering an edge gives its full text and numbers (an SVG
<title>: no script).

Why inline SVG in stock ipywidgets 8: it renders in JupyterLab, Notebook 7, VS Code and Voilà with no front-end code
of ours. A click on the drawing cannot reach the kernel that way, so a node is chosen with a dropdown (every edge,
or only the splits); the choice rewrites a small <style> that outlines the chosen path and the runs below it, and
the panel of that node's numbers, built once per node: the drawing itself is sent once.

Every part carries a CSS class: `dl-tree-...` in the widget (`CSS_CLASSES`), `dlh-tree-...` in the static page,
which holds no JavaScript, carries the trace page's Content-Security-Policy, and escapes every string from the
model, the tokenizer or the user (`display.escape`).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import ipywidgets as W

from .display import (TABLE_CSS, escape, format_number, format_prob, is_missing, prefixed, prob_colour,
                      strategy_summary, text_colour, token_label, visible_text)
from .html import CSP, PAGE_CSS
from .kit import classed

if TYPE_CHECKING:
    from ..trace.sample_tree import SampleTree

__all__ = ["SampleTreeView", "show_tree", "tree_svg", "tree_html", "node_panel", "CSS_CLASSES"]

# The stable selectors, for notebooks that restyle and for browser tests.
CSS_CLASSES = {
    "dl-tree-view": "the whole sample-tree view (tree.show())",
    "dl-tree-header": "model, strategy, how many runs, distinct runs and splits",
    "dl-tree-part": "the split picker: the nodes where runs part (choose one to select it)",
    "dl-tree-node": "the node picker: the prompt and every edge of the drawn tree (choose one to select its end)",
    "dl-tree-svg": "the drawing: an <svg class='dl-tree-graph'> of dl-tree-seg edges, each with its dl-tree-case "
                   "outline, dl-tree-tok tokens and dl-tree-label; dl-tree-split dots where runs part, dl-tree-end "
                   "where runs stop",
    "dl-tree-style": "the selection's style: the chosen path outlined, the runs below it marked",
    "dl-tree-panel": "the selected node: its prefix, numbers, branches and the runs through it (HTML)",
}

PX = 44  # one generated token's width
ROW = 24  # one leaf's height
LEFT, TOP = 10, 20
WIDEST = 10.0  # a branch that every run takes
CHAR_PX = 6.3  # an 11px label's mean character width
LEAF_CHARS = 60  # a leaf's label may run on to the right, where nothing else is drawn
PATH_COLOUR, BELOW_COLOUR = "#111", "#e6550d"  # the chosen path's outline; the runs below it
_VIEW_IDS = itertools.count()

SVG_CSS = """
.P-graph{font:11px/1 var(--jp-ui-font-family, system-ui, -apple-system, "Segoe UI", sans-serif)}
.P-case{fill:none;stroke:#8c8c8c}
.P-tok{fill:none}
.P-label{fill:#222;white-space:pre;stroke:#fff;stroke-width:3px;stroke-linejoin:round;paint-order:stroke}
.P-times{fill:#666;font-size:10px}
.P-split{fill:#fff;stroke:#333;stroke-width:1.2}
.P-end{fill:#fff;stroke:#555;stroke-width:1.2}
.P-end.P-eos{fill:#555}
.P-root{fill:#333}
"""

PANEL_CSS = TABLE_CSS + """
.P-prefix{white-space:pre-wrap;word-break:break-word;font:12px/1.9 var(--jp-code-font-family, ui-monospace, monospace)}
.P-tokspan{border-radius:2px;padding:1px 0}
.P-text{white-space:pre-wrap;word-break:break-word;max-width:60em}
.P-note{color:#666}
.P-legend{color:#444;margin:2px 0 4px}
.P-swatch{display:inline-block;width:1.6em;height:.9em;vertical-align:middle;border-radius:2px;margin:0 2px}
"""

# The trace page's style and policy (`html`: one spelling), wider for a drawing, which scrolls in its own box.
TREE_PAGE_CSS = PAGE_CSS + """
body{max-width:80em}
.dlh-prompt{max-height:16em}
.dlh-tree-drawing{overflow:auto;max-height:80vh;border:1px solid #e0e0e0}
"""


# ---- the drawing ----------------------------------------------------------------------------------------------
def _layout(tree: "SampleTree") -> tuple[dict[int, float], int]:
    """Each drawn node's row (the root, and every edge's end node) and how many rows: leaves take one row each,
    depth first; a node sits on the row of its busiest child, so the busiest branch goes straight on."""
    segs = tree.segments
    ends, parents = segs["segment"].tolist(), segs["parent"].tolist()
    first_child: dict[int, int] = {}
    for end, parent in zip(ends, parents):  # segments are in depth-first order, busiest first
        first_child.setdefault(parent, end)
    y: dict[int, float] = {}
    rows = 0
    for end in ends:
        if end not in first_child:
            y[end] = TOP + rows * ROW
            rows += 1
    for end in reversed(ends):  # a node's children come after it in depth-first order
        if end in first_child:
            y[end] = y[first_child[end]]
    y[0] = y[first_child[0]] if 0 in first_child else TOP
    return y, max(rows, 1)


def _x(depth: int, px: float) -> float:
    return LEFT + depth * px


def _width(count: int, n: int) -> float:
    return 1.5 + (WIDEST - 1.5) * count / max(n, 1)


def tree_svg(tree: "SampleTree", *, prefix: str = "dl-tree", value: str = "prob", px: float = PX) -> str:
    """The tree as one inline <svg>: an edge per chain of nodes (`SampleTree.segments`), as wide as its runs, each
    token's piece coloured by the model's probability of it (`value`: 'prob' raw, 'final_prob' after the processors,
    on `display.prob_colour`'s scale), labelled with its tokens; dots where runs part, and where they end (filled: at
    EOS). Every element carries a `{prefix}-...` class and its node (`data-seg`, `data-node`)."""
    if value not in ("prob", "final_prob"):
        raise ValueError(f"value must be 'prob' or 'final_prob', not {value!r}")
    nd, segs = tree.nodes, tree.segments
    y, rows = _layout(tree)
    n = tree.n
    colour = [prob_colour(p) for p in nd[value].to_numpy()]
    counts, ends = nd["count"].to_numpy(), nd["ends"].to_numpy()
    eos_at = {int(leaf) for leaf, stop in zip(tree.runs["leaf"], tree.runs["stop_reason"]) if stop == "eos"}
    max_depth = int(nd["depth"].max()) if len(nd) else 0
    width = _x(max_depth, px) + LEAF_CHARS * CHAR_PX + 40
    height = TOP + rows * ROW
    out = [f'<svg class="{prefix}-graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
           f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="sample tree of {n} runs">']
    splits, labels = [], []
    for seg in segs.itertuples(index=False):
        end, parent, count = int(seg.segment), int(seg.parent), int(seg.count)
        y0, y1 = y[parent], y[end]
        x0, x1 = _x(seg.depth_first - 1, px), _x(seg.depth_last, px)
        w = _width(count, n)
        curve = f"M{x0:.1f} {y0:.1f}C{x0 + px / 2:.1f} {y0:.1f} {x0 + px / 2:.1f} {y1:.1f} {x0 + px:.1f} {y1:.1f}"
        title = (f"{count} of {n} runs · step {seg.depth_first - 1}" + (f"–{seg.depth_last - 1}" if seg.depth_last >
                 seg.depth_first else "") + f" · p={format_prob(seg.prob)} (final {format_prob(seg.final_prob)})"
                 f"\n{visible_text(seg.text)}")
        out.append(f'<g class="{prefix}-seg" data-seg="{end}"><title>{escape(title)}</title>'
                   f'<path class="{prefix}-case" d="{curve}H{x1:.1f}" stroke-width="{w + 2:.1f}"/>')
        for i, node in enumerate(seg.nodes):
            d = curve if i == 0 else f"M{x0 + i * px:.1f} {y1:.1f}H{x0 + (i + 1) * px:.1f}"
            out.append(f'<path class="{prefix}-tok" data-node="{node}" d="{d}" stroke="{colour[node]}" '
                       f'stroke-width="{w:.1f}"/>')
        start = x0 + (3 if y0 == y1 else px * 0.55)  # a fanned-out edge's label starts after most of its curve
        room = (x1 - start) / CHAR_PX + (LEAF_CHARS if not tree.children(end) else 0)  # a leaf's may run on
        label = token_label(seg.text, max(int(room), 2))
        labels.append(f'<text class="{prefix}-label" data-seg="{end}" x="{start:.1f}" y="{y1 - w / 2 - 3:.1f}">'
                      f"<title>{escape(title)}</title>{escape(label)}</text>")  # drawn over every edge
        if ends[end]:
            eos = f" {prefix}-eos" if end in eos_at else ""
            out.append(f'<circle class="{prefix}-end{eos}" data-node="{end}" cx="{x1:.1f}" cy="{y1:.1f}" r="3"/>')
            if ends[end] > 1:
                out.append(f'<text class="{prefix}-times" x="{x1 + 6:.1f}" y="{y1 + 4:.1f}">×{ends[end]}</text>')
        out.append("</g>")
        if len(tree.children(end)) > 1:
            splits.append(end)
    out.extend(labels)
    for node in ([0] if len(tree.children(0)) > 1 else []) + splits:
        row = nd.iloc[node]
        depth = int(row["depth"])
        title = (f"{int(counts[node])} runs part {int(row['children'])} ways here (step {depth}): split entropy "
                 f"{format_number(row['split_entropy'])} nats; the model's {format_number(row['final_entropy'])} "
                 f"(raw {format_number(row['entropy'])})")
        out.append(f'<circle class="{prefix}-split" data-node="{node}" cx="{_x(depth, px):.1f}" cy="{y[node]:.1f}" '
                   f'r="3.5"><title>{escape(title)}</title></circle>')
    out.append(f'<circle class="{prefix}-root" data-node="0" cx="{LEFT:.1f}" cy="{y[0]:.1f}" r="4">'
               f"<title>{escape('the prompt: ' + token_label(tree.prompt, 80))}</title></circle></svg>")
    return "".join(out)


def legend(prefix: str, value: str = "prob") -> str:
    """What the drawing's colours, widths and dots mean, in one line (the swatches on `prob_colour`'s scale)."""
    what = "raw probability" if value == "prob" else "final probability"
    swatches = "".join(f'<span class="{prefix}-swatch" style="background:{prob_colour(p)}"></span>'
                       for p in (0, .25, .5, .75, 1))
    return (f'<div class="{prefix}-legend">colour = the model\'s {what} of each token given its prefix: 0 {swatches} '
            "1 · width = how many runs take the branch · open dot: runs part · filled dot: EOS · hover for details"
            "</div>")


# ---- one node's panel -----------------------------------------------------------------------------------------
def _prefix_html(tree: "SampleTree", node: int, prefix: str, value: str) -> str:
    nd = tree.nodes
    spans = []
    for v in tree.path_to(node)[1:]:
        p = float(nd[value].iat[v])
        bg = prob_colour(p)
        spans.append(f'<span class="{prefix}-tokspan" style="background:{bg};color:{text_colour(bg)}" '
                     f'title="step {int(nd["depth"].iat[v]) - 1} · p={format_prob(p)}">'
                     f"{escape(visible_text(str(nd['token'].iat[v])))}</span>")
    return "".join(spans) or f'<span class="{prefix}-note">(the prompt: no token generated yet)</span>'


def node_panel(tree: "SampleTree", node: int, *, prefix: str = "dl-tree", value: str = "prob",
               max_runs: int = 100) -> str:
    """One node as HTML: its generated prefix coloured by probability, its numbers (runs through it, the model's
    probability of its token, the path's log-probability), where the runs go next beside the model's entropy
    there, and the runs through it."""
    nd = tree.nodes
    row = nd.iloc[node]
    n, count = tree.n, int(row["count"])
    head = ("<b>the prompt</b>" if node == 0 else
            f"<b>node {node}</b> · step {int(row['depth']) - 1} · token "
            f"<code>{escape(token_label(str(row['token']), 40))}</code>")
    facts = [f"{head} · {count} of {n} runs ({100 * count / max(n, 1):.0f}%)"
             + (f" · {int(row['ends'])} end here" if row["ends"] else "")]
    if node:
        facts.append(f"model: p={format_prob(row['prob'])} raw, {format_prob(row['final_prob'])} after the processors"
                     f" · path logprob {format_number(row['cum_logprob'])} raw, "
                     f"{format_number(row['cum_final_logprob'])} final")
    kids = tree.children(node)
    if kids:
        facts.append(f"next: the runs part {len(kids)} way{'s' if len(kids) > 1 else ''}, split entropy "
                     f"<b>{format_number(row['split_entropy'])}</b> nats; the model's entropy here "
                     f"<b>{format_number(row['final_entropy'])}</b> (raw {format_number(row['entropy'])}); the "
                     f"branches taken hold p={format_prob(row['branch_mass'])} of the final distribution")
    parts = [f'<div class="{prefix}-box">', "<br>".join(facts),
             f'<div class="{prefix}-prefix">{_prefix_html(tree, node, prefix, value)}</div>']
    if kids:
        chains = dict(zip(tree.segments["first"], tree.segments["text"]))  # a child's edge, as drawn
        body = "".join(
            f"<tr><td><code>{escape(token_label(str(chains.get(k, nd['token'].iat[k])), 40))}</code></td>"
            f"<td class='{prefix}-num'>{int(nd['count'].iat[k])}</td>"
            f"<td class='{prefix}-num'>{int(nd['count'].iat[k]) / max(count - int(row['ends']), 1):.2f}</td>"
            f"<td class='{prefix}-num'>{format_prob(nd['final_prob'].iat[k])}</td>"
            f"<td class='{prefix}-num'>{format_prob(nd['prob'].iat[k])}</td></tr>" for k in kids)
        parts.append("<table><tr><th>continues with</th><th>runs</th><th>share</th><th>model p (final)</th>"
                     f"<th>raw p</th></tr>{body}</table>")
    runs = tree.runs_through(node)
    body = "".join(
        f"<tr><td class='{prefix}-num {prefix}-seed'>{'–' if is_missing(r.seed) else int(r.seed)}</td>"
        f"<td class='{prefix}-num'>{int(r.length)}</td><td>{escape(r.stop_reason)}</td>"
        f"<td class='{prefix}-num'>{format_number(r.logprob)}</td>"
        f"<td class='{prefix}-text'>{escape(visible_text(str(r.text)))}</td></tr>"
        for r in runs.head(max_runs).itertuples(index=False))
    more = (f"<div class='{prefix}-note'>… and {len(runs) - max_runs} more runs (tree.runs_through({node}))</div>"
            if len(runs) > max_runs else "")
    parts.append(f"<table><tr><th>seed</th><th>tokens</th><th>stop</th><th>logprob</th><th>text</th></tr>{body}"
                 f"</table>{more}</div>")
    return "".join(parts)


# ---- the static page ------------------------------------------------------------------------------------------
def _header_facts(tree: "SampleTree") -> list[tuple[str, str]]:
    tr = tree.trace
    return [("model", tr.model_name or "(unnamed)"), ("strategy", strategy_summary(tr)),
            ("runs", f"{tree.n} (seeds {tree.seeds[0]}–{tree.seeds[-1]})" if tree.seeds else str(tree.n)),
            ("distinct runs", str(tree.runs["leaf"].nunique())), ("splits", str(len(tree.where_they_part))),
            ("nodes", f"{len(tree)} ({len(tree.segments)} edges drawn)")]


def tree_html(tree: "SampleTree", *, value: str = "prob") -> str:
    """One self-contained page, no JavaScript: the tree drawn, where the runs part (with the split's entropy
    beside the model's), and every run."""
    p = "dlh-tree"
    body = [f"<h1>decoderlab sample tree · {escape(tree.trace.model_name or 'model')}</h1>", '<dl class="dlh-meta">']
    body += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in _header_facts(tree)]
    body.append(f"</dl><details><summary>Prompt ({len(tree.trace.prompt_ids)} tokens)</summary>"
                f'<div class="dlh-prompt" dir="auto">{escape(tree.prompt)}</div></details>')
    body.append(f"<h2>The tree</h2><div class='{p}-box'>{legend(p, value)}</div>"
                f'<div class="dlh-tree-drawing">{tree_svg(tree, prefix=p, value=value)}</div>')
    rows = "".join(
        f"<tr><td class='{p}-num'>{int(w.depth)}</td><td class='{p}-text'>{escape(visible_text(w.prefix))}</td>"
        f"<td class='{p}-num'>{int(w.count)}</td>"
        f"<td>{escape(' · '.join(f'{token_label(t, 24)} ×{c}' for t, c in zip(w.tokens, w.counts)))}</td>"
        f"<td class='{p}-num'>{format_number(w.split_entropy)}</td><td class='{p}-num'>{format_number(w.final_entropy)}"
        f"</td><td class='{p}-num'>{format_number(w.entropy)}</td><td class='{p}-num'>{format_prob(w.branch_mass)}</td>"
        "</tr>" for w in tree.where_they_part.itertuples(index=False))
    body.append(f"<h2>Where the runs part</h2><div class='{p}-box'><table><tr><th>step</th><th>after</th>"
                "<th>runs</th><th>branches</th><th>split entropy</th><th>model entropy (final)</th><th>raw</th>"
                f"<th>mass reached</th></tr>{rows}</table></div>")
    body.append(f"<h2>Runs</h2>{node_panel(tree, 0, prefix=p, value=value, max_runs=max(tree.n, 1))}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>decoderlab · sample tree · {escape(tree.trace.model_name or 'model')}</title>"
            f"<style>{TREE_PAGE_CSS}{prefixed(SVG_CSS, p)}{prefixed(PANEL_CSS, p)}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


# ---- the widget -----------------------------------------------------------------------------------------------
def _subtree_end(tree: "SampleTree") -> list[int]:
    """For each node, one past the last node below it (nodes are numbered depth first)."""
    parent = tree.nodes["parent"].to_numpy(dtype=float, na_value=-1).astype(int)
    end = list(range(1, len(parent) + 1))
    for v in range(len(parent) - 1, 0, -1):
        end[parent[v]] = max(end[parent[v]], end[v])
    return end


class SampleTreeView(W.VBox):
    """A sample tree in Jupyter: the drawing, a node picker (every edge) and a split picker (where runs part),
    and the chosen node's panel: its prefix, numbers, branches and the runs through it. The chosen path is
    outlined in black, the runs below it in orange. `view.select(node)` does the same from code."""

    def __init__(self, tree: "SampleTree", *, node: int = 0, value: str = "prob", px: float = PX):
        self.tree, self.value = tree, value
        self._panels: dict[int, str] = {}
        self._busy = False
        self._node = -1
        segs = tree.segments
        self._seg_of = {int(v): int(s.segment) for s in segs.itertuples(index=False) for v in s.nodes}
        self._below = _subtree_end(tree)
        self._ends = segs["segment"].to_numpy()
        self._view_class = f"dl-tree-v{next(_VIEW_IDS)}"
        facts = " · ".join(f"{k}: {escape(v)}" for k, v in _header_facts(tree) if k != "model")
        self.header = classed(W.HTML(f"<b>{escape(tree.trace.model_name or 'model')}</b> · {facts}"
                                     + legend("dl-tree", value)), "dl-tree-header")
        wp = tree.where_they_part
        self.part_picker = classed(W.Dropdown(description="split", layout=W.Layout(width="560px"), options=[
            ("(choose where runs part)", -1)] + [
            (f"step {int(w.depth)} · {int(w.count)} runs part {int(w.parts)} ways · H {w.split_entropy:.2f} "
             f"(model {format_number(w.final_entropy)}) · "
             + (f"after {token_label(w.prefix[-24:], 24)}" if w.prefix else "at the first token"), int(w.node))
            for w in wp.itertuples(index=False)]), "dl-tree-part")
        self.node_picker = classed(W.Dropdown(description="node", layout=W.Layout(width="560px"), options=[
            (f"prompt · {tree.n} runs", 0)] + [
            (f"{int(s.segment)} · step {int(s.depth_first) - 1}"
             + (f"–{int(s.depth_last) - 1}" if s.depth_last > s.depth_first else "")
             + f" · {int(s.count)}× · {token_label(s.text, 32)}", int(s.segment))
            for s in segs.itertuples(index=False)]), "dl-tree-node")
        self.drawing = classed(W.HTML(tree_svg(tree, prefix="dl-tree", value=value, px=px)), "dl-tree-svg")
        self.style = classed(W.HTML(layout=W.Layout(display="none")), "dl-tree-style")
        sheet = W.HTML(f"<style>{prefixed(SVG_CSS, 'dl-tree')}{prefixed(PANEL_CSS, 'dl-tree')}</style>",
                       layout=W.Layout(display="none"))
        self.panel = classed(W.HTML(), "dl-tree-panel")
        box = W.Box([self.drawing], layout=W.Layout(width="100%", max_height="520px", overflow="auto",
                                                    border="1px solid #e0e0e0"))
        super().__init__([sheet, self.style, self.header, W.HBox([self.node_picker, self.part_picker],
                                                                   layout=W.Layout(flex_flow="row wrap")),
                          box, self.panel])
        classed(self, "dl-tree-view", self._view_class)
        self.node_picker.observe(lambda ch: self._picked(ch["new"]), names="value")
        self.part_picker.observe(lambda ch: self._picked(ch["new"]), names="value")
        self.select(node)

    @property
    def node(self) -> int:
        """The selected node (0: the prompt)."""
        return self._node

    def select(self, node: int) -> None:
        """Select `node`: outline its path, mark the runs below it, and show its panel. A node inside a chain
        selects the chain's edge (its last node), as the drawing shows it."""
        tree = self.tree
        node = self._seg_of.get(tree.path_to(node)[-1], 0)  # path_to checks the node; the root is no edge
        self._node = node
        self._busy = True
        try:
            self.node_picker.value = node
            self.part_picker.value = node if len(tree.children(node)) > 1 else -1
        finally:
            self._busy = False
        self.style.value = self._selection_style(node)
        panel = self._panels.get(node)
        if panel is None:
            panel = self._panels[node] = node_panel(tree, node, value=self.value)
        self.panel.value = panel

    def _picked(self, node: int) -> None:
        if not self._busy and node is not None and node >= 0 and node != self._node:
            self.select(node)

    def _selection_style(self, node: int) -> str:
        v = f".{self._view_class}"
        on_path = {self._seg_of[u] for u in self.tree.path_to(node)[1:]}
        below = [int(s) for s in self._ends if node < s < self._below[node] and s not in on_path]
        rules = []
        if on_path:
            rules.append(",".join(f'{v} .dl-tree-seg[data-seg="{s}"] .dl-tree-case' for s in sorted(on_path))
                         + f"{{stroke:{PATH_COLOUR}}}")
        if below:
            rules.append(",".join(f'{v} .dl-tree-seg[data-seg="{s}"] .dl-tree-case' for s in below)
                         + f"{{stroke:{BELOW_COLOUR}}}")
        rules.append(f'{v} .dl-tree-label[data-seg="{node}"]{{font-weight:700}}'
                     f'{v} [data-node="{node}"].dl-tree-split,{v} [data-node="{node}"].dl-tree-root'
                     f"{{fill:{BELOW_COLOUR}}}")
        return f"<style>{''.join(rules)}</style>"


def show_tree(tree: "SampleTree", **kwargs: Any) -> SampleTreeView:
    """The sample-tree widget (`tree.show()`): see `SampleTreeView`."""
    return SampleTreeView(tree, **kwargs)
