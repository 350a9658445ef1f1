"""Host copies of a recording: step-major numpy buffers that grow in chunks, filled a chunk of steps at a time.

Why a module of its own: moving steps off the device in large copies (and letting go of the per-step
tensors) is what keeps a long run's memory flat; the `Recording` decides when, `HostArrays` how.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .schema import SCHEMA

DEVICE_SHARE = 8  # under a budget, the rows not yet on the host take at most 1/DEVICE_SHARE of it


def stack_rows(items: list, row_ids: list, rows: int, full: bool, name: str, zero: bool = False) -> torch.Tensor:
    """Per-step tensors [B_t, ...] -> one [S, rows, ...], each step's B_t rows placed at their run indices.

    Missing entries (a retired row; a step that recorded nothing) get the schema's fill value, or 0.
    """
    if len({x.device for x in items if x is not None}) > 1:  # staged steps on the host, the newest on the device
        items = [None if x is None else x.cpu() for x in items]
    like = next(x for x in items if x is not None)
    if full and all(x is not None for x in items):
        return torch.stack(items)
    field = SCHEMA.get(name)
    fill = 0 if zero or field is None else field.fill
    out = torch.full((len(items), rows, *like.shape[1:]), fill, dtype=like.dtype, device=like.device)
    for s, (x, r) in enumerate(zip(items, row_ids)):
        if x is not None:
            out[s, r.to(out.device) if r is not None else slice(None)] = x.to(out.device)
    return out


def _one_block(present: list) -> bool:
    """Whether per-step tensors can travel as one block: several, on an accelerator, of one leading shape."""
    return len(present) > 1 and present[0].device.type != "cpu" and \
        len({(x.shape[:-1], x.dtype, x.device) for x in present}) == 1


def _stacked(present: list) -> torch.Tensor:
    """Per-step tensors as one [S, ...] block, rows that grow by a key each step right-padded to the widest
    (one copy a step, into a block of zeros: no padded intermediates)."""
    width = max(x.shape[-1] for x in present)
    if all(x.shape[-1] == width for x in present):
        return torch.stack(present)
    block = present[0].new_zeros((len(present), *present[0].shape[:-1], width))
    for i, x in enumerate(present):
        block[i, ..., : x.shape[-1]] = x
    return block


def on_host(items: list) -> list:
    """Per-step tensors (or None) as numpy arrays, in one copy where they share their leading shape (rows that
    grow by a key each step are right-padded, then cut back): a chunk of steps reaches the host with one
    synchronisation, not one per step, so a GPU's forward made ahead keeps running meanwhile. Tensors on the
    host already (staged, `to_pinned`) become arrays without a copy."""
    present = [x for x in items if x is not None]
    if not _one_block(present):
        return [None if x is None else to_host(x) for x in items]
    block = iter(to_host(_stacked(present)))
    return [None if x is None else next(block)[..., : x.shape[-1]] for x in items]


def to_pinned(items: list) -> list:
    """Per-step tensors (or None) on an accelerator -> the same in page-locked host memory, copied as one block
    without waiting (`non_blocking`): the copy runs on the device's copy engine while the next steps compute.
    Nothing may read the results before the device has done the copy (an event recorded after it, in
    `Recording._stage`). Tensors on the host already are kept as they are."""
    present = [x for x in items if x is not None and x.device.type != "cpu"]
    if not present:
        return list(items)
    if not _one_block(present):
        return [x if x is None or x.device.type == "cpu" else _pinned_copy(x) for x in items]
    block = iter(_pinned_copy(_stacked(present)))
    return [x if x is None or x.device.type == "cpu" else next(block)[..., : x.shape[-1]] for x in items]


def _pinned_copy(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return out.copy_(x, non_blocking=True)


def to_host(x: torch.Tensor) -> "np.ndarray":
    """A recorded tensor as a numpy array on the host; bfloat16 (a strategy's decision computed in the model's
    dtype, such as contrastive search's penalty), which numpy lacks, as float32: the same numbers."""
    return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()


def _doubled(steps: int) -> int:
    """Room for twice `steps` (at least 64): how buffers grow when the run's length is not known."""
    return max(2 * steps, 64)


class HostArrays:
    """Step-major numpy copies of a recording, each step converted once, in buffers that grow in chunks.

    Why: a session rebuilds its trace after every click; converting only the new step keeps that
    independent of the trace's length (stacking 400 steps of attention rows costs 100 ms). A trace
    gets views of the buffers, and what a view shows never changes: before rows are written again (after
    a rewind; a fork shares the buffers too), the buffers are copied unless every view of them is one
    handed out here and none reaches those rows (copy on write; any other view, such as a slice a user
    kept, is counted by its reference to the buffer and makes the write copy).

    Attention rows have a buffer of their own, [slots, rows, layers, heads, width], whose slot 0 holds step
    `att_base`: it holds the rows of steps `att_first` on, and stays within `budget` bytes by keeping only
    the newest steps' rows (`_attention_plan`); the other buffers grow with the run.
    """

    def __init__(self, rows: int, prompt_length: int, budget: int | None = None, expected: int | None = None):
        import weakref

        self.rows, self.prompt_length = rows, prompt_length
        self.expected = expected  # steps the run will take at most (None: not known), see `_capacity_for`
        self.bufs: dict[str, "np.ndarray"] = {}
        self.done = 0  # steps converted
        self.capacity = 0
        self.budget = budget  # bytes the attention buffer may take (None: no limit)
        self.att_first = 0  # steps before it have no attention rows (dropped to stay within the budget)
        self.att_base = 0  # the step of the attention buffer's slot 0
        self.att_written = None  # per slot of the attention buffer: the width written there (beyond it: zeros)
        self._views: list[tuple] = []  # (weak reference to a view handed out, its steps)
        self._family = weakref.WeakSet([self])  # owners sharing these buffers (forks)

    def forget(self, steps: int) -> None:
        """Steps from `steps` on are to be converted again (a rewind, or a failed step)."""
        self.done = min(self.done, steps)
        self.att_first = min(self.att_first, steps)

    def fork(self) -> "HostArrays":
        """A second owner of the same buffers (a forked session); either copies them before writing rows
        that a view of the other still shows."""
        other = HostArrays(self.rows, self.prompt_length, self.budget, self.expected)
        other.bufs, other.done, other.capacity = dict(self.bufs), self.done, self.capacity
        other.att_first, other.att_base, other.att_written = self.att_first, self.att_base, self.att_written
        other._family = self._family
        self._family.add(other)
        return other

    def _free_from(self, step: int) -> bool:
        """Whether rows from `step` on may be written in place: every view of the buffers is one handed out
        by this family, none of them shows those rows, and no other owner (a fork) holds them converted."""
        import sys

        family = list(self._family)
        live = [(v, n) for o in family for ref, n in o._views if (v := ref()) is not None]
        for name in self.bufs:
            sharing = [o for o in family if o.bufs.get(name) is self.bufs[name]]
            extents = [n for v, n in live if v.base is self.bufs[name]]
            others = sys.getrefcount(self.bufs[name]) - 1 - len(sharing)  # 1: getrefcount's own argument
            if others != len(extents) or any(n > step for n in extents) or \
                    any(o.done > step for o in sharing if o is not self):
                return False
        return True

    def _capacity_for(self, steps: int) -> int:
        """Room, in steps, for a buffer that must hold `steps`: twice that (so a run moves its buffers a handful of
        times), but never past the steps the run can take, and all of those at once when the run has taken a
        quarter of them. Why: each move copies everything converted so far (and, for the attention rows, writes
        a new buffer as wide as the context), which at the end of a long run costs more than the steps between."""
        grown = _doubled(steps)
        if self.expected is None or steps > self.expected:
            return grown
        return self.expected if 4 * steps >= self.expected else min(grown, self.expected)

    def _resize(self, capacity: int) -> None:
        """New buffers of `capacity` steps holding the converted prefix (the old ones stay with their views);
        the attention buffer moves on its own (`_attention_buffer`). Views and forks are told apart by the
        buffer they hold (`_free_from`), so none needs forgetting."""
        import numpy as np

        for name, old in self.bufs.items():
            if name == "attention":
                continue
            new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            new[: self.done] = old[: self.done]
            self.bufs[name] = new
        self.capacity = capacity

    def _buffer(self, name: str, like: torch.Tensor | None) -> "np.ndarray":
        """The buffer of `name` (made like `like` the first time)."""
        import numpy as np

        buf = self.bufs.get(name)
        if buf is None:
            field = SCHEMA.get(name)
            dtype = to_host(torch.empty(0, dtype=like.dtype)).dtype
            fill = 0 if field is None or name == "residual" else field.fill
            buf = self.bufs[name] = np.full((self.capacity, self.rows, *like.shape[1:]), fill, dtype=dtype)
        return buf

    def _attention_plan(self, row_bytes: int, steps: int) -> tuple[int, int, int]:
        """(first step kept, slots, width) of an attention buffer for steps up to `steps`, `row_bytes` a
        (step, position) cell of every row, layer and head.

        Within the budget it grows as the other buffers do (room for twice the steps). Past it, it holds what
        fits of the newest steps at the context's width, less a quarter kept free (and as many positions of
        width to spare), so that it moves (a copy of at most the budget) only every quarter of what fits:
        rows are dropped in batches, a few rows' copying a step.
        """
        first = min(self.att_first, steps)
        for capacity in dict.fromkeys((self._capacity_for(steps), _doubled(steps))):
            slots, width = capacity - first, self.prompt_length + capacity - 1
            if self.budget is None or slots * width * row_bytes <= self.budget:
                return first, slots, width
        cells = self.budget // row_bytes
        fit = cells // (self.prompt_length + steps - 1)  # steps of the current width that fit
        spare = fit // 4
        width = self.prompt_length + steps - 1 + spare
        slots = cells // width
        keep = max(0, min(steps - first, slots - spare))
        return steps - keep, slots, width

    def _attention_buffer(self, inner: tuple, dtype, steps: int, copy: bool) -> "np.ndarray":
        """The attention buffer with room for steps [att_first, steps) at their context's width: the one
        there, or a new one (`_attention_plan`) holding the kept rows already converted; `copy`: a new one
        whatever (a view still shows the old one's rows about to be written)."""
        import numpy as np

        buf, first = self.bufs.get("attention"), min(self.att_first, steps)
        if buf is not None and not copy and self.att_base <= first and steps - self.att_base <= buf.shape[0] \
                and self.prompt_length + steps - 1 <= buf.shape[-1]:
            return buf
        row_bytes = self.rows * int(np.prod(inner)) * np.dtype(dtype).itemsize
        first, slots, width = self._attention_plan(row_bytes, steps)
        new = np.zeros((slots, self.rows, *inner, width), dtype=dtype)
        written = np.zeros(slots, dtype=np.int64)
        if buf is not None:  # the rows kept that were converted before, each as wide as it was written
            lo, hi = max(first, self.att_first, self.att_base), min(self.done, steps, self.att_base + buf.shape[0])
            for s in range(lo, hi):
                k = min(int(self.att_written[s - self.att_base]), width)
                new[s - first, ..., :k] = buf[s - self.att_base, ..., :k]
                written[s - first] = k
        self.bufs["attention"], self.att_written = new, written
        self.att_base, self.att_first = first, max(self.att_first, first)
        return new

    def _update_attention(self, rec: Any, a: int, steps: int, ids: list, full: bool, copy: bool) -> None:
        """Convert the attention rows of steps [a, steps) that the buffer keeps."""
        self.att_first = max(self.att_first, rec._att_first)
        items = rec.attention
        like = next((x for x in items[a:steps] if x is not None), None)
        buf = self.bufs.get("attention")
        if like is None and buf is None:
            return
        inner, dtype = (like.shape[1:-1], to_host(like[:0]).dtype) if like is not None else (buf.shape[2:-1], buf.dtype)
        buf = self._attention_buffer(tuple(inner), dtype, steps, copy)
        lo = max(a, self.att_first)
        written = self.att_written
        for s, x in zip(range(lo, steps), on_host([items[s] if s < len(items) else None for s in range(lo, steps)])):
            slot = s - self.att_base
            stale = int(written[slot])  # the width written there before (a rewound step): zeroed where not rewritten
            if x is None:
                buf[slot, ..., :stale] = 0
                written[slot] = 0
                continue
            every_row = ids[s - a] is None or full
            where = slice(None) if every_row else ids[s - a].cpu().numpy()
            width = x.shape[-1]
            buf[slot, ..., (width if every_row else 0):stale] = 0  # rows not written now are zeroed whole
            buf[slot, where, ..., :width] = x
            written[slot] = width

    def update(self, rec: Any, steps: int) -> None:
        """Convert the steps not yet on the host."""
        copy = self.done < steps and not self._free_from(self.done)  # a view still shows rows about to be written
        if steps > self.capacity:
            self._resize(self._capacity_for(steps))
        elif copy:
            self._resize(self.capacity)
        a = self.done
        if a >= steps:
            self.done = steps
            return
        ids = rec.row_ids[a:steps]
        full = all(r is None or r.shape[0] == self.rows for r in ids)
        for name, col in rec.columns.items():
            if col:
                block = to_host(stack_rows(col[a:steps], ids, self.rows, full, name))
                self._buffer(name, col[a])[a:steps] = block
        if "finished" in self.bufs and not full:
            for s, r in zip(range(a, steps), ids):
                present = [False] * self.rows
                for i in r.tolist():
                    present[i] = True
                self.bufs["finished"][s, [i for i, p in enumerate(present) if not p]] = True
        self._update_attention(rec, a, steps, ids, full, copy)
        like = next((x for x in rec.residuals[a:steps] if x is not None), None)
        if like is not None or "residual" in self.bufs:
            buf = self._buffer("residual", like)
            items = [rec.residuals[s] if s < len(rec.residuals) else None for s in range(a, steps)]
            for s, x in zip(range(a, steps), on_host(items)):
                buf[s] = 0
                if x is not None:
                    buf[s, slice(None) if ids[s - a] is None or full else ids[s - a].cpu().numpy()] = x
        self._blank_finished(a, steps)
        self.done = steps

    def _blank_finished(self, a: int, steps: int) -> None:
        """Rows that had finished before a step yet ran in it emitted padding (the fast path keeps finished rows in
        its captured batch): recorded as a retired row is, with the schema's fill values and zero rows, so the
        trace is the one the eager path records (its finished rows leave the batch)."""
        done = self.bufs.get("finished")
        if done is None or not done[a:steps].any():
            return
        mask = done[a:steps]
        for name, buf in self.bufs.items():
            if name == "finished":
                continue
            field = SCHEMA.get(name)
            fill = 0 if name in ("attention", "residual") or field is None else field.fill
            if name == "attention":
                lo = max(a, self.att_first)
                if lo < steps:
                    buf[lo - self.att_base : steps - self.att_base][mask[lo - a :]] = fill
            else:
                buf[a:steps][mask] = fill

    def views(self, steps: int) -> dict:
        """The arrays of the first `steps` steps (views into the buffers, from now on never written)."""
        import numpy as np

        import weakref

        self._views = [(ref, n) for ref, n in self._views if ref() is not None]
        out = {}
        for name, buf in self.bufs.items():
            if name == "attention":  # the newest steps', from att_first (older ones dropped: `_attention_plan`)
                lo = min(self.att_first, steps)
                kept = buf[lo - self.att_base : steps - self.att_base] if lo < steps else buf[:0]
                out[name] = kept[..., : self.prompt_length + steps - 1]
            else:
                out[name] = buf[:steps]
            self._views.append((weakref.ref(out[name]), steps))
        if "token_id" not in out:  # nothing recorded yet: zero steps of `rows` rows
            out["token_id"] = np.zeros((0, self.rows), dtype=np.int64)
        return out
