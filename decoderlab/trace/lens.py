"""The logit lens, computed after the run: the recorded residuals through the model's final norm and unembedding,
batched, once per (step, layer), only for what is asked (a view that shows 16 of 30 layers of one step
unembeds just those); its frames; and where each chosen token settled (`commit_layers`).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import pandas as pd
import torch

from . import cells


class LensHolder(Protocol):
    """What the lens reads and fills in (a `Trace`; named here so that this module does not import it)."""

    arrays: dict[str, np.ndarray]
    lens_object: Any  # engine.lens.Lens: the model's final norm and unembedding
    lens_top_k: int
    lens_done: np.ndarray | None
    token_text: dict[int, str]
    num_steps: int
    rows: int
    branch: int


def compute_lens(trace: LensHolder, steps: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> None:
    """Apply final norm + unembedding to the recorded residuals of `steps` and `layers` (default: all),
    batched, once each (a view that shows 16 of 30 layers of one step unembeds just those)."""
    if "residual" not in trace.arrays or trace.lens_object is None:
        if "lens_id" in trace.arrays:
            return
        raise ValueError("this trace has no logit lens: record it with Record(lens=True)")
    res = trace.arrays["residual"]  # [S, B, L, D]
    s, b, l, _ = res.shape
    if "lens_id" not in trace.arrays:
        k = min(trace.lens_top_k, trace.lens_object.unembed.weight.shape[0])
        trace.arrays.update(lens_id=np.zeros((s, b, l, k), np.int64), lens_prob=np.zeros((s, b, l, k), np.float32),
                           lens_entropy=np.zeros((s, b, l), np.float32),
                           lens_chosen_rank=np.zeros((s, b, l), np.int64),
                           lens_chosen_prob=np.zeros((s, b, l), np.float32))
        trace.lens_done = np.zeros((s, l), dtype=bool)
    wanted = np.arange(s) if steps is None else np.asarray(list(steps), dtype=np.int64)
    lay = np.arange(l) if layers is None else np.asarray(list(layers), dtype=np.int64)
    todo = wanted[~trace.lens_done[np.ix_(wanted, lay)].all(axis=1)]
    if len(todo) == 0:
        return
    flat = torch.from_numpy(res[np.ix_(todo, np.arange(b), lay)]).reshape(len(todo) * b, len(lay), -1)
    chosen = torch.from_numpy(np.maximum(trace.arrays["token_id"][todo], 0).reshape(-1))  # -1: a finished row
    k = trace.arrays["lens_id"].shape[-1]
    ids, probs, entropy, rank, chosen_prob = trace.lens_object.top(flat, k, chosen, layers=torch.from_numpy(lay))
    k, where = ids.shape[-1], np.ix_(todo, np.arange(b), lay)
    trace.arrays["lens_id"][where] = ids.numpy().reshape(len(todo), b, len(lay), k)
    trace.arrays["lens_prob"][where] = probs.numpy().reshape(len(todo), b, len(lay), k)
    trace.arrays["lens_entropy"][where] = entropy.numpy().reshape(len(todo), b, len(lay))
    trace.arrays["lens_chosen_rank"][where] = rank.numpy().reshape(len(todo), b, len(lay))
    trace.arrays["lens_chosen_prob"][where] = chosen_prob.numpy().reshape(len(todo), b, len(lay))
    trace.lens_done[np.ix_(todo, lay)] = True
    missing = {int(i) for i in np.unique(ids.numpy())} - set(trace.token_text)
    if missing and getattr(trace.lens_object, "token_text", None) is not None:
        for i in missing:
            trace.token_text[i] = trace.lens_object.token_text(i)


def commit_layers(chosen_rank: np.ndarray) -> np.ndarray:
    """Where the model made up its mind: [..., L] ranks of the chosen token at each layer -> [...] the first layer
    from which it is top-1 (rank 0) at every layer to the last, or -1 where it is not top-1 at the last layer.

    "Stays top-1" is what makes it a commitment: a token that is top-1 at layer 3, lost at 10 and back at 20
    committed at 20."""
    top = np.asarray(chosen_rank) == 0
    tail = np.flip(np.cumprod(np.flip(top, -1), axis=-1), -1).astype(bool)  # top-1 from here to the last layer
    return np.where(tail[..., -1], top.shape[-1] - tail.sum(-1), -1).astype(np.int64)


def _steps_and_layers(trace: LensHolder, steps: Sequence[int] | None, layers: Sequence[int] | None):
    compute_lens(trace, steps, layers)
    sel = np.arange(trace.num_steps) if steps is None else np.asarray(list(steps), dtype=np.int64)
    lay = np.arange(trace.arrays["lens_id"].shape[2]) if layers is None else np.asarray(list(layers), dtype=np.int64)
    return sel, lay, np.ix_(sel, np.arange(trace.rows), lay)


def _alive_only(alive: np.ndarray, sel: np.ndarray, per: int, frame: pd.DataFrame) -> pd.DataFrame:
    """Drop the rows of `frame` ([steps sel] x rows x `per`) that belong to finished rows (`alive`: [S, B])."""
    keep = np.repeat(alive[sel].reshape(-1), per)
    return frame if keep.all() else frame[keep].reset_index(drop=True)


def lens_frame(trace: LensHolder, alive: np.ndarray, steps: Sequence[int] | None = None,
               layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (step, row, layer, rank) of the running rows: what that layer's residual, unembedded, would say
    (`trace.lens`, `trace.lens_for`); computes only the cells asked for."""
    sel, lay, where = _steps_and_layers(trace, steps, layers)
    ids = trace.arrays["lens_id"][where]
    s, b, l, k = ids.shape
    return _alive_only(alive, sel, l * k, pd.DataFrame({
        "step": np.repeat(sel, b * l * k), "row": np.tile(np.repeat(np.arange(b), l * k), s),
        "branch": trace.branch, "layer": np.tile(np.repeat(lay, k), s * b),
        "rank": np.tile(np.arange(k), s * b * l),
        "token_id": ids.reshape(-1).astype(np.int64), "token": cells.texts(trace.token_text, ids.reshape(-1)),
        "prob": trace.arrays["lens_prob"][where].reshape(-1).astype(np.float64),
        "chosen": (ids == trace.arrays["token_id"][sel][:, :, None, None]).reshape(-1),
    }))


def lens_stats_frame(trace: LensHolder, alive: np.ndarray, steps: Sequence[int] | None = None,
                     layers: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (step, row, layer) of the running rows: the lens entropy, and the chosen token's rank and prob
    (`trace.lens_stats`, `trace.lens_stats_for`)."""
    sel, lay, where = _steps_and_layers(trace, steps, layers)
    e = trace.arrays["lens_entropy"][where]
    s, b, l = e.shape
    return _alive_only(alive, sel, l, pd.DataFrame({
        "step": np.repeat(sel, b * l), "row": np.tile(np.repeat(np.arange(b), l), s),
        "branch": trace.branch, "layer": np.tile(lay, s * b),
        "entropy": e.reshape(-1).astype(np.float64),
        "chosen_rank": trace.arrays["lens_chosen_rank"][where].reshape(-1).astype(np.int64),
        "chosen_prob": trace.arrays["lens_chosen_prob"][where].reshape(-1).astype(np.float64),
    }))
