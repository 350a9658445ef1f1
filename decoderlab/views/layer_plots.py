"""Figures over a model's layers and heads: where the new token looked (`attention`, `attention_map`) and what
each layer was about to say (`lens`), and where each token was settled (`commitment`). Reached as
`decoderlab.plots.attention`, `.attention_map`, `.lens` and `.commitment`.
"""
from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm, Normalize, PowerNorm, to_hex
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .display import CHOSEN_EDGE, FINAL_COLOR, TraceLike, format_prob, text_colour
from .figures import DEFAULT_WINDOW, TraceFigure, check_row, check_step, heat_cmap, token_ticks, window_of
from .fonts import finish as _finish, label as _label


def _layer_index(trace: TraceLike, layer: int) -> int:
    layers = list(trace.attention_layers) or list(range(trace.array("attention").shape[2]))
    if layer in layers:
        return layers.index(layer)
    if layer < 0 and -len(layers) <= layer:
        return len(layers) + layer
    raise ValueError(f"layer {layer} was not recorded; recorded layers: {layers}")


def _head_index(trace: TraceLike, head: int) -> int:
    heads = list(trace.attention_heads) or list(range(trace.array("attention").shape[3]))
    if head in heads:
        return heads.index(head)
    raise ValueError(f"head {head} was not recorded; recorded heads: {heads}")


def _select_heads(trace: TraceLike, w: np.ndarray, head) -> tuple[np.ndarray, str]:
    """Reduce the head axis (second to last) of `w`: the mean, or one head."""
    if head is None or head == "mean":
        return w.mean(axis=-2), "mean over heads"
    hi = _head_index(trace, head)
    return w[..., hi, :], f"head {head}"


def attention(trace: TraceLike, step: int, layer: int | None = None, head: int | str | None = None,
              row: int = 0, start: int | None = None, window: int | None = DEFAULT_WINDOW) -> Figure:
    """The attention of step `step`'s query over its context.

    layer=None: a layers × positions heat map (heads averaged, or the given head);
    layer given, head='all': that layer's heads × positions heat map;
    layer given, head None/'mean'/a head: bars over positions.
    Shows `window` positions from `start` (the most recent by default).
    """
    step, row = check_step(trace, step), check_row(trace, row)
    w = trace.attention_weights(step, row)  # [L, H, K]
    ctx = trace.context_tokens(step, row)
    k_len = w.shape[-1]
    a, b = window_of(k_len, start, window)
    pos = np.arange(a, b)
    labels = [_label(t, 12) for t in ctx[a:b]]
    query = _label(ctx[-1], 20)
    target = _label(trace.token_text.get(int(trace.array("token_id")[step, row]), ""), 20)
    layers = list(trace.attention_layers) or list(range(w.shape[0]))
    heads = list(trace.attention_heads) or list(range(w.shape[1]))

    if layer is None or head == "all":
        if layer is None:
            m, what = _select_heads(trace, w, head if head != "all" else None)  # [L, K]
            row_labels, ylabel = [str(x) for x in layers], "layer"
        else:
            m, what = w[_layer_index(trace, layer)], f"layer {layer}, every head"  # [H, K]
            row_labels, ylabel = [str(x) for x in heads], "head"
        m = m[:, a:b]
        fig = TraceFigure(figsize=(max(7.0, 0.2 * len(pos) + 2.5), max(3.0, 0.22 * m.shape[0] + 2.0)),
                     layout="constrained")
        ax = fig.add_subplot()
        vmax = float(m.max()) if m.size and m.max() > 0 else 1.0
        im = ax.imshow(m, aspect="auto", cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=vmax),
                       interpolation="nearest", extent=(a - 0.5, b - 0.5, m.shape[0] - 0.5, -0.5))
        token_ticks(ax.yaxis, np.arange(m.shape[0]), row_labels, rotation=0, max_labels=40, fontsize=7)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, label="attention weight")
    else:
        li = _layer_index(trace, layer)
        m, what = _select_heads(trace, w[li], head)  # [K]
        m = m[a:b]
        what = f"layer {layer}, {what}"
        fig = TraceFigure(figsize=(max(7.0, 0.2 * len(pos) + 2.0), 4.0), layout="constrained")
        ax = fig.add_subplot()
        ax.bar(pos, m, width=0.8, color=FINAL_COLOR)
        ax.set_ylabel("attention weight")
        ax.set_xlim(a - 0.6, b - 0.4)
    prompt_len = len(trace.prompt_ids)
    if a < prompt_len < b:
        ax.axvline(prompt_len - 0.5, color=CHOSEN_EDGE, ls="--", lw=1)
    token_ticks(ax.xaxis, pos, labels, fontsize=7)
    ax.set_xlabel("context position" + ("" if (a, b) == (0, k_len) else f" ({a}–{b - 1} of {k_len}; earlier hidden)"))
    ax.set_title(f"step {step}: attention of {query} (predicting {target}) · {what}", fontsize=10)
    return _finish(fig)


