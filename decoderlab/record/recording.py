"""`Recording`: the loop's observer. It runs the recorders a `Record` asks for at every step, and captures
attention rows and residuals during forwards; steps stay on the model's device until they move to the host
buffers (`record.host`) in chunks, or until a `Trace` is built.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch

from ..engine import attention as attention_mod
from ..engine import lens as lens_mod
from ..engine.loop import State, StepContext
from ..errors import RecordBudgetWarning
from ..formats import format_bytes
from . import recorders  # noqa: F401 (registers the built-in recorders)
from .host import DEVICE_SHARE, HostArrays, to_pinned
from .options import Record
from .registry import STEP_RECORDERS

HOST_CHUNK = 64  # steps a `Recording(host=...)` keeps as tensors before moving them to its host buffers
HOST_SLICE = 2  # staged steps (a GPU's run) converted into the host buffers at each step: a chunk over HOST_CHUNK / 2
# steps, each step's share small enough to run while the GPU computes the next forward (`_convert_staged`)
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # decoderlab/, for _caller_level


class _Sink:
    """The attention sink, telling the attention function whether the prompt's full matrix is wanted; `defer`
    takes a layer's last query and keys, whose row is computed with every other layer's (`attention.last_rows`)."""

    def __init__(self, fn, wants_full: bool, defer=None):
        self.fn, self.wants_full, self.defer = fn, wants_full, defer

    def __call__(self, layer, row, full):
        self.fn(layer, row, full)


class Recording:
    """The loop's observer: per-step columns, plus attention rows and residuals from the forwards.

    Columns are lists indexed by step, so rewinding is truncation. A forward that produces step
    t's distribution writes step t's attention row and residuals.
    """

    def __init__(self, opts: Record, num_layers: int | None = None, host: tuple[int, int] | None = None,
                 expected_steps: int | None = None):
        self.opts = opts
        self.spill = host  # (rows, prompt length): move steps to `HostArrays` every HOST_CHUNK steps (`_spill`)
        self.expected_steps = expected_steps  # the most steps the run can take (sizes the host buffers), if known
        self.names = opts.names()
        self.keep_stages = opts.processors
        self.columns: dict[str, list[torch.Tensor]] = {}
        self.attention: list[torch.Tensor | None] = []  # per step: [B, L', H', K]
        self.prefill_attention: dict[int, torch.Tensor] = {}  # layer -> [B, H, N, N]
        self.residuals: list[torch.Tensor | None] = []  # per step: [B, L, D]
        self.row_ids: list[torch.Tensor | None] = []  # per step: the run indices of its B rows
        self._host: HostArrays | None = None  # host copies of the steps so far (see `arrays`)
        self.num_layers = num_layers
        self._slot = 0
        self._context = 0
        self._att_layers: dict[int, torch.Tensor] = {}
        self._att_deferred: dict[tuple, list] = {}  # (key shape, dtype, device, scaling) -> [(layer, query, keys)]
        self._res_layers: dict[int, torch.Tensor] = {}
        self._replayed: tuple | None = None  # what a replayed CUDA graph gathered (`replay_capture`), not yet flushed
        self._row_layers: frozenset = frozenset()  # the layers whose rows the last flushed forward recorded
        self.attention_mode: str | None = None
        self._device: torch.device | None = None  # where a step's layers are gathered: the ids' device
        self._spilled = 0  # steps whose per-step tensors were let go (moved to the host: `_spill`)
        self._staged = 0  # steps whose per-step tensors are copied (or being copied) to host memory: `_stage`
        self._staged_event = None  # recorded on the device after the last staging copy
        self._att_lo = 0  # attention entries before it are None (spilled or dropped): `_device_attention_bytes`
        self._att_first = 0  # steps before it lost their rows here (the host buffers drop too: `attention_first`)
        self._warned = False  # RecordBudgetWarning given (once a run)

    # ---- observer -------------------------------------------------------------------------
    def before_forward(self, state: State, step: int) -> None:
        self._flush_forward()
        self._slot = step
        self._device = state.ids.device
        self._context = state.ids.shape[1]  # positions the forward's last query can see

    def on_step(self, ctx: StepContext) -> None:
        self._flush_forward()
        if ctx.step != self.steps:
            raise RuntimeError(f"recording out of order: step {ctx.step} after {self.steps} steps")
        row: dict[str, torch.Tensor] = dict(ctx.decision)  # a strategy's own decision (contrastive scores, ...)
        for name in self.names:
            row.update(STEP_RECORDERS[name](ctx, self.opts))
        for key, value in row.items():  # all columns or none: an interrupted step leaves no ragged columns
            self.columns.setdefault(key, []).append(value)
        del self.row_ids[ctx.step:]
        self.row_ids.append(ctx.rows)
        if self.spill is not None:
            if self.steps - self._staged >= HOST_CHUNK:
                self._spill()
            elif self._spilled < self._staged:
                self._convert_staged()
        self._keep_within_budget()

    def _spill(self) -> None:
        """Move the steps so far towards the host buffers and let go of their per-step tensors.

        Why: thousands of small per-step tensors kept alive between the large transient allocations of
        each forward fragment the heap (a 1,500-token run grew RSS by 0.9 GiB for 1 MB of records). In
        buffers that grow in chunks, a run holds a handful of allocations whatever its length.

        On a GPU the steps are staged: copied to page-locked host memory as one block per record, without
        waiting (`_stage`), and converted into the host buffers a few steps at a time once the copy is done
        (`_convert_staged`), while the GPU computes the next forwards. The host never waits for the device
        here, and no step pays for a whole chunk's conversion. On a CPU they are converted at once.
        """
        if self._device is not None and self._device.type == "cuda":
            self._stage()
            return
        self._convert(self.steps)

    def _stage(self) -> None:
        """Copy the per-step tensors of the steps not yet staged to page-locked host memory (`host.to_pinned`),
        one block per record, and record an event after the copies."""
        a, b = self._staged, self.steps
        for buf in (*self.columns.values(), self.attention, self.residuals, self.row_ids):
            if a < len(buf):
                buf[a:b] = to_pinned(buf[a:b])
        self._staged_event = torch.cuda.Event()
        self._staged_event.record()
        self._staged = b

    def _staged_ready(self, wait: bool) -> bool:
        """Whether the staging copies are done (`wait`: wait for them)."""
        event = self._staged_event
        if event is None or event.query():
            return True
        if wait:
            event.synchronize()
        return wait

    def _convert_staged(self) -> None:
        """Convert up to HOST_SLICE staged steps, if their copies are done (else: at a later step)."""
        if self._staged_ready(wait=False):
            self._convert(min(self._staged, self._spilled + HOST_SLICE))

    def _convert(self, steps: int) -> None:
        """Convert steps up to `steps` into the host buffers and let go of their per-step tensors."""
        host = self._host_arrays(*self.spill)
        self._staged_ready(wait=True)
        host.update(self, steps)
        self._release_dropped()
        self._warn_if_dropped()
        done = host.done
        for buf in (*self.columns.values(), self.attention, self.residuals, self.row_ids):
            a, b = min(self._spilled, len(buf)), min(done, len(buf))
            buf[a:b] = [None] * (b - a)
        self._spilled = done
        self._staged = max(self._staged, done)
        self._att_lo = max(self._att_lo, done)

    # ---- the memory budget (Record.memory_budget) ---------------------------------------------
    @property
    def attention_first(self) -> int:
        """The first step that still has its attention rows: those of the steps before it were dropped to keep
        the recording within `Record(memory_budget=...)` (0 when none were)."""
        return max(self._att_first, self._host.att_first if self._host is not None else 0)

    def attention_nbytes(self) -> int:
        """Bytes of attention rows this recording holds: per-step tensors (on the model's device) and its host
        buffer. What `Record(memory_budget=...)` bounds."""
        host = self._host.bufs.get("attention") if self._host is not None else None
        return self._device_attention_bytes() + (0 if host is None else host.nbytes)

    def _device_attention_bytes(self) -> int:
        """Bytes of the attention rows held as per-step tensors on the model's device (not staged)."""
        return sum(x.nbytes for x in self.attention[max(self._att_lo, self._staged):] if x is not None)

    def _host_budget(self) -> int | None:
        """What the host buffer may take: all of the budget, less the share of the rows not yet moved there."""
        budget = self.opts.memory_budget
        if budget is None or self.spill is None:
            return budget
        return budget - budget // DEVICE_SHARE

    def _keep_within_budget(self) -> None:
        """Past `Record(memory_budget=...)`, drop the oldest steps' attention rows (the one record that grows with
        the square of the run: each step's row is as wide as its context).

        A run with host buffers moves its rows there once they take 1/DEVICE_SHARE of the budget, and the host
        buffer, sized within the rest, keeps the newest rows that fit (`HostArrays._attention_plan`); a
        recording without them (a beam search) lets go of its oldest per-step rows. Either way the rows are
        freed, not zeroed, and the steps kept are always the newest: a trace's attention covers its last steps.
        """
        budget = self.opts.memory_budget
        if budget is None or len(self.attention) <= self._att_lo:
            return
        if self.spill is not None:
            if self._device_attention_bytes() > budget // DEVICE_SHARE:
                self._spill()
            return
        held, s = self._device_attention_bytes(), self._att_lo
        while held > budget and s < len(self.attention):
            x = self.attention[s]
            if x is not None:
                held -= x.nbytes
                self.attention[s] = None
            s += 1
        if s > self._att_lo:
            self._att_lo = s
            self._att_first = max(self._att_first, s)
        self._warn_if_dropped()

    def _release_dropped(self) -> None:
        """Let go of the per-step rows of steps the host buffer dropped (they will never be read)."""
        first = min(self.attention_first, len(self.attention))
        for s in range(self._att_lo, first):
            self.attention[s] = None
        self._att_lo = max(self._att_lo, first)

    def _warn_if_dropped(self) -> None:
        """One RecordBudgetWarning a run, when its first rows are dropped."""
        first = self.attention_first
        if not first or self._warned:
            return
        self._warned = True
        warnings.warn(
            f"Record(memory_budget={format_bytes(self.opts.memory_budget)}): the attention rows reached the budget, "
            f"so the rows of the oldest {first} step{'s' if first > 1 else ''} were dropped, and older steps' rows "
            "keep being dropped as the run goes on (the newest are kept; trace.steps.has_attention says which steps "
            "have them, trace.attention_dropped how many lack them). To keep more, raise it "
            "(Record(memory_budget='4GiB'), or None for no limit) or record fewer layers and heads "
            "(attention_layers=..., attention_heads=...).",
            RecordBudgetWarning, stacklevel=_caller_level())

    @property
    def steps(self) -> int:
        col = self.columns.get("token_id")
        return len(col) if col else 0

    def drop_steps(self, steps: int) -> None:
        """Forget the per-step columns from step `steps` on (what the forwards captured stays)."""
        for col in self.columns.values():
            del col[steps:]
        del self.row_ids[steps:]
        self._spilled = min(self._spilled, steps)
        self._staged = min(self._staged, steps)
        self._att_lo = min(self._att_lo, steps)
        if self._host is not None:
            self._host.forget(steps)

    def truncate(self, steps: int) -> None:
        """Forget everything from step `steps` on (a rewind)."""
        self.drop_steps(steps)  # also tells the host copies
        del self.attention[steps:]
        del self.residuals[steps:]
        self._att_first = min(self._att_first, steps)
        self._att_layers.clear()
        self._replayed = None
        self._att_deferred.clear()
        self._res_layers.clear()

    def copy(self) -> "Recording":
        """An independent recording with the same steps so far (a fork): lists copied, tensors shared."""
        other = Recording(self.opts, self.num_layers, self.spill, self.expected_steps)
        other.columns = {name: list(col) for name, col in self.columns.items()}
        other.attention = list(self.attention)
        other.residuals = list(self.residuals)
        other.row_ids = list(self.row_ids)
        other.prefill_attention = dict(self.prefill_attention)
        other._host = None if self._host is None else self._host.fork()
        other._spilled, other._att_lo, other._att_first = self._spilled, self._att_lo, self._att_first
        other._staged, other._staged_event = self._staged, self._staged_event
        other._warned = self._warned
        return other

    # ---- forward-time capture ---------------------------------------------------------------
    def _attention_sink(self, layer: int, row: torch.Tensor, full: torch.Tensor | None) -> None:
        wanted = self.opts.attention_layers
        if wanted is not None and layer not in wanted:
            return
        heads = self.opts.attention_heads
        if heads is not None:
            full = full[:, list(heads)] if full is not None else None
        self._att_layers[layer] = self._rows_to_keep(row[None])[0]
        if full is not None and self.opts.prefill_attention:
            self.prefill_attention[layer] = full.to(torch.float16)

    def _attention_defer(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """A layer's last query and keys, kept until the forward is over (`_flush_forward`): the rows of all
        layers are computed at once (the keys are not changed in place meanwhile: each cache update makes new
        ones, and the next forward flushes first)."""
        wanted = self.opts.attention_layers
        if wanted is None or layer in wanted:
            group = (tuple(key.shape), query.dtype, key.device, scaling)  # one product per device (device_map)
            self._att_deferred.setdefault(group, []).append((layer, query, key))

    def _rows_to_keep(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """[L, B, H, K] float32 rows -> one [B, H', K] float16 row per layer: the heads asked for (fitted to the
        context when the forward is over, `_fit_context`)."""
        heads = self.opts.attention_heads
        if heads is not None:
            rows = rows[:, :, list(heads)]
        return list(rows.to(dtype=torch.float16, device=self._device or rows.device, non_blocking=True).unbind(0))

    def _fit_context(self, row: torch.Tensor) -> torch.Tensor:
        """A layer's row as wide as the context: a sliding-window cache holds only the most recent keys (the row is
        right-aligned to the context); a static cache holds more key slots than the context (the first ones are
        the context's, the others are masked). Done after the forward, so a captured forward is context-free."""
        missing = self._context - row.shape[-1]
        if missing > 0:
            return torch.nn.functional.pad(row, (missing, 0))
        return row[..., : self._context] if missing < 0 else row

    def keep_forward_rows(self, step: int, rows: torch.Tensor) -> None:
        """The forward that made step `step`'s distribution ran more rows than the run keeps (contrastive
        search's look-ahead forwards every candidate): keep only `rows` of what it captured."""
        self._flush_forward()
        for buf in (self.attention, self.residuals):
            if step < len(buf) and buf[step] is not None:
                buf[step] = buf[step][rows.to(buf[step].device)]

    def _residual_sink(self, layer: int, hidden: torch.Tensor) -> None:
        self._res_layers[layer] = hidden  # made float32 with the other layers' (`_flush_forward`)

    def _flush_forward(self) -> None:
        """Move what the last forward captured into its step's slot."""
        if self._replayed is not None:  # a replayed CUDA graph: its rows, gathered in the graph's memory
            att, res = self._replayed
            self._replayed = None
            if att is not None:
                self._store(self.attention, self._fit_context(att).clone())
            if res is not None:
                self._store(self.residuals, res.clone())
        for (_, _, _, scaling), items in self._att_deferred.items():
            rows = attention_mod.last_rows([q for _, q, _ in items], [k for _, _, k in items], scaling)
            for (layer, _, _), row in zip(items, self._rows_to_keep(rows)):
                self._att_layers[layer] = row
        self._att_deferred = {}
        if self._att_layers:
            self._row_layers = frozenset(self._att_layers)
            self._store(self.attention, self._gather({i: self._fit_context(r) for i, r in self._att_layers.items()}))
            self._att_layers = {}
        if self._res_layers:
            self._store(self.residuals, self._gather(self._res_layers).float())
            self._res_layers = {}

    def forward_capture(self, rows: dict[int, torch.Tensor] | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What the forward being captured as a CUDA graph has handed the recording, gathered as the flush gathers
        it: the attention rows of all layers [B, L, H, K] and the residuals [B, L, D] float32. Called inside the
        capture (`fast.CapturedDecoder`), so the gathering is part of the graph: each replay leaves the step's
        rows in these two tensors (handed back before it, `replay_capture`), and the host's share of a step is one
        copy of each, not a few per layer.
        `rows`: the layers' row buffers the attention function wrote instead of the sink
        (`attention.rows_into_buffers`), {layer: [B, H, K] float32}. The warm-up step (uncaptured, on a side
        stream) is recorded through the same two calls."""
        picked = [i for i in sorted(rows or ()) if i in self._row_layers and i not in self._att_layers]
        if picked:  # the layers that handed the prompt's forward a row, and did not hand the sink one now
            self._att_layers.update(zip(picked, self._rows_to_keep(torch.stack([rows[i] for i in picked]))))
        att = self._gather(self._att_layers) if self._att_layers else None
        res = self._gather(self._res_layers).float() if self._res_layers else None
        self._att_layers, self._res_layers = {}, {}
        return att, res

    def capture_key(self) -> tuple:
        """What `forward_capture` gathers for this recording, as a key: a step captured for an equal key (by an
        earlier run, `fast.CapturedDecoder`) gathers what this recording's forward would. The attention rows asked
        for (layers, heads, and the layers the prompt's forward recorded rows for), the residuals, and where."""
        o = self.opts
        return (o.attention, o.attention_layers, o.attention_heads, o.lens, self._row_layers, self.attention_mode,
                self._device)

    def replay_capture(self, captured: tuple[torch.Tensor | None, torch.Tensor | None]) -> None:
        """Hand the recording what a captured forward gathered (`forward_capture`), before the graph's replay
        rewrites those tensors: the step's flush copies them out, as after an eager forward."""
        self._replayed = captured

    def _gather(self, layers: dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-layer [B, ...] tensors -> [B, L, ...] in layer order, on the ids' device. A model sharded with
        device_map computes its layers on several devices: each is copied with non_blocking (queued on the
        streams, never waited for by the host; a no-op for a layer already there)."""
        device = self._device or layers[min(layers)].device
        return torch.stack([layers[i].to(device, non_blocking=True) for i in sorted(layers)], 1)

    def _store(self, buf: list, value: torch.Tensor) -> None:
        while len(buf) < self._slot:
            buf.append(None)
        if len(buf) == self._slot:
            buf.append(value)
        else:
            buf[self._slot] = value

    # ---- to arrays -----------------------------------------------------------------------------
    def arrays(self, rows: int, prompt_length: int) -> dict:
        """Everything recorded as step-major numpy arrays [S, rows, ...].

        Steps at which some rows had retired (finished at EOS) hold fewer rows; those rows get the
        schema's fill value and `finished` True. Attention rows are zero-padded to the longest context.
        Each step reaches the host once (`HostArrays`), so a session that rebuilds its trace after every
        step pays for the new step only.
        """
        host = self._host_arrays(rows, prompt_length)
        if self._staged_event is not None and self._staged < self.steps:
            self._stage()  # the newest steps travel as the others did: one block per record
        self._staged_ready(wait=True)
        host.update(self, self.steps)
        self._release_dropped()
        self._warn_if_dropped()
        return host.views(self.steps)

    def _host_arrays(self, rows: int, prompt_length: int) -> HostArrays:
        """The host buffers for `rows` rows after a prompt of `prompt_length` (made the first time)."""
        host = self._host
        if host is None or host.rows != rows or host.prompt_length != prompt_length:
            if host is not None and host.done and self.spill is not None:
                raise RuntimeError(f"recording spilled to host as {self.spill} (rows, prompt length), "
                                   f"asked for {(rows, prompt_length)}")
            host = self._host = HostArrays(rows, prompt_length, self._host_budget(), self.expected_steps)
        return host

    @contextmanager
    def attached(self, model) -> Iterator["Recording"]:
        """Install the forward-time capture the options ask for, for the duration of a run."""
        with ExitStack() as stack:
            if self.opts.attention or self.opts.prefill_attention:
                sink = _Sink(self._attention_sink, wants_full=self.opts.prefill_attention, defer=self._attention_defer)
                self.attention_mode = stack.enter_context(attention_mod.recording(model, sink))
            if self.opts.lens:
                stack.enter_context(lens_mod.capturing(model, self._residual_sink))
            try:
                yield self
            finally:
                self._flush_forward()


def _caller_level() -> int:
    """The `stacklevel` that points a warning at the caller of decoderlab's outermost frame (the user's `generate`
    line; torch's decorators sit between decoderlab's frames)."""
    package, frame, level, outermost = PACKAGE_DIR, sys._getframe(2), 2, 2
    while frame is not None:
        if frame.f_code.co_filename.startswith(package):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1
