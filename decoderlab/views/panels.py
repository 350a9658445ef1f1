"""One step of a trace as HTML panels: its candidates, what each processor did, where it attended, and
its logit lens. What the widgets show beside the text.

Why HTML and not figures: a widget must answer a click at once (200 ms), and a matplotlib figure
costs about half a second to draw and encode as PNG; these fragments are strings built from a
step's numbers in a few milliseconds, drawn by the browser, offline, with no JavaScript, and with
every number in a hover title. The figures of `decoderlab.plots` stay for notebooks and papers.

Each function takes a trace (its public frames and accessors, `display.TraceLike`), a step and a row,
and returns one HTML fragment whose every string from the model or the user is escaped.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

from .display import (CHOSEN_FINAL_COLOR, CHOSEN_RAW_COLOR, FINAL_COLOR, LENS_SCALE, NEVER_COMMITTED, RAW_COLOR,
                      WEIGHT_SCALE, TraceLike, commit_colour, escape, format_number, format_prob, format_rank,
                      is_missing, prob_colour, scale_colours, short_processor, text_colour, token_label)

__all__ = ["candidates_panel", "processors_panel", "attention_panel", "lens_panel", "commit_strip", "knobs_heatmaps",
           "message", "PANEL_CSS", "KNOBS_CSS"]

# Class names start with `dlp-`: a <style> in a notebook applies to the whole page.
PANEL_CSS = """
.dlp{font:12px/1.45 var(--jp-ui-font-family, system-ui, sans-serif);color:#111}
.dlp-title{font-size:13px;margin:0 0 4px}
.dlp table{border-collapse:collapse}
.dlp td,.dlp th{padding:1px 6px;border-bottom:1px solid #e4e4e4;white-space:nowrap}
.dlp th{color:#555;font-weight:600;text-align:left}
.dlp .num{text-align:right;font-variant-numeric:tabular-nums}
.dlp code{font:12px var(--jp-code-font-family, ui-monospace, monospace);white-space:pre}
.dlp-bar{height:10px;border-radius:2px;min-width:1px}
.dlp-track{width:120px}
.dlp-chosen td{font-weight:700}
.dlp-ctx{white-space:pre-wrap;word-break:break-word;line-height:1.9;font:12px/1.9 var(--jp-code-font-family, monospace)}
.dlp-tok{border-radius:2px;padding:1px 0}
.dlp-query{outline:2px solid #e6550d}
.dlp-sep{color:#888;padding:0 4px}
.dlp-cell{text-align:center;min-width:4.5em}
.dlp-hit{outline:2px solid #d62728;outline-offset:-2px}
.dlp-note{color:#666;margin-top:3px}
.dlp-strip{display:flex;flex-wrap:wrap;gap:1px;margin:2px 0}
.dlp-commit{width:9px;height:14px;border-radius:1px}
.dlp-commit.dlp-at{outline:2px solid #222;outline-offset:-1px}
"""


def message(text: str, kind: str = "info") -> str:
    """A line of text in place of a panel (nothing recorded, or an error)."""
    colour = {"info": "#555", "error": "#b00020"}[kind]
    return f"<div class='dlp' style='color:{colour}'>{escape(text)}</div>"


def _code(text: str, max_len: int = 24) -> str:
    return f"<code>{escape(token_label(text, max_len))}</code>"


def _step_row(trace: TraceLike, step: int, row: int) -> Any:
    st = trace.choices
    hit = st[(st["step"] == step) & (st["row"] == row)]
    if not len(hit):
        raise IndexError(f"row {row} has no step {step}")
    return hit.iloc[0]


def _bar(p: float, top: float, colour: str) -> str:
    width = 0.0 if not np.isfinite(p) or top <= 0 else 100.0 * min(p / top, 1.0)
    return (f"<td class='dlp-track'><div class='dlp-bar' style='width:{width:.1f}%;background:{colour}'></div></td>"
            f"<td class='num'>{format_prob(p)}</td>")


def candidates_panel(trace: TraceLike, step: int, row: int = 0, k: int = 12) -> str:
    """The top-k candidates by raw logit: raw and final probability bars, the chosen token in bold."""
    chosen = _step_row(trace, step, row)
    how = "forced" if bool(chosen["forced"]) else str(chosen["choice"])
    title = (f"<div class='dlp-title'><b>step {step}</b> · {escape(how)} {_code(chosen['token'], 32)} · raw p="
             f"{format_prob(chosen['prob'])} (rank {format_rank(chosen['rank'])}) · final p="
             f"{format_prob(chosen['final_prob'])} (rank {format_rank(chosen['final_rank'])})</div>")
    cand = trace.candidates
    c = cand[(cand["step"] == step) & (cand["row"] == row)].sort_values("rank").head(k) if len(cand) else cand
    if not len(c):
        return f"<div class='dlp'>{title}{message('no candidates were recorded at this step')}</div>"
    probs = c["prob"].to_numpy(np.float64)
    finals = c["final_prob"].to_numpy(np.float64)
    top = float(np.nanmax(np.concatenate([probs, finals, [1e-12]])))
    rows = []
    for (_, r), p, fp in zip(c.iterrows(), probs, finals):
        is_chosen = bool(r["chosen"])
        rows.append(
            f"<tr{' class=dlp-chosen' if is_chosen else ''} title='{escape(repr(r['token']))} · id {int(r['token_id'])}'>"
            f"<td class='num'>{int(r['rank'])}</td><td>{_code(r['token'], 20)}{' ◀' if is_chosen else ''}</td>"
            f"{_bar(p, top, CHOSEN_RAW_COLOR if is_chosen else RAW_COLOR)}"
            f"{_bar(fp, top, CHOSEN_FINAL_COLOR if is_chosen else FINAL_COLOR)}</tr>")
    note = ""
    if not c["chosen"].any():
        note = (f"<div class='dlp-note'>the chosen token {_code(chosen['token'])} is raw rank "
                f"{format_rank(chosen['rank'])}, outside this top-{len(c)}</div>")
    head = "<tr><th>#</th><th>token</th><th colspan=2>raw p (model)</th><th colspan=2>final p</th></tr>"
    return f"<div class='dlp'>{title}<table>{head}{''.join(rows)}</table>{note}</div>"


def processors_panel(trace: TraceLike, step: int, row: int = 0) -> str:
    """Per processor, in order: the probability mass it removed and what it did to the chosen token."""
    p = trace.processors
    p = p[(p["step"] == step) & (p["row"] == row)].sort_values("order") if len(p) else p
    if not len(p):
        return message("no logits processors ran: the choice was made on the raw logits")
    rows = "".join(
        f"<tr><td><code>{escape(short_processor(x.processor))}</code></td>"
        f"<td class='num'>{100 * x.mass_removed:.2f}%</td><td class='num'>{int(x.rank_before)} → {int(x.rank_after)}</td>"
        f"<td class='num'>{format_prob(x.prob_after)}</td></tr>" for x in p.itertuples(index=False))
    head = "<tr><th>processor</th><th>mass removed</th><th>chosen rank</th><th>chosen p after</th></tr>"
    return f"<div class='dlp'><table>{head}{rows}</table></div>"


def attention_weights_for(trace: TraceLike, step: int, row: int, layer: int | None,
                          head: int | str | None) -> tuple[np.ndarray, list[str]]:
    """The step's attention as rows over the context, and a label per row.

    layer None averages the recorded layers; head None averages the heads, an int picks one, and
    "all" (with a layer) gives one row per head."""
    w = trace.attention_weights(step, row)  # [L', H', K]
    layers, heads = list(trace.attention_layers), list(trace.attention_heads)
    if layer is not None:
        if layer not in layers:
            raise ValueError(f"layer {layer} was not recorded (recorded: {layers})")
        w = w[layers.index(layer)][None]
    where = "every layer" if layer is None else f"layer {layer}"
    if head == "all":
        if layer is None:
            raise ValueError("head='all' needs one layer")
        return w[0], [f"head {h}" for h in heads]
    if head is None:
        return w.mean(axis=(0, 1))[None], [f"{where}, mean of heads"]
    if head not in heads:
        raise ValueError(f"head {head} was not recorded (recorded: {heads})")
    return w[:, heads.index(head)].mean(axis=0)[None], [f"{where}, head {head}"]


def _shades(weights: np.ndarray) -> list[str]:
    """Background colours for attention weights: sqrt of weight / max on WEIGHT_SCALE (small weights stay visible)."""
    top = float(weights.max()) if weights.size and weights.max() > 0 else 1.0
    return scale_colours(np.sqrt(np.maximum(weights, 0) / top), WEIGHT_SCALE)


def _context_line(weights: np.ndarray, tokens: Sequence[str], prompt_length: int) -> str:
    spans = []
    last = len(tokens) - 1
    for i, (wt, tok, bg) in enumerate(zip(weights.tolist(), tokens, _shades(weights))):
        if i == prompt_length:
            spans.append("<span class='dlp-sep' title='generated tokens follow'>│</span>")
        spans.append(f"<span class='dlp-tok{' dlp-query' if i == last else ''}' style='background:{bg};color:"
                     f"{text_colour(bg)}' title='position {i} · {_title(tok)} · weight {wt:.4f}'>{_escaped_label(tok)}</span>")
    return "".join(spans)


@lru_cache(maxsize=65536)
def _title(token: str) -> str:
    return escape(repr(token))


@lru_cache(maxsize=65536)
def _escaped_label(token: str) -> str:
    return escape(token_label(token, 40))


def attention_panel(trace: TraceLike, step: int, row: int = 0, layer: int | None = None,
                    head: int | str | None = None, top: int = 5) -> str:
    """Where the step's query looked: the whole context shaded by attention weight (one line per head
    with head='all'), and the most attended positions."""
    weights, labels = attention_weights_for(trace, step, row, layer, head)
    tokens = trace.context_tokens(step, row)
    p = len(trace.prompt_ids)
    query = tokens[-1] if tokens else ""
    title = (f"<div class='dlp-title'><b>step {step}</b>: the query is {_code(query)} (position {len(tokens) - 1}); "
             f"shade = weight, darker = more</div>")
    parts = [f"<div class='dlp'>{title}"]
    for lab, w in zip(labels, weights):
        best = np.argsort(-w, kind="stable")[:top]
        chips = " · ".join(f"{_code(tokens[i], 16)} <span class='num'>{w[i]:.3f}</span> (pos {i})" for i in best)
        parts.append(f"<div class='dlp-note'><b>{escape(lab)}</b> · most attended: {chips}</div>")
        if len(labels) == 1:
            parts.append(f"<div class='dlp-ctx'>{_context_line(w, tokens, p)}</div>")
    if len(labels) > 1:  # every head: a strip of shaded cells per head, over the context's last positions
        window = min(len(tokens), 60)
        a = len(tokens) - window
        head_row = "".join(f"<th class='dlp-cell' title='position {a + j}'>{escape(token_label(t, 6))}</th>"
                           for j, t in enumerate(tokens[a:]))
        body = []
        for lab, w in zip(labels, weights):
            cells = "".join(f"<td style='background:{bg}' title='{escape(lab)} · position {a + j} · weight {x:.4f}'></td>"
                            for j, (x, bg) in enumerate(zip(w[a:].tolist(), _shades(w)[a:])))
            body.append(f"<tr><th>{escape(lab)}</th>{cells}</tr>")
        parts.append(f"<div style='overflow-x:auto'><table><tr><th></th>{head_row}</tr>{''.join(body)}</table></div>")
        if a:
            parts.append(f"<div class='dlp-note'>last {window} of {len(tokens)} positions</div>")
    parts.append("</div>")
    return "".join(parts)


def lens_panel(trace: TraceLike, step: int, row: int = 0, max_layers: int = 16) -> str:
    """Logit lens at one step: per layer its top tokens shaded by probability (the finally chosen token
    outlined), and the chosen token's rank and probability at that layer. Only the layers shown (at most
    `max_layers`, evenly spread, the last always) are unembedded."""
    n_layers = trace.lens_layers
    m = min(n_layers, max_layers)
    keep = (np.unique(np.linspace(0, n_layers - 1, m).round().astype(int)) if m > 1
            else np.array([n_layers - 1]))  # linspace(0, n - 1, 1) is [0]: one layer shown is the last
    lf = trace.lens_for([step], layers=keep)
    sel = lf[lf["row"] == row].sort_values(["layer", "rank"])
    if not len(sel):
        return message(f"row {row} has no logit lens at step {step}")
    k = int(sel["rank"].max()) + 1
    prob = sel["prob"].to_numpy(np.float64).reshape(len(keep), k)
    tokens = sel["token"].to_numpy(object).reshape(len(keep), k)
    chosen = sel["chosen"].to_numpy(bool).reshape(len(keep), k)
    stats = trace.lens_stats_for([step], layers=keep)
    st = stats[stats["row"] == row].sort_values("layer")
    shades = np.array(scale_colours(prob.reshape(-1), LENS_SCALE), dtype=object).reshape(len(keep), k)
    rows = []
    for i in range(len(keep) - 1, -1, -1):  # the last layer on top, as the model's output
        layer = int(keep[i])
        cells = "".join(
            f"<td class='dlp-cell{' dlp-hit' if chosen[i, j] else ''}' style='background:{shades[i, j]};color:"
            f"{text_colour(shades[i, j])}' title='layer {layer} · {_title(tokens[i, j])} · p={format_prob(prob[i, j])}'>"
            f"{escape(token_label(tokens[i, j], 10))}</td>" for j in range(k))
        s = st.iloc[i]
        rows.append(f"<tr><th class='num'>{layer}</th>{cells}<td class='num'>#{format_rank(s['chosen_rank'])}</td>"
                    f"<td class='num'>{format_prob(s['chosen_prob'])}</td><td class='num'>{format_number(s['entropy'])}</td></tr>")
    head = (f"<tr><th>layer</th>{''.join(f'<th class=dlp-cell>#{j}</th>' for j in range(k))}"
            "<th colspan=2>chosen: rank, p</th><th>entropy</th></tr>")
    target = trace.choices
    target = target[(target["step"] == step) & (target["row"] == row)]
    title = (f"<div class='dlp-title'><b>step {step}</b>: what each layer would say · finally chosen "
             f"{_code(target['token'].iloc[0]) if len(target) else '–'} (outlined where it is in a layer's top {k})</div>")
    note = f"<div class='dlp-note'>{len(keep)} of {n_layers} layers shown</div>" if len(keep) < n_layers else ""
    return f"<div class='dlp'>{title}<table>{head}{''.join(rows)}</table>{note}</div>"


def commit_strip(steps: Any, layers: int, selected: int | None = None) -> str:
    """Where the model made up its mind, one cell per step: the `step`, `token` and `commit_layer` columns of a
    row's `trace.steps`, each cell coloured by its commit layer (blue: settled in the first of `layers` layers; red:
    only at the last; grey: the token is not the last layer's top-1), the `selected` step outlined, numbers in the
    hover title."""
    cells = []
    for step, token, layer in zip(steps["step"], steps["token"], steps["commit_layer"]):
        missing = is_missing(layer) or layer < 0
        said = ("not the last layer's top-1: no commit layer" if missing
                else f"top-1 from layer {int(layer)} of 0–{layers - 1} on")
        cells.append(f"<span class='dlp-commit{' dlp-at' if step == selected else ''}' data-step='{int(step)}' "
                     f"style='background:{commit_colour(layer, layers)}' "
                     f"title='step {int(step)} · {_title(token)} · {said}'></span>")
    legend = (f"<span class='dlp-note'>commit layer: <span class='dlp-commit' style='display:inline-block;"
              f"background:{commit_colour(0, layers)}'></span> 0 … <span class='dlp-commit' style='display:inline-block;"
              f"background:{commit_colour(layers - 1, layers)}'></span> {layers - 1} · <span class='dlp-commit' "
              f"style='display:inline-block;background:{NEVER_COMMITTED}'></span> never</span>")
    return f"<div class='dlp'><div class='dlp-strip'>{''.join(cells)}</div>{legend}</div>"


# ---- which knob decided ----------------------------------------------------------------------------------------
KNOBS_CSS = """
.dlk{display:flex;flex-wrap:wrap;gap:14px;font:12px/1.4 var(--jp-ui-font-family, system-ui, sans-serif);color:#111}
.dlk table{border-collapse:collapse}
.dlk td,.dlk th{padding:2px 5px;text-align:center;font-variant-numeric:tabular-nums;white-space:nowrap}
.dlk th{color:#555;font-weight:600}
.dlk-cell{min-width:3.4em;border:1px solid #fff}
.dlk-greedy{font-weight:700;outline:2px solid #222;outline-offset:-2px}
.dlk-cut{color:#666;font-style:italic}
.dlk-caption{font-weight:600;margin-bottom:2px}
"""
def _knob_value(value: Any) -> str:
    """A grid value as its heading: whole-number knobs (top_k) as integers, 0 of those as "off"; others as %g."""
    if value is None:
        return "–"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return "off" if value == 0 else str(int(value))
    return f"{float(value):g}"


def _cell(point: Any) -> str:
    settings = f"{point.knob_1}={_knob_value(point.value_1)}" + (
        f", {point.knob_2}={_knob_value(point.value_2)}" if isinstance(point.knob_2, str) else "")
    if not point.kept:
        return (f"<td class='dlk-cell dlk-cut' style='background:{NEVER_COMMITTED}' title='{escape(settings)}: cut by "
                f"the processors · greedy picks {escape(repr(point.top_token))}'>cut</td>")
    colour = prob_colour(point.prob)
    greedy = " dlk-greedy" if point.greedy else ""
    said = "the greedy choice" if point.greedy else f"greedy picks {point.top_token!r}"
    return (f"<td class='dlk-cell{greedy}' style='background:{colour};color:{text_colour(colour)}' "
            f"title='{escape(settings)}: p={format_prob(point.prob)}, rank {int(point.rank)} · {escape(said)}'>"
            f"{'★ ' if point.greedy else ''}{format_prob(point.prob)}</td>")


def knobs_heatmaps(frame: "pd.DataFrame", token: str) -> str:
    """Which knob decided, drawn: one table per grid of `frame` (what `trace.knobs` returns, plain data): rows the
    first knob's values, columns the second knob's, each cell the chance of `token` under sampling there on the
    probability scale (★: the greedy choice there; a grey "cut": its processors remove the token), every number in
    the hover title. Tables, not a figure: a click redraws it in a millisecond, and the offline page draws the same."""
    tables = []
    for grid, points in frame.groupby("grid", sort=False):
        knob_1, knob_2 = points["knob_1"].iloc[0], points["knob_2"].iloc[0]
        firsts = list(dict.fromkeys(points["value_1"]))
        if isinstance(knob_2, str):
            seconds = list(dict.fromkeys(points["value_2"]))
            head = f"<tr><th>{escape(knob_1)} ↓ {escape(knob_2)} →</th>" + "".join(
                f"<th>{escape(_knob_value(v))}</th>" for v in seconds) + "</tr>"
            by = {(a, b): p for a, b, p in zip(points["value_1"], points["value_2"], points.itertuples(index=False))}
            body = "".join(f"<tr><th>{escape(_knob_value(a))}</th>" + "".join(_cell(by[(a, b)]) for b in seconds)
                           + "</tr>" for a in firsts)
        else:  # one knob: one row
            head = f"<tr><th>{escape(knob_1)}</th>" + "".join(f"<th>{escape(_knob_value(v))}</th>" for v in firsts) + "</tr>"
            body = "<tr><th>p</th>" + "".join(_cell(p) for p in points.itertuples(index=False)) + "</tr>"
        greedy = int(points["greedy"].sum())
        tables.append(f"<div><div class='dlk-caption'>{escape(grid)} · greedy at {greedy} of {len(points)}</div>"
                      f"<table>{head}{body}</table></div>")
    best = frame.loc[frame["prob"].idxmax()] if len(frame) else None
    summary = "" if best is None else (
        f"<div class='dlp-note'>{escape(token_label(token, 24))}: the greedy choice at {int(frame['greedy'].sum())} of "
        f"{len(frame)} settings, cut at {int((~frame['kept']).sum())}; its highest chance is "
        f"{format_prob(best['prob'])} ({escape(best['grid'])}: {escape(_knob_value(best['value_1']))}"
        f"{', ' + escape(_knob_value(best['value_2'])) if isinstance(best['knob_2'], str) else ''})</div>")
    return f"<div class='dlk'>{''.join(tables)}</div>{summary}"
