"""The decode loop: prefill once, then one token at a time over a KV cache.

Read it top to bottom: `forward` runs the model, `prefill` makes a `State`, `process` applies the
strategy's processors, `step` chooses one token, `run` steps to a stop, and `teacher_force` scores
given tokens through the same processors and observers. The state holds B rows (one per seed of
`generate(seeds=...)`), each with its own random generator; a row that reaches EOS while others run
on leaves the batch (`retire_finished`). Recording is not woven in: `step` hands a `StepContext` to
whatever observers are attached, and works the same with none; only the loop makes a `StepContext`.

A chosen token is forwarded lazily, at the start of the next step (`State.pending`): a run that
stops does no forward it will not use (as `generate`), and a session can rewind by cropping the
cache without recomputing the prefix.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
from transformers import DynamicCache

from ..errors import NumericError
from .strategy import Strategy


@dataclass
class State:
    """Everything a run needs to take its next step."""

    ids: torch.Tensor  # [B, T]: prompt + generated tokens of the rows still running
    cache: DynamicCache | None  # holds every position but the pending one (None when teacher forcing)
    prompt_length: int
    generators: list  # one torch.Generator (or None) per row
    finished: torch.Tensor  # [B] bool
    next_logits: torch.Tensor | None = None  # [B, V] float32: the model's output for the next token
    pending: torch.Tensor | None = None  # [B] chosen but not yet forwarded
    stop_reason: str | None = None
    row_ids: torch.Tensor | None = None  # [B] each running row's index in the run (rows retire at EOS)
    retired: dict = field(default_factory=dict)  # run row index -> its ids [T'] when it finished
    keep_hidden: bool = False  # keep every layer's hidden states of the last forward (DoLa, contrastive search)
    hidden: tuple | None = None  # those: (embeddings, layer 1, ..., last layer after the final norm), [B, T_new, D]
    extra: dict = field(default_factory=dict)  # what a strategy's own rule carries from step to step
    forward: Callable | None = None  # runs this state's forwards instead of `forward` (the fast path's captured step)
    finished_flag: tuple | None = None  # (finished, read): whether all of `finished` is True, read later (`should_stop`)

    def __post_init__(self):
        if self.row_ids is None:
            self.row_ids = torch.arange(self.ids.shape[0], device=self.ids.device)

    @property
    def rows(self) -> int:
        """Rows still in the batch."""
        return self.ids.shape[0]

    @property
    def total_rows(self) -> int:
        """Rows the run started with, running or retired."""
        return self.ids.shape[0] + len(self.retired)

    def sequences(self) -> list[torch.Tensor]:
        """Every row's ids (prompt + generated), in run order, the retired rows' as they ended."""
        running = {int(r): self.ids[i] for i, r in enumerate(self.row_ids.tolist())}
        return [running[r] if r in running else self.retired[r] for r in range(self.total_rows)]

    @property
    def steps(self) -> int:
        """How many tokens have been generated."""
        return self.ids.shape[1] - self.prompt_length


@dataclass
class StepContext:
    """What observers see at each step (one argument object, as inseq's step functions)."""

    step: int
    ids: torch.Tensor  # [B, T] before this step's token
    logits: torch.Tensor  # [B, V] raw float32
    scores: torch.Tensor  # [B, V] after every processor
    stages: list[torch.Tensor]  # scores after each processor, in order (empty unless kept)
    token: torch.Tensor  # [B] the chosen token
    forced: torch.Tensor  # [B] bool: chosen by the user, not the chooser
    finished: torch.Tensor  # [B] bool: rows already done before this step (they emit padding)
    rows: torch.Tensor | None = None  # [B] each row's index in the run (None: 0..B-1)
    decision: dict = field(default_factory=dict)  # what a strategy's own rule decided, per row [B, ...]
    inputs: torch.Tensor | None = None  # [B, V] what the first processor received, when not the raw logits (DoLa)
    memo: dict = field(default_factory=dict)  # work recorders share within one step


class Observer(Protocol):
    """Anything that wants to see the loop: a recorder, a progress bar, a streamer."""

    keep_stages: bool

    def before_forward(self, state: State, step: int) -> None: ...

    def on_step(self, ctx: StepContext) -> None: ...


_CACHE_WORD: dict[type, str] = {}


def _cache_word(model) -> str:
    """transformers 5.x calls the cache argument `cache`; earlier releases `past_key_values`."""
    cls = type(model)
    if cls not in _CACHE_WORD:
        params = inspect.signature(model.forward).parameters
        _CACHE_WORD[cls] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_WORD[cls]


@torch.inference_mode()
def forward(model, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
    """Run the model over new positions with the cache; return the last position's logits as float32."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1, **{_cache_word(model): cache})
    # on the ids' device, as generate does (a model sharded with device_map may end on another one)
    return out.logits[:, -1].to(dtype=torch.float32, device=input_ids.device, copy=True)


@torch.inference_mode()
def forward_hidden(model, input_ids: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, tuple]:
    """`forward`, also returning every layer's hidden states at the new positions (as `output_hidden_states`)."""
    out = model(input_ids=input_ids, use_cache=True, output_hidden_states=True, logits_to_keep=1,
                **{_cache_word(model): cache})
    logits = out.logits[:, -1].to(dtype=torch.float32, device=input_ids.device, copy=True)
    return logits, tuple(out.hidden_states)


def _forward(model, state: "State", input_ids: torch.Tensor) -> torch.Tensor:
    if state.forward is not None:
        return state.forward(model, state, input_ids)
    if state.keep_hidden:
        logits, state.hidden = forward_hidden(model, input_ids, state.cache)
        return logits
    return forward(model, input_ids, state.cache)


def notify_forward(observers: Sequence[Observer], state: State, step: int) -> None:
    for o in observers:
        o.before_forward(state, step)


def prefill(
    model,
    prompt_ids: torch.Tensor,
    strategy: Strategy,
    observers: Sequence[Observer] = (),
    seeds: Sequence[int | None] | None = None,
    cache: DynamicCache | None = None,
    keep_hidden: bool = False,
    rows: int | None = None,
) -> State:
    """Forward the prompt once and return a state whose next logits are step 0's.

    The default cache is the one `generate` builds (sliding-window layers keep only their window).
    A plain `DynamicCache()` keeps every position in every layer, so it can be cropped anywhere.

    `rows=n` with a one-row prompt [1, P] starts n rows that share it: the prompt is forwarded once and its KV
    cache and logits are repeated n times, so n samples of one prompt pay for one prefill, and each row's step 0
    sees the very numbers a run alone sees. What observers capture during that forward (attention rows, lens
    residuals) holds one row, and a fixed-size cache cannot grow rows: for those, pass the prompt n times instead.
    """
    shared = rows is not None and rows > 1
    if shared and prompt_ids.shape[0] != 1:
        raise ValueError(f"rows={rows} shares one prompt: give it as one row [1, P], not {tuple(prompt_ids.shape)}")
    rows = rows if shared else prompt_ids.shape[0]
    state = State(
        ids=prompt_ids.expand(rows, -1) if shared else prompt_ids,
        cache=DynamicCache(config=model.config) if cache is None else cache,
        prompt_length=prompt_ids.shape[1],
        generators=strategy.generators(rows, prompt_ids.device, seeds),
        finished=torch.zeros(rows, dtype=torch.bool, device=prompt_ids.device),
        keep_hidden=keep_hidden,
    )
    notify_forward(observers, state, 0)
    state.next_logits = _forward(model, state, prompt_ids)
    if shared:
        state.cache.batch_repeat_interleave(rows)
        state.next_logits = state.next_logits.repeat(rows, 1)
        if state.hidden is not None:
            state.hidden = tuple(h.expand(rows, *h.shape[1:]) for h in state.hidden)
    return state


def ensure_logits(model, state: State, observers: Sequence[Observer] = ()) -> torch.Tensor:
    """Forward the pending token, if any, so that `state.next_logits` is the next step's."""
    if state.pending is not None:
        notify_forward(observers, state, state.steps)
        state.next_logits = _forward(model, state, state.pending[:, None])
        state.pending = None
    return state.next_logits


@torch.inference_mode()
def process(strategy: Strategy, ids: torch.Tensor, logits: torch.Tensor, keep_stages: bool,
            step: int | None = None, checked: bool = True):
    """Apply the processors in order; return the final scores and, if asked, each stage's scores.

    The raw logits are never handed to a processor (one may work in place); with `keep_stages`
    every processor gets its own copy, so each stage stays as that processor left it. Numbers that
    cannot be (`numeric_fault`) stop the step with a `NumericError` naming the step and the processor
    (`checked=False`: the caller checks, later; `check_numbers`).
    """
    scores, stages = logits, []
    for i, processor in enumerate(strategy.processors):
        scores = processor(ids, scores.clone() if keep_stages or i == 0 else scores)
        if keep_stages:
            stages.append(scores)
    if checked:
        check_numbers(strategy, ids, logits, scores, step)
    return scores, stages


def check_numbers(strategy: Strategy, ids: torch.Tensor, logits: torch.Tensor, scores: torch.Tensor,
                  step: int | None, read: Callable[[torch.Tensor], Callable[[], bool]] | None = None,
                  faults: torch.Tensor | None = None) -> Callable[[], None]:
    """Raise a `NumericError` if the step's numbers cannot be (`numeric_fault`): the step's one extra host
    synchronisation. `read` (the fast path's `CapturedDecoder.host_flag`) defers it: the fault is computed now, and
    the returned function raises when called, waiting only for the work queued before it. `faults`:
    `numeric_fault(logits, scores)`, if computed already."""
    fault = (numeric_fault(logits, scores) if faults is None else faults).any()
    read_fault = (lambda: bool(fault)) if read is None else read(fault)

    def check() -> None:
        if read_fault():
            raise _numeric_error(strategy, ids, logits, step)
    if read is None:
        check()
    return check


def numeric_fault(logits: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Per row: NaN in the raw logits or the scores, +inf in either, or every score at -inf (nothing left to
    choose). -inf in raw logits is allowed: a model may mask tokens that way.

    Read off each row's maximum (a max is NaN if any element is, else +inf if any is, and -inf only if all are):
    two passes over the vocabulary and a few launches, where a test per kind of fault took five passes."""
    raw, final = logits.amax(-1), scores.amax(-1)
    return torch.isnan(raw) | torch.isposinf(raw) | ~torch.isfinite(final)


def _numeric_error(strategy: Strategy, ids: torch.Tensor, logits: torch.Tensor, step: int | None) -> NumericError:
    """Find what produced the bad numbers (the model, or the first processor after which they appear)."""
    at = f"step {step}" if step is not None else "this step"

    def what(t: torch.Tensor) -> str:
        return "NaN" if bool(torch.isnan(t).any()) else "+inf" if bool(torch.isposinf(t).any()) else "-inf everywhere"

    no_scores = torch.zeros_like(logits)
    if bool(numeric_fault(logits, no_scores).any()):
        rows = numeric_fault(logits, no_scores).nonzero().flatten().tolist()
        return NumericError(f"{at}: the model's logits hold {what(logits)} (rows {rows}); check the weights and dtype "
                            "(float16 overflows: try bfloat16 or float32)", step=step, processor="model")
    scores = logits.clone()
    for processor in strategy.processors:
        scores = processor(ids, scores)
        bad = numeric_fault(logits, scores)
        if bool(bad.any()):
            name = type(processor).__name__
            return NumericError(f"{at}: after {name}, the scores hold {what(scores[bad])} (rows "
                                f"{bad.nonzero().flatten().tolist()}): nothing valid is left to choose from; check "
                                f"{name}'s settings", step=step, processor=name)
    return NumericError(f"{at}: the scores hold NaN or infinity", step=step)


@torch.inference_mode()
def step(
    model,
    state: State,
    strategy: Strategy,
    observers: Sequence[Observer] = (),
    force: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token for every row; return it. `force` (ids, -1 = free) overrides the chooser.

    On the fast path (`state.forward.forwards_ahead`) the host waits for nothing before the next forward is
    queued: the chosen token is forwarded at once, then the numbers are checked (waiting for this step's processors
    only, not for that forward), and whether every row has finished is read the same way (`should_stop`). So the
    device always has the next forward to run while the host records a step."""
    logits = ensure_logits(model, state, observers)
    keep = any(o.keep_stages for o in observers)
    decoder = state.forward
    if decoder is None or getattr(decoder, "forwards_ahead", None) is None or \
            not decoder.forwards_ahead(state, strategy):
        scores, stages = process(strategy, state.ids, logits, keep, state.steps)
        return choose(state, strategy, logits, scores, stages, observers, force)
    scores, stages = process(strategy, state.ids, logits, keep, state.steps, checked=False)
    faults = numeric_fault(logits, scores)
    check = check_numbers(strategy, state.ids, logits, scores, state.steps, read=decoder.host_flag, faults=faults)
    # until `check` raises, a row with bad numbers must not reach a sampler (torch.multinomial refuses NaN)
    usable = torch.where(faults[:, None], torch.zeros_like(scores), scores) if strategy.do_sample else None

    def ahead(advanced: State) -> None:
        advanced.finished_flag = (advanced.finished, decoder.host_flag(advanced.finished.all()))
        ensure_logits(model, advanced, observers)
        check()

    return choose(state, strategy, logits, scores, stages, observers, force, ahead=ahead, choose_from=usable)


@torch.inference_mode()
def choose(
    state: State,
    strategy: Strategy,
    logits: torch.Tensor,
    scores: torch.Tensor,
    stages: list[torch.Tensor],
    observers: Sequence[Observer] = (),
    force: torch.Tensor | None = None,
    decision: dict | None = None,
    inputs: torch.Tensor | None = None,
    ahead: Callable[[State], None] | None = None,
    choose_from: torch.Tensor | None = None,
) -> torch.Tensor:
    """The end of every step: the chooser picks from `scores` (`force` overrides it, finished rows get padding),
    observers see the step (`decision`: what a strategy's own rule decided, e.g. DoLa's layer), and the token
    is appended, to be forwarded at the start of the next step. `step` and DoLa's step end here.

    `ahead(state)` (the fast path) forwards the token at once instead, before the observers see the step: the
    host records this step while the GPU runs the next forward. It may raise (the step's numbers, checked after
    that forward is queued): the run then ends with the steps before, unrecorded. Otherwise a failing observer
    leaves the state as it was before the step. `choose_from`: what the chooser picks from, when not `scores`
    (the fast path's scores with rows whose numbers fail the deferred check blanked)."""
    token = strategy.chooser(scores if choose_from is None else choose_from, state.generators)
    forced = torch.zeros_like(state.finished)
    if force is not None:
        forced = force >= 0
        token = torch.where(forced, force, token)
    if strategy.pad_token_id is not None:
        token = torch.where(state.finished, torch.full_like(token, strategy.pad_token_id), token)
    ctx = StepContext(state.steps, state.ids, logits, scores, stages, token, forced, state.finished, state.row_ids,
                      {} if decision is None else decision, inputs)
    if ahead is not None:
        _append(state, strategy, token)
        ahead(state)
    for o in observers:
        o.on_step(ctx)
    if ahead is None:
        _append(state, strategy, token)
    return token


def _append(state: State, strategy: Strategy, token: torch.Tensor) -> None:
    """The chosen token joins the rows' ids, pending its forward (the step's context keeps the tensors before)."""
    state.ids = torch.cat([state.ids, token[:, None]], dim=-1)
    state.pending = token
    if strategy.eos_token_ids:
        state.finished = state.finished | torch.isin(token, strategy.eos_tensor(token.device))


def retire_finished(state: State) -> None:
    """Take rows that reached EOS out of the batch (cache, ids, generators), so they cost nothing more.

    Only while other rows still run: a run of one row, or a session, keeps its row (and can rewind). A run whose
    forwards are captured (`state.forward`, the fast path) keeps its rows too: the graph's shapes are fixed, and
    finished rows emit padding, as in `generate`.
    """
    if state.rows < 2 or state.pending is None or state.forward is not None or not bool(state.finished.any()):
        return
    done = state.finished.tolist()
    if all(done):
        return
    for i, (row, is_done) in enumerate(zip(state.row_ids.tolist(), done)):
        if is_done:
            state.retired[row] = state.ids[i]
    kept = [i for i, d in enumerate(done) if not d]
    keep = torch.tensor(kept, device=state.ids.device)
    state.ids = state.ids[keep]
    state.cache.batch_select_indices(torch.tensor(kept))  # host indices serve every device of a sharded model
    state.generators = [state.generators[i] for i in keep.tolist()]
    state.finished = state.finished[keep]
    state.pending = state.pending[keep]
    state.row_ids = state.row_ids[keep]


def window_full(length: int, window: int | None) -> bool:
    """The one context-window check: a step can be taken from `length` positions only if the model
    has room for them (every position the next forward reads is < `window`)."""
    return window is not None and length >= window


def should_stop(state: State, strategy: Strategy, max_length: int | None = None) -> str | None:
    """The reason to stop now, or None. Checking `finished` is a host synchronisation (rows finish at EOS, and
    in a comparison also when their beam search ends or their numbers go wrong); on the fast path it waits on
    an event instead (`State.finished_flag`), not for the forward queued since."""
    done = state.finished_flag
    if done[1]() if done is not None and done[0] is state.finished else bool(state.finished.all()):
        return "eos"
    if state.steps >= strategy.max_new_tokens:
        return "max_new_tokens"
    if window_full(state.ids.shape[1], max_length):
        return "context_window"
    return None


def generator_states(state: State) -> list:
    """Every row's random-generator state (None for an unseeded row), to restore later."""
    return [None if g is None else g.get_state() for g in state.generators]


def restore_generators(state: State, saved: list) -> None:
    """Put the generators back as `generator_states` found them (a rewind, or a failed step)."""
    for g, st in zip(state.generators, saved):
        if g is not None:
            g.set_state(st)


def copy_state(state: State) -> State:
    """An independent copy (a fork): ids, cache and generators are copied, nothing is shared."""
    import copy

    gens = []
    for g in state.generators:
        clone = None
        if g is not None:
            clone = torch.Generator(device=g.device)
            clone.set_state(g.get_state())
        gens.append(clone)
    return State(ids=state.ids.clone(), cache=copy.deepcopy(state.cache), prompt_length=state.prompt_length,
                 generators=gens, finished=state.finished.clone(),
                 next_logits=None if state.next_logits is None else state.next_logits.clone(),
                 pending=None if state.pending is None else state.pending.clone(), stop_reason=state.stop_reason,
                 row_ids=state.row_ids.clone(), retired=dict(state.retired))


def run(
    model,
    state: State,
    strategy: Strategy,
    observers: Sequence[Observer] = (),
    max_length: int | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    max_steps: int | None = None,
    step_fn: Callable = step,
) -> State:
    """Step until EOS, `max_new_tokens`, the context window, or `max_steps` more steps.

    `on_token(step, tokens, rows)` sees each step's tokens of the running rows and their run indices.
    `step_fn` is the step of a strategy with its own rule (DoLa, contrastive search), `step`'s signature.
    Rows that reach EOS leave the batch while others run on (`retire_finished`).
    """
    taken = 0
    state.stop_reason = should_stop(state, strategy, max_length)
    while state.stop_reason is None and (max_steps is None or taken < max_steps):
        token = step_fn(model, state, strategy, observers)
        taken += 1
        if on_token is not None:
            on_token(state.steps - 1, token, state.row_ids)
        state.stop_reason = should_stop(state, strategy, max_length)
        if state.stop_reason is None:
            retire_finished(state)
    return state


@torch.inference_mode()
def teacher_force(
    model,
    prompt_ids: torch.Tensor,
    continuation: torch.Tensor,
    strategy: Strategy,
    observers: Sequence[Observer] = (),
) -> State:
    """Score given tokens: one forward over prompt + continuation, then each position as a step whose
    token is the given one (what `step` would record had the chooser picked it). One row."""
    full = torch.cat([prompt_ids[0], continuation])[None]
    prompt_length = prompt_ids.shape[1]
    out = model(input_ids=full, use_cache=False)
    logits = out.logits[0, prompt_length - 1 : -1].to(dtype=torch.float32, device=full.device)
    keep = any(o.keep_stages for o in observers)
    no = torch.zeros(1, dtype=torch.bool, device=full.device)
    rows = torch.zeros(1, dtype=torch.long, device=full.device)
    for t in range(continuation.numel()):
        prefix = full[:, : prompt_length + t]
        scores, stages = process(strategy, prefix, logits[t : t + 1], keep, t)
        ctx = StepContext(t, prefix, logits[t : t + 1], scores, stages, continuation[t : t + 1], no, no, rows)
        for o in observers:
            o.on_step(ctx)
    return State(ids=full, cache=None, prompt_length=prompt_length, generators=[None], finished=no.clone(),
                 stop_reason="given")


def crop(state: State, steps: int, eos_token_ids: Sequence[int] = ()) -> None:
    """Go back to just before step `steps`: keep `steps` generated tokens; re-forward only the last one."""
    if state.retired:
        raise ValueError("cannot crop a run whose rows have retired from the batch (sessions hold one row)")
    keep = state.prompt_length + steps
    state.ids = state.ids[:, :keep]
    cache_len = state.cache.get_seq_length()
    target = keep - 1  # the last kept token becomes pending, so its row is recomputed fresh
    if cache_len > target:
        state.cache.crop(target - cache_len)  # negative: remove that many (all 5.x releases accept it)
    state.pending = state.ids[:, -1]
    state.next_logits = None
    generated = state.ids[:, state.prompt_length :]
    if eos_token_ids and generated.shape[1]:
        eos = torch.tensor(list(eos_token_ids), device=generated.device)
        state.finished = torch.isin(generated, eos).any(dim=1)
    else:
        state.finished = torch.zeros_like(state.finished)
    state.stop_reason = None
