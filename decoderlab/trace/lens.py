"""The logit lens, computed after the run: the recorded residuals through the model's final norm and unembedding,
batched, once per (step, layer), only for what is asked (a view that shows 16 of 30 layers of one step
unembeds just those).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import torch


class LensHolder(Protocol):
    """What the lens reads and fills in (a `Trace`; named here so that this module does not import it)."""

    arrays: dict[str, np.ndarray]
    lens_object: Any  # engine.lens.Lens: the model's final norm and unembedding
    lens_top_k: int
    lens_done: np.ndarray | None
    token_text: dict[int, str]


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
    ids, probs, entropy, rank, chosen_prob = trace.lens_object.top(flat, k, chosen)
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