def attention_map(trace: TraceLike, layer: int, head: int | str | None = None, row: int = 0,
                  start: int | None = None, window: int | None = DEFAULT_WINDOW,
                  positions: int | None = None) -> Figure:
    """Steps × context positions, each step's attention row for `layer` (heads averaged, or `head`).

    Shows `window` steps from `start` (the most recent by default) and the last `positions` context
    positions they saw (default: as many as `window`).
    """
    row = check_row(trace, row)
    if trace.num_steps == 0:
        raise ValueError("this trace has no steps")
    if not trace.has_attention:
        raise ValueError("this trace has no attention: record it with Record(attention=True)")
    li = _layer_index(trace, layer)
    n_alive = len(trace.alive_steps(row))  # a row that finished early has padding steps after its EOS
    a, b = window_of(n_alive, start, window)
    per_step = [_select_heads(trace, trace.attention_weights(s, row)[li], head) for s in range(a, b)]  # ([k_s], what)
    what = per_step[0][1]
    k_end = trace.context_length(b - 1)
    m = np.full((b - a, k_end), np.nan, np.float32)  # NaN: a position not yet in that step's context
    for i, (weights, _) in enumerate(per_step):
        m[i, : len(weights)] = weights
    pa, pb = window_of(k_end, None, positions if positions is not None else window)
    m = m[:, pa:pb]
    ctx = trace.context_tokens(b - 1, row)

    fig = TraceFigure(figsize=(max(7.0, 0.2 * (pb - pa) + 3.0), max(3.5, 0.22 * (b - a) + 2.2)), layout="constrained")
    ax = fig.add_subplot()
    finite = m[np.isfinite(m)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cmap = heat_cmap("Blues").with_extremes(bad="#eeeeee")
    im = ax.imshow(np.ma.masked_invalid(m), aspect="auto", cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=vmax),
                   interpolation="nearest", extent=(pa - 0.5, pb - 0.5, b - 0.5, a - 0.5))
    prompt_len = len(trace.prompt_ids)
    if pa < prompt_len < pb:
        ax.axvline(prompt_len - 0.5, color=CHOSEN_EDGE, ls="--", lw=1)
    token_ticks(ax.xaxis, np.arange(pa, pb), [_label(t, 12) for t in ctx[pa:pb]], fontsize=7)
    chosen = trace.array("token_id")[a:b, row]
    token_ticks(ax.yaxis, np.arange(a, b),
                 [f"{s}: {_label(trace.token_text.get(int(t), ''), 12)}" for s, t in zip(range(a, b), chosen)],
                 rotation=0, fontsize=7)
    ax.set_ylabel("step: token it produced")
    ax.set_xlabel("context position" + ("" if (pa, pb) == (0, k_end) else f" ({pa}–{pb - 1} of {k_end})"))
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, label="attention weight")
    shown = f"steps {a}–{b - 1} of {n_alive}" if (a, b) != (0, n_alive) else f"{n_alive} steps"
    ax.set_title(f"attention · layer {layer}, {what} · {shown}", fontsize=10)
    return _finish(fig)


