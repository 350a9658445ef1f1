"""What a run records: `Record` options, a registry of small per-step recorders, and `Recording`.

Per-step scores are plain functions in a registry (as inseq's step functions), each taking the
loop's `StepContext` and returning named tensors for that step. `Recording` is the observer the
loop calls: it runs the recorders a `Record` asks for, and captures attention rows and residuals
during forwards. Everything stays on the model's device until a `Trace` is built.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .errors import RecordBudgetWarning, RecorderError, RecordError  # noqa: F401 (re-exported)
from .display import format_bytes
from . import attention as attention_mod
from . import lens as lens_mod
from .loop import State, StepContext
from .schema import SCHEMA

# A recorder takes the step's context and the run's Record, and returns named tensors [B, ...].
StepRecorder = Callable[[StepContext, "Record"], dict]
STEP_RECORDERS: dict[str, StepRecorder] = {}
BUILT_IN = ("choice", "candidates", "processors", "logits")
HOST_CHUNK = 64  # steps a `Recording(host=...)` keeps as tensors before moving them to its host buffers
DEFAULT_MEMORY_BUDGET = 2**30  # Record(memory_budget=...): 1 GiB of attention rows
DEVICE_SHARE = 8  # under a budget, the rows not yet on the host take at most 1/DEVICE_SHARE of it
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}



def recorder(name: str, *, replace: bool = False):
    """Register a per-step recorder under `name`.

    A taken name (a built-in such as "choice", whose arrays `trace.steps` reads, or another of yours)
    is refused unless `replace=True`, so a recorder cannot silently break the frames.
    """
    if not isinstance(name, str) or not name:
        raise RecorderError(f"recorder({name!r}): the name must be a non-empty string")
    if name in STEP_RECORDERS and not replace:
        raise RecorderError(f"a recorder named {name!r} is already registered "
                            f"({'built in' if name in BUILT_IN else 'by you'}): choose another name, "
                            "or pass replace=True to replace it")

    def register(fn: StepRecorder) -> StepRecorder:
        if not callable(fn):
            raise RecorderError(f"recorder({name!r}) decorates a function (ctx, record) -> dict of tensors")
        STEP_RECORDERS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class Record:
    """What to record at every step. The defaults are cheap (≤5% over plain `generate`)."""

    top_k: int = 20  # candidates kept per step
    processors: bool = True  # what each logits processor did
    logits: bool = False  # the full raw logits, as float16
    attention: bool = False  # the new token's attention row, every layer and head
    attention_layers: Sequence[int] | None = None
    attention_heads: Sequence[int] | None = None
    prefill_attention: bool = False  # also the prompt's full N×N matrices
    lens: bool = False  # logit lens: each layer's residual at the new position
    lens_top_k: int = 5
    extra: Sequence[str] = ()  # names of your own recorders (registered with @decoderlab.recorder)
    # the most memory attention rows may take (bytes, or text such as "512MiB", "2GiB"; None: no limit): past it
    # the oldest steps' rows are dropped, with one RecordBudgetWarning (see `Recording._keep_within_budget`)
    memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET

    def __post_init__(self):
        object.__setattr__(self, "memory_budget", parse_budget(self.memory_budget))
        for word in ("top_k", "lens_top_k"):
            v = getattr(self, word)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecordError(f"Record({word}={v!r}): must be a whole number >= 1")
        for word in ("processors", "logits", "attention", "prefill_attention", "lens"):
            if not isinstance(getattr(self, word), bool):
                raise RecordError(f"Record({word}={getattr(self, word)!r}): must be True or False")
        for word in ("attention_layers", "attention_heads"):
            v = getattr(self, word)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or not v or \
                    not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
                raise RecordError(f"Record({word}={v!r}): must be a non-empty list of indices >= 0, or None for all")
            object.__setattr__(self, word, tuple(v))
        extra = (self.extra,) if isinstance(self.extra, str) else tuple(self.extra)
        unknown = [n for n in extra if n not in STEP_RECORDERS]
        if unknown:
            raise RecordError(f"Record(extra={list(extra)!r}): no recorder registered as {unknown}; "
                             f"known: {sorted(STEP_RECORDERS)}")
        object.__setattr__(self, "extra", extra)

    def names(self) -> list[str]:
        """The per-step recorders this record runs, in order."""
        names = ["choice", "candidates"]
        if self.processors:
            names.append("processors")
        if self.logits:
            names.append("logits")
        return names + [n for n in self.extra if n not in names]

    def check(self, model) -> None:
        """Layer and head indices against the model they will be recorded from."""
        cfg = model.config.get_text_config()
        for word, size, what in (("attention_layers", getattr(cfg, "num_hidden_layers", None), "layers"),
                                 ("attention_heads", getattr(cfg, "num_attention_heads", None), "heads")):
            wanted = getattr(self, word)
            if wanted is not None and size is not None and max(wanted) >= size:
                raise RecordError(f"Record({word}={list(wanted)}): the model has {size} {what} (0..{size - 1})")


def parse_budget(value: int | str | None) -> int | None:
    """`Record(memory_budget=...)` as bytes: a whole number of bytes, or text "<number><unit>" with a unit of
    B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); None for no limit."""
    import re

    if value is None:
        return None
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            number = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if number is None or number < 1:
        raise RecordError(f"Record(memory_budget={value!r}): must be a number of bytes >= 1, text such as "
                          "'512MiB' or '2GiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), or None for no limit")
    return number


def _rank(scores: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """0-based rank of `token` in each row (ties count in the token's favour)."""
    return (scores > scores.gather(-1, token[:, None])).sum(-1)


def scores_distribution(ctx: StepContext, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, logsumexp, probabilities) of one of the step's score tensors, computed once per step.

    The tensors a step holds (raw logits, each processor's output, final scores) live until the step
    ends, so their ids key the memo; with no processors the final scores are the raw logits themselves.
    """
    key = id(x)
    if key not in ctx.memo:
        lse = torch.logsumexp(x, dim=-1, keepdim=True)
        ctx.memo[key] = (x, lse, torch.exp(x - lse))
    return ctx.memo[key]


def distribution(ctx: StepContext, final: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw or the final distribution of the step (see `scores_distribution`)."""
    return scores_distribution(ctx, ctx.scores if final else ctx.logits)


@recorder("choice")
def record_choice(ctx: StepContext, opts: Record) -> dict:
    """The chosen token, its logprob, rank and the entropy under the raw and the final distribution."""
    t = ctx.token[:, None]
    out = {"token_id": ctx.token, "forced": ctx.forced, "finished": ctx.finished}
    for prefix, final in (("", False), ("final_", True)):
        x, lse, p = distribution(ctx, final)
        stats = ctx.memo.get(("choice", id(x)))
        if stats is None:
            stats = ctx.memo[("choice", id(x))] = (
                (x.gather(-1, t) - lse).squeeze(-1), _rank(x, ctx.token), torch.special.entr(p).sum(-1))
        out[prefix + "logprob"], out[prefix + "rank"], out[prefix + "entropy"] = stats
    return out


def top_candidates(logits: torch.Tensor, raw_probs: torch.Tensor, final_probs: torch.Tensor, k: int) -> dict:
    """The top-k tokens by raw logit [B, k], with their raw and final probabilities (recorded each step,
    and shown by a session before it steps)."""
    top = torch.topk(logits, k, dim=-1)
    return {"cand_id": top.indices, "cand_logit": top.values, "cand_prob": raw_probs.gather(-1, top.indices),
            "cand_final_prob": final_probs.gather(-1, top.indices)}


@recorder("candidates")
def record_candidates(ctx: StepContext, opts: Record) -> dict:
    """The top-k tokens by raw logit, with raw and final probabilities."""
    k = min(opts.top_k, ctx.logits.shape[-1])
    return top_candidates(ctx.logits, distribution(ctx, False)[2], distribution(ctx, True)[2], k)


@recorder("processors")
def record_processors(ctx: StepContext, opts: Record) -> dict:
    """Per processor: the probability mass it removed, and the chosen token's rank and prob before and after."""
    if not ctx.stages:
        empty = ctx.logits.new_zeros(ctx.logits.shape[0], 0)
        return {"proc_mass_removed": empty, "proc_rank_before": empty.long(), "proc_rank_after": empty.long(),
                "proc_prob_after": empty}
    first = ctx.logits if ctx.inputs is None else ctx.inputs  # what the first processor received
    before = [first, *ctx.stages[:-1]]
    mass, rank_before, rank_after, prob_after = [], [], [], []
    for prev, cur in zip(before, ctx.stages):  # each stage's softmax is computed once, shared with its neighbour
        p_prev = scores_distribution(ctx, prev)[2]
        removed = torch.isneginf(cur) & ~torch.isneginf(prev)
        mass.append((p_prev * removed).sum(-1))
        rank_before.append(_rank(prev, ctx.token))
        rank_after.append(_rank(cur, ctx.token))
        prob_after.append(scores_distribution(ctx, cur)[2].gather(-1, ctx.token[:, None]).squeeze(-1))
    return {
        "proc_mass_removed": torch.stack(mass, -1),
        "proc_rank_before": torch.stack(rank_before, -1),
        "proc_rank_after": torch.stack(rank_after, -1),
        "proc_prob_after": torch.stack(prob_after, -1),
    }


@recorder("logits")
def record_logits(ctx: StepContext, opts: Record) -> dict:
    return {"logits": ctx.logits.to(torch.float16)}


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

    def __init__(self, opts: Record, num_layers: int | None = None, host: tuple[int, int] | None = None):
        self.opts = opts
        self.spill = host  # (rows, prompt length): move steps to `HostArrays` every HOST_CHUNK steps (`_spill`)
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
        self.attention_mode: str | None = None
        self._device: torch.device | None = None  # where a step's layers are gathered: the ids' device
        self._spilled = 0  # steps whose per-step tensors were let go (moved to the host: `_spill`)
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
        if self.spill is not None and self.steps - self._spilled >= HOST_CHUNK:
            self._spill()
        self._keep_within_budget()

    def _spill(self) -> None:
        """Move the steps so far into the host buffers and let go of their per-step tensors.

        Why: thousands of small per-step tensors kept alive between the large transient allocations of
        each forward fragment the heap (a 1,500-token run grew RSS by 0.9 GiB for 1 MB of records). In
        buffers that grow in chunks, a run holds a handful of allocations whatever its length; on a GPU the
        steps reach the host in batches of HOST_CHUNK (one synchronisation per batch).
        """
        self.arrays(*self.spill)
        done = self._host.done
        for buf in (*self.columns.values(), self.attention, self.residuals, self.row_ids):
            a, b = min(self._spilled, len(buf)), min(done, len(buf))
            buf[a:b] = [None] * (b - a)
        self._spilled = done
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
        return sum(x.nbytes for x in self.attention[self._att_lo:] if x is not None)

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
        import warnings

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
        self._att_deferred.clear()
        self._res_layers.clear()

    def copy(self) -> "Recording":
        """An independent recording with the same steps so far (a fork): lists copied, tensors shared."""
        other = Recording(self.opts, self.num_layers, self.spill)
        other.columns = {name: list(col) for name, col in self.columns.items()}
        other.attention = list(self.attention)
        other.residuals = list(self.residuals)
        other.row_ids = list(self.row_ids)
        other.prefill_attention = dict(self.prefill_attention)
        other._host = None if self._host is None else self._host.fork()
        other._spilled, other._att_lo, other._att_first = self._spilled, self._att_lo, self._att_first
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
        for (_, _, _, scaling), items in self._att_deferred.items():
            rows = attention_mod.last_rows([q for _, q, _ in items], [k for _, _, k in items], scaling)
            for (layer, _, _), row in zip(items, self._rows_to_keep(rows)):
                self._att_layers[layer] = row
        self._att_deferred = {}
        if self._att_layers:
            self._store(self.attention, self._gather({i: self._fit_context(r) for i, r in self._att_layers.items()}))
            self._att_layers = {}
        if self._res_layers:
            self._store(self.residuals, self._gather(self._res_layers).float())
            self._res_layers = {}

    def forward_capture(self) -> tuple[dict, dict]:
        """What the forward running now has handed the recording (attention rows, residuals by layer): while a
        decode step is captured as a CUDA graph, tensors of the graph's memory (`fast.CapturedDecoder`)."""
        return dict(self._att_layers), dict(self._res_layers)

    def replay_capture(self, captured: tuple[dict, dict]) -> None:
        """Hand the recording what a captured forward handed it (`forward_capture`), before the graph's replay
        rewrites those tensors: the step's flush copies them out, as after an eager forward."""
        self._att_layers, self._res_layers = dict(captured[0]), dict(captured[1])

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
        host = self._host
        if host is None or host.rows != rows or host.prompt_length != prompt_length:
            if host is not None and host.done and self.spill is not None:
                raise RuntimeError(f"recording spilled to host as {self.spill} (rows, prompt length), "
                                   f"asked for {(rows, prompt_length)}")
            host = self._host = HostArrays(rows, prompt_length, self._host_budget())
        host.update(self, self.steps)
        self._release_dropped()
        self._warn_if_dropped()
        return host.views(self.steps)

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
    import os
    import sys

    package, frame, level, outermost = os.path.dirname(__file__), sys._getframe(2), 2, 2
    while frame is not None:
        if frame.f_code.co_filename.startswith(package):
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1


def _stack_rows(items: list, row_ids: list, rows: int, full: bool, name: str, zero: bool = False) -> torch.Tensor:
    """Per-step tensors [B_t, ...] -> one [S, rows, ...], each step's B_t rows placed at their run indices.

    Missing entries (a retired row; a step that recorded nothing) get the schema's fill value, or 0.
    """
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


def _on_host(items: list) -> list:
    """Per-step tensors (or None) as numpy arrays, in one copy where they share their leading shape (rows that
    grow by a key each step are right-padded, then cut back): a chunk of steps reaches the host with one
    synchronisation, not one per step, so a GPU's forward made ahead keeps running meanwhile."""
    present = [x for x in items if x is not None]
    if len(present) < 2 or len({(x.shape[:-1], x.dtype, x.device) for x in present}) > 1:
        return [None if x is None else _host(x) for x in items]
    width = max(x.shape[-1] for x in present)
    block = iter(_host(torch.stack([torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in present])))
    return [None if x is None else next(block)[..., : x.shape[-1]] for x in items]


def _host(x: torch.Tensor) -> "np.ndarray":
    """A recorded tensor as a numpy array on the host; bfloat16 (a strategy's decision computed in the model's
    dtype, such as contrastive search's penalty), which numpy lacks, as float32: the same numbers."""
    return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()


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

    def __init__(self, rows: int, prompt_length: int, budget: int | None = None):
        import weakref

        self.rows, self.prompt_length = rows, prompt_length
        self.bufs: dict[str, "np.ndarray"] = {}
        self.done = 0  # steps converted
        self.capacity = 0
        self.budget = budget  # bytes the attention buffer may take (None: no limit)
        self.att_first = 0  # steps before it have no attention rows (dropped to stay within the budget)
        self.att_base = 0  # the step of the attention buffer's slot 0
        self._views: list[tuple] = []  # (weak reference to a view handed out, its steps)
        self._family = weakref.WeakSet([self])  # owners sharing these buffers (forks)

    def forget(self, steps: int) -> None:
        """Steps from `steps` on are to be converted again (a rewind, or a failed step)."""
        self.done = min(self.done, steps)
        self.att_first = min(self.att_first, steps)

    def fork(self) -> "HostArrays":
        """A second owner of the same buffers (a forked session); either copies them before writing rows
        that a view of the other still shows."""
        other = HostArrays(self.rows, self.prompt_length, self.budget)
        other.bufs, other.done, other.capacity = dict(self.bufs), self.done, self.capacity
        other.att_first, other.att_base = self.att_first, self.att_base
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
            dtype = _host(torch.empty(0, dtype=like.dtype)).dtype
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
        capacity = max(2 * steps, 64)
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
        if buf is not None:  # the rows kept that were converted before
            lo, hi = max(first, self.att_first, self.att_base), min(self.done, steps, self.att_base + buf.shape[0])
            if lo < hi:
                k = min(buf.shape[-1], width)
                new[lo - first : hi - first, ..., :k] = buf[lo - self.att_base : hi - self.att_base, ..., :k]
        self.bufs["attention"] = new
        self.att_base, self.att_first = first, max(self.att_first, first)
        return new

    def _update_attention(self, rec: "Recording", a: int, steps: int, ids: list, full: bool, copy: bool) -> None:
        """Convert the attention rows of steps [a, steps) that the buffer keeps."""
        self.att_first = max(self.att_first, rec._att_first)
        items = rec.attention
        like = next((x for x in items[a:steps] if x is not None), None)
        buf = self.bufs.get("attention")
        if like is None and buf is None:
            return
        inner, dtype = (like.shape[1:-1], _host(like[:0]).dtype) if like is not None else (buf.shape[2:-1], buf.dtype)
        buf = self._attention_buffer(tuple(inner), dtype, steps, copy)
        lo = max(a, self.att_first)
        for s, x in zip(range(lo, steps), _on_host([items[s] if s < len(items) else None for s in range(lo, steps)])):
            slot = s - self.att_base
            buf[slot] = 0
            if x is not None:
                where = slice(None) if ids[s - a] is None or full else ids[s - a].cpu().numpy()
                buf[slot, where, ..., : x.shape[-1]] = x

    def update(self, rec: "Recording", steps: int) -> None:
        """Convert the steps not yet on the host."""
        copy = self.done < steps and not self._free_from(self.done)  # a view still shows rows about to be written
        if steps > self.capacity:
            self._resize(max(2 * steps, 64))
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
                block = _host(_stack_rows(col[a:steps], ids, self.rows, full, name))
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
            for s, x in zip(range(a, steps), _on_host(items)):
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
