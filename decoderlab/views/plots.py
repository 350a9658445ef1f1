"""Matplotlib figures of a trace, one function per question a reader asks about a decode.

Why a module of its own: the frames answer everything, but a picture answers "where did the model
hesitate?" at a glance. Every function takes a `Trace` (and `row`, 0 by default) and returns a
`matplotlib.figure.Figure` (a `TraceFigure`) built without pyplot, so nothing is shown twice and
nothing is kept alive behind the caller's back: Jupyter displays the returned figure as a PNG, a
script calls `fig.savefig(...)`.

Legibility rules shared by all figures:
- token text goes through `token_label` (defined in `decoderlab.display`, which the HTML page and
  the widgets share, and importable from here too): leading/trailing spaces, newlines, tabs and
  control characters become visible marks, and long tokens are cut;
- long axes are windowed (`start`/`window`, the most recent steps or positions by default), and
  tick labels are thinned so an axis never carries more than `MAX_LABELS`;
- text uses a font family list with CJK and (monochrome) emoji fallbacks where installed; a
  character no installed font has is written as `[U+XXXX]` rather than drawn as an empty box.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.colors import LogNorm, Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from .display import (CHOSEN_EDGE, CHOSEN_FINAL_COLOR, CHOSEN_RAW_COLOR, FINAL_COLOR, RAW_COLOR, TraceLike, format_prob,
                      format_rank, is_missing, text_colour, token_label)
from .figures import (CHOSEN_HATCH, DEFAULT_WINDOW, MAX_LABELS, TraceFigure, check_row, check_step, heat_cmap,
                      processor_lines, prob_cmap, token_ticks, window_of)
from .fonts import MONO_FAMILIES, finish as _finish, font_families, label as _label
from .layer_plots import attention, attention_map, commitment, lens

if TYPE_CHECKING:
    import pandas as pd

# token_label is re-exported: users call plots.token_label; it is defined once, in display.py.
__all__ = ["TraceFigure", "token_label", "distribution", "probability_timeline", "candidates_heatmap", "attention",
           "attention_map", "lens", "commitment", "beam_tree", "compare", "divergence", "font_families", "MAX_LABELS"]

# ---- figures ---------------------------------------------------------------------------------------
def distribution(trace: TraceLike, step: int, k: int | None = None, row: int = 0) -> Figure:
    """The top-k candidates' raw and final probabilities side by side, the chosen token marked,
    and the probability mass each processor removed."""
    step, row = check_step(trace, step), check_row(trace, row)
    cand = trace.candidates
    c = cand[(cand["step"] == step) & (cand["row"] == row)].sort_values("rank")
    k = min(len(c), 20) if k is None else min(max(1, k), len(c))
    c = c.head(k)
    s = trace.choices
    chosen = s[(s["step"] == step) & (s["row"] == row)].iloc[0]
    x = np.arange(k)
    width = 0.4
    is_chosen = c["chosen"].to_numpy()

    fig = TraceFigure(figsize=(max(6.5, 0.5 * k + 3.5), 4.6), layout="constrained")
    ax = fig.add_subplot()
    raw = ax.bar(x - width / 2, c["prob"], width, color=[CHOSEN_RAW_COLOR if ch else RAW_COLOR for ch in is_chosen],
                 edgecolor="white", label="raw (model)")
    fin = ax.bar(x + width / 2, c["final_prob"], width,
                 color=[CHOSEN_FINAL_COLOR if ch else FINAL_COLOR for ch in is_chosen], edgecolor="white",
                 label="final (after processors)")
    top = float(max(c["prob"].max(), c["final_prob"].max(), 1e-9))
    for i in np.flatnonzero(is_chosen):
        for bar in (raw[i], fin[i]):
            bar.set_hatch(CHOSEN_HATCH)
            bar.set_gid("chosen")
        ax.annotate(f"chosen\nfinal p={format_prob(float(c['final_prob'].iloc[i]))}",
                    xy=(x[i], max(c["prob"].iloc[i], c["final_prob"].iloc[i])), xytext=(0, 18),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8, color=CHOSEN_FINAL_COLOR,
                    arrowprops=dict(arrowstyle="->", color=CHOSEN_FINAL_COLOR), gid="chosen-annotation")
    if not is_chosen.any():
        ax.text(0.01, 0.97, f"chosen {_label(chosen['token'])} is raw rank {format_rank(chosen['rank'])}, outside this top-{k}",
                transform=ax.transAxes, ha="left", va="top", fontsize=8, color=CHOSEN_FINAL_COLOR,
                gid="chosen-annotation")
    token_ticks(ax.xaxis, x, [_label(t, 12) for t in c["token"]], rotation=55, ha="right",
                 rotation_mode="anchor", fontsize=8)
    ax.set_ylim(0, top * 1.35)
    ax.set_ylabel("probability")
    ax.set_xlabel(f"top {k} candidates by raw logit")
    how = "forced" if bool(chosen["forced"]) else chosen["choice"]
    ax.set_title(f"step {step}: {how} {_label(chosen['token'], 24)}  (raw p={format_prob(chosen['prob'])}, "
                 f"rank {format_rank(chosen['rank'])}; final p={format_prob(chosen['final_prob'])})", fontsize=10)

    handles = [Patch(facecolor=RAW_COLOR, label="raw (model)"), Patch(facecolor=FINAL_COLOR, label="final"),
               Patch(facecolor=CHOSEN_FINAL_COLOR, hatch=CHOSEN_HATCH, label="chosen")]
    ax.add_artist(ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False))
    lines = processor_lines(trace, step, row)
    if lines:  # a second legend (so the layout makes room for it), text only
        box = ax.legend([Patch(visible=False)] * len(lines), lines, title="mass removed", loc="lower left",
                        bbox_to_anchor=(1.01, 0.0), handlelength=0, handletextpad=0, title_fontsize=8,
                        prop={"family": MONO_FAMILIES[0], "size": 8}, alignment="left")
        box.set_gid("processors")
    return _finish(fig)


def probability_timeline(trace: TraceLike, row: int = 0, start: int | None = None,
                         window: int | None = DEFAULT_WINDOW) -> Figure:
    """The chosen token's probability (top) and the distribution's entropy (bottom), per step.

    Shows `window` steps from `start` (the most recent by default; window=None: all, labels thinned).
    """
    row = check_row(trace, row)
    st = trace.choices
    st = st[st["row"] == row].iloc[trace.alive_steps(row)] if len(st) else st
    n = len(st)
    if n == 0:
        raise ValueError("this trace has no steps")
    a, b = window_of(n, start, window)
    w = st.iloc[a:b]
    x = w["step"].to_numpy()
    fig = TraceFigure(figsize=(max(7.0, 0.22 * len(w) + 2.0), 5.6), layout="constrained")
    ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    cmap = prob_cmap()
    ax1.bar(x, w["prob"], width=0.8, color=cmap(w["prob"].to_numpy()), edgecolor="#999999", linewidth=0.5,
            label="raw p(chosen)")
    ax1.plot(x, w["final_prob"], "o", ms=4, mfc="none", mec="black", ls="none", label="final p (after processors)")
    forced = w["forced"].to_numpy(bool)
    if forced.any():
        ax1.plot(x[forced], w["prob"].to_numpy()[forced], "x", color="red", ms=7, ls="none", label="forced")
    ax1.set_ylim(0, 1.08)
    ax1.set_ylabel("p(chosen token)")
    ax1.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax1.tick_params(labelbottom=False)
    top = ax1.secondary_xaxis("top")
    step_stride = max(1, math.ceil(len(x) / 20))
    top.set_ticks(x[::step_stride])
    top.set_xlabel("step", fontsize=8)
    top.tick_params(labelsize=7)

    ax2.plot(x, w["entropy"], "-o", ms=3, color="#555555", label="raw")
    ax2.plot(x, w["final_entropy"], "--", color=FINAL_COLOR, label="final")
    ax2.set_ylabel("entropy (nats)")
    ax2.set_ylim(bottom=0)
    ax2.legend(title="entropy", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=8,
               frameon=False)
    token_ticks(ax2.xaxis, x, [_label(t, 12) for t in w["token"]], fontsize=8)
    ax2.set_xlim(x[0] - 0.6, x[-1] + 0.6)
    shown = f"steps {int(x[0])}–{int(x[-1])} of {n}" if len(w) < n else f"{n} steps"
    fig.suptitle(f"{trace.model_name or 'trace'} · row {row} · {shown}", fontsize=10)
    return _finish(fig)


def candidates_heatmap(trace: TraceLike, k: int = 10, row: int = 0, start: int | None = None,
                       window: int | None = 40, final: bool = False, log: bool = True) -> Figure:
    """Steps × rank, each cell a candidate coloured by its probability (raw, or `final`), token text
    in the cells and the chosen one outlined."""
    row = check_row(trace, row)
    if trace.num_steps == 0:
        raise ValueError("this trace has no steps")
    alive = trace.alive_steps(row)
    a, b = window_of(len(alive), start, window)
    steps = alive[a:b]
    ids = trace.array("cand_id")[steps, row]
    k = max(1, min(k, ids.shape[-1]))
    ids = ids[:, :k]
    prob = trace.array("cand_final_prob" if final else "cand_prob")[steps, row, :k].astype(np.float64)
    chosen_ids = trace.array("token_id")[steps, row]
    chosen = ids == chosen_ids[:, None]

    fig = TraceFigure(figsize=(1.05 * k + 3.0, 0.3 * len(steps) + 1.6), layout="constrained")
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1e-3, vmax=1.0, clip=True) if log else Normalize(0.0, 1.0)
    cmap = heat_cmap()
    im = ax.imshow(np.clip(prob, 1e-3, 1.0) if log else prob, cmap=cmap, norm=norm, aspect="auto",
                   interpolation="nearest")
    for i in range(len(steps)):
        for j in range(k):
            colour = cmap(norm(max(prob[i, j], 1e-3) if log else prob[i, j]))
            ax.text(j, i, _label(trace.token_text.get(int(ids[i, j]), f"<{int(ids[i, j])}>"), 10), ha="center",
                    va="center", fontsize=7, color=text_colour(to_hex(colour)))
            if chosen[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=CHOSEN_EDGE, lw=2,
                                       gid="chosen"))
    ranks = trace.array("rank")[steps, row]
    labels = [f"{int(s)}: {_label(trace.token_text.get(int(t), ''), 12)}" + ("" if r < k else f" (#{int(r)})")
              for s, t, r in zip(steps, chosen_ids, ranks)]
    token_ticks(ax.yaxis, np.arange(len(steps)), labels, rotation=0, fontsize=7)
    ax.set_xticks(np.arange(k), [f"#{j}" for j in range(k)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_ylabel("step: chosen token")
    cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01)
    cb.set_label(("final" if final else "raw") + " probability")
    shown = f"steps {int(steps[0])}–{int(steps[-1])} of {len(alive)}" if len(steps) < len(alive) else f"{len(alive)} steps"
    ax.set_title(f"top-{k} candidates by raw logit · {shown}", fontsize=10)
    return _finish(fig)


def beam_tree(trace: TraceLike, start: int | None = None, window: int | None = 24) -> Figure:
    """Beam search as a tree: per step (x) the K candidates by rank (y), each joined to the candidate it grew
    from; pruned candidates faded, finished ones marked with their normalised score, the returned rows' paths
    drawn bold in their own colours. Reads `trace.beams` and `trace.runs`."""
    tree = trace.beams  # raises for a trace that is not a beam search
    if not len(tree):
        raise ValueError("this trace has no steps")
    n = int(tree["step"].max()) + 1
    a, b = window_of(n, start, window)
    k = int(tree["candidate"].max()) + 1
    shown = tree[(tree["step"] >= a) & (tree["step"] < b)]
    penalty = float(trace.strategy.get("length_penalty", 1.0) or 0.0)
    fig = TraceFigure(figsize=(max(7.0, 1.25 * (b - a) + 2.5), max(3.5, 0.5 * k + 1.6)), layout="constrained")
    ax = fig.add_subplot()
    fate_style = {"continues": dict(color="#555555", alpha=0.9, lw=1.0),
                  "finished": dict(color=CHOSEN_FINAL_COLOR, alpha=0.9, lw=1.0),
                  "pruned": dict(color="#bbbbbb", alpha=0.5, lw=0.7)}
    row_colours = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
    for r in shown.itertuples(index=False):
        style = fate_style[r.fate]
        if r.step > a and r.origin >= 0:
            ax.plot([r.step - 1, r.step], [r.origin, r.candidate], zorder=1, **style)
        for i, row in enumerate(r.rows):
            if r.step > a and r.origin >= 0:
                ax.plot([r.step - 1, r.step], [r.origin, r.candidate], color=row_colours[row % len(row_colours)],
                        lw=3.0, alpha=0.8, zorder=2, gid=f"row-{row}")
        marker = {"continues": "o", "finished": "s", "pruned": "o"}[r.fate]
        ax.scatter([r.step], [r.candidate], s=28, marker=marker, color=style["color"], alpha=style["alpha"], zorder=3)
        ax.text(r.step, r.candidate - 0.22, _label(r.token, 10), ha="center", va="bottom", fontsize=7,
                color="#222222" if r.fate != "pruned" else "#999999", zorder=4)
        if r.fate == "finished":
            score = r.score / ((r.step + 1) ** penalty)
            ax.text(r.step + 0.08, r.candidate + 0.18, f"{score:.2f}", ha="left", va="top", fontsize=7,
                    color=CHOSEN_FINAL_COLOR, gid="finished-score")
    runs = trace.runs
    handles = [Patch(facecolor=row_colours[i % len(row_colours)],
                     label=f"row {i}: {runs['score'][i]:.3f}" if "score" in runs else f"row {i}")
               for i in range(trace.rows)]
    handles += [Patch(facecolor="#555555", label="continues"), Patch(facecolor=CHOSEN_FINAL_COLOR, label="finished"),
                Patch(facecolor="#bbbbbb", label="pruned")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
              title="returned (score)", title_fontsize=8)
    ax.set_xlim(a - 0.5, b - 0.5)
    ax.set_ylim(k - 0.4, -0.8)
    ax.set_xticks(range(a, b))
    ax.set_yticks(range(k))
    ax.set_xlabel("step")
    ax.set_ylabel(f"candidate (rank among the step's {k})")
    shown_steps = f"steps {a}–{b - 1} of {n}" if (a, b) != (0, n) else f"{n} steps"
    ax.set_title(f"beam search tree · {trace.strategy.get('num_beams', '?')} beams · {shown_steps}", fontsize=10)
    return _finish(fig)


def compare(cmp, metrics: Sequence[str] = ("perplexity", "mean_entropy", "distinct_2", "repeated_4gram_share",
                                           "length")) -> Figure:
    """One panel per metric: each strategy's mean over its runs, with the spread (one standard deviation) and
    every run as a dot. Reads `cmp.runs` (a `decoderlab.Comparison`, or anything with that frame)."""
    runs = cmp.runs
    if not len(runs):
        raise ValueError("this comparison has no runs")
    runs = runs.assign(strategy=_run_names(runs, "model", "strategy"))
    names = list(dict.fromkeys(runs["strategy"]))
    fig = TraceFigure(figsize=(max(7.0, 1.0 * len(names) + 2.0), 2.3 * len(metrics) + 0.6), layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(len(names))
    for ax, metric in zip(axes, metrics):
        per = [runs.loc[runs["strategy"] == n, metric].astype(float).to_numpy() for n in names]
        means = [np.nanmean(v) if len(v) else np.nan for v in per]
        spread = [np.nanstd(v) if len(v) > 1 else 0.0 for v in per]
        ax.bar(x, means, yerr=spread, color=FINAL_COLOR, alpha=0.75, capsize=3, gid=f"bars-{metric}")
        for i, v in enumerate(per):
            ax.scatter(np.full(len(v), x[i]), v, s=10, color="#222222", zorder=3)
        ax.set_ylabel(metric.replace("_", " "), fontsize=9)
    token_ticks(axes[-1].xaxis, x, [_label(n, 20) for n in names], rotation=30, ha="right", fontsize=8)
    axes[0].set_title(f"{len(runs)} runs of {len(names)} strategies: mean ± sd, dots are runs", fontsize=10)
    return _finish(fig)


def divergence(cmp, prompt: str | None = None) -> Figure:
    """Where runs part ways: for each pair of runs of a prompt, the first step at which their tokens differ
    (blank: one is a prefix of the other). Reads `cmp.divergence`."""
    div = cmp.divergence
    if prompt is not None:
        div = div[div["prompt"] == prompt]
    elif len(div):
        div = div[div["prompt"] == div["prompt"].iloc[0]]
    if not len(div):
        raise ValueError("no pair of runs to compare (a comparison needs two runs of one prompt)")

    many_models = "model_a" in div and len(set(div["model_a"]) | set(div["model_b"])) > 1

    def label(model, name, seed):
        name = f"{model} · {name}" if many_models else name
        return name if is_missing(seed) else f"{name} · seed {seed}"

    def labels(side):
        models = div[f"model_{side}"] if "model_a" in div else [""] * len(div)
        return [label(m, n, s) for m, n, s in zip(models, div[f"strategy_{side}"], div[f"seed_{side}"])]

    left, right = labels("a"), labels("b")
    keys = list(dict.fromkeys(left + right))
    m = np.full((len(keys), len(keys)), np.nan)
    for a, b, r in zip(left, right, div.itertuples()):
        i, j = keys.index(a), keys.index(b)
        if not is_missing(r.first_divergence):
            m[i, j] = m[j, i] = float(r.first_divergence)
    fig = TraceFigure(figsize=(max(5.0, 0.45 * len(keys) + 3.0), max(4.0, 0.45 * len(keys) + 2.0)),
                      layout="constrained")
    ax = fig.add_subplot()
    cmap = heat_cmap("viridis").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, interpolation="nearest")
    for i in range(len(keys)):
        for j in range(len(keys)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7, color="white", gid="step")
    token_ticks(ax.xaxis, np.arange(len(keys)), [_label(k, 24) for k in keys], rotation=60, ha="right", fontsize=7)
    token_ticks(ax.yaxis, np.arange(len(keys)), [_label(k, 24) for k in keys], rotation=0, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="first step where the two runs differ")
    ax.set_title("where runs part ways", fontsize=10)
    return _finish(fig)


def _run_names(runs: "pd.DataFrame", model: str, strategy: str) -> list[str]:
    """Strategy names, prefixed with the model's where a comparison holds several models."""
    if model not in runs or runs[model].nunique() < 2:
        return list(runs[strategy])
    return [f"{m} · {s}" for m, s in zip(runs[model], runs[strategy])]