def lens(trace: TraceLike, step: int, row: int = 0, max_layers: int = 48) -> Figure:
    """Logit lens at one step: layers × top tokens, cells coloured by probability with the token text,
    the finally chosen token outlined; the right axis gives the chosen token's rank at each layer."""
    step, row = check_step(trace, step), check_row(trace, row)
    lf = trace.lens_for([step])  # only this step's layers are unembedded
    sel = lf[lf["row"] == row].sort_values(["layer", "rank"])
    n_layers = int(sel["layer"].max()) + 1
    k = int(sel["rank"].max()) + 1
    prob = sel["prob"].to_numpy(np.float64).reshape(n_layers, k)
    tokens = sel["token"].to_numpy(object).reshape(n_layers, k)
    chosen = sel["chosen"].to_numpy(bool).reshape(n_layers, k)
    stats = trace.lens_stats_for([step])
    st = stats[stats["row"] == row].sort_values("layer")
    keep = np.unique(np.linspace(0, n_layers - 1, min(n_layers, max_layers)).round().astype(int))
    prob, tokens, chosen, st = prob[keep], tokens[keep], chosen[keep], st.iloc[keep]

    fig = TraceFigure(figsize=(1.15 * k + 3.8, 0.27 * len(keep) + 1.8), layout="constrained")
    ax = fig.add_subplot()
    cmap = heat_cmap("Greens")
    norm = Normalize(0.0, 1.0)
    im = ax.imshow(prob, origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    for i in range(len(keep)):
        for j in range(k):
            ax.text(j, i, _label(tokens[i, j], 10), ha="center", va="center", fontsize=7,
                    color=text_colour(to_hex(cmap(norm(prob[i, j])))))
            if chosen[i, j]:
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=CHOSEN_EDGE, lw=2, gid="chosen"))
    token_ticks(ax.yaxis, np.arange(len(keep)), [str(x) for x in keep], rotation=0, fontsize=7)
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(k), [f"#{j}" for j in range(k)], fontsize=8)
    ax.set_xlabel("lens rank")
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    token_ticks(right.yaxis, np.arange(len(keep)),
                 [f"#{int(r)}  {format_prob(float(p))}" for r, p in zip(st["chosen_rank"], st["chosen_prob"])],
                 rotation=0, fontsize=7)
    right.set_ylabel("chosen token: rank, p")
    fig.colorbar(im, ax=right, shrink=0.8, pad=0.02, label="lens probability")
    target = _label(trace.token_text.get(int(trace.array("token_id")[step, row]), ""), 24)
    ax.set_title(f"step {step}: logit lens · finally chosen {target}", fontsize=10)
    return _finish(fig)


def commitment(trace: TraceLike, row: int = 0, start: int | None = None, window: int | None = 60) -> Figure:
    """Where the model made up its mind, step by step: the chosen token's rank under the logit lens at every layer
    (layers × steps, dark where it is the top-1) and each step's commit layer (`trace.steps.commit_layer`, the first
    layer from which it stays top-1) as a dot; an × on top marks a step whose token is not the last layer's top-1.

    Shows `window` steps from `start` (the most recent by default; window=None: all). Computes the lens of the
    steps shown."""
    row = check_row(trace, row)
    if not trace.has_lens:
        raise ValueError("this trace has no logit lens: record it with Record(lens=True)")
    alive = trace.alive_steps(row)
    if len(alive) == 0:
        raise ValueError("this trace has no steps")
    a, b = window_of(len(alive), start, window)
    steps = alive[a:b]
    stats = trace.lens_stats_for(steps)
    stats = stats[stats["row"] == row]
    n_layers = trace.lens_layers
    rank = stats.pivot(index="layer", columns="step", values="chosen_rank").reindex(columns=steps).to_numpy()
    st = trace.steps
    st = st[(st["row"] == row) & st["step"].isin(steps)].set_index("step").reindex(steps)
    commit = st["commit_layer"]

    fig = TraceFigure(figsize=(max(7.0, 0.22 * len(steps) + 2.5), 0.16 * n_layers + 2.4), layout="constrained")
    ax = fig.add_subplot()
    norm = LogNorm(vmin=1, vmax=max(float(rank.max()) + 1, 10.0), clip=True)
    im = ax.imshow(rank + 1, origin="lower", aspect="auto", cmap=heat_cmap("viridis"), norm=norm,
                   interpolation="nearest")
    x = np.arange(len(steps))
    settled = commit.notna().to_numpy()
    ax.plot(x[settled], commit[settled].to_numpy(np.float64), "o", ms=5, mfc="white", mec="black", ls="none",
            label="commit layer")
    if (~settled).any():
        ax.plot(x[~settled], np.full(int((~settled).sum()), n_layers - 0.5), "x", color="#d62728", ms=6, ls="none",
                label="not the last layer's top-1", clip_on=False)
    token_ticks(ax.xaxis, x, [f"{int(s)}: {_label(t, 10)}" for s, t in zip(steps, st["token"])], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_ylim(-0.5, n_layers - 0.5)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.06), ncol=2, fontsize=8, frameon=False)
    fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01, label="chosen token's lens rank + 1 (1 = top-1)")
    shown = f"steps {int(steps[0])}–{int(steps[-1])} of {len(alive)}" if len(steps) < len(alive) else f"{len(alive)} steps"
    ax.set_title(f"{trace.model_name or 'trace'} · row {row} · where each token was settled · {shown}", fontsize=10)
    return _finish(fig)
