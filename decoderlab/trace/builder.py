"""Building a `Trace`, in one place, from any source: a local run's recording, or token strings and logprobs.

Why a module of its own: a trace needs to know little about where it came from (a model's name,
how to show a token id as text, the EOS ids, which layers and heads were recorded, and a lens if
residuals were kept), and nothing of a model. Keeping that to a small `ModelInfo` lets a local
model, a session, teacher forcing, a comparison of many runs, and a server reached over HTTP all
make the same `Trace` the same way; `from_tokens` serves sources that only have text and logprobs
(and the tests' hand-made traces).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..engine.loop import State
from ..engine.rules.beams import BeamRun
from ..engine.strategy import Strategy
from ..engine.words import describe
from ..record import Recording
from ..record.schema import SCHEMA, check_arrays, conform
from .trace import Trace

__all__ = ["ModelInfo", "RunInfo", "build_trace", "from_recording", "from_tokens"]


@dataclass
class ModelInfo:
    """What a trace needs of the model that made it. No model object: a server's model fits too."""

    name: str = ""
    token_text: Callable[[int], str] | None = None  # id -> the text a reader should see
    decode: Callable[[list[int]], str] | None = None  # ids -> text with special tokens skipped
    num_layers: int = 0
    num_heads: int = 0
    lens: Any = None  # an engine.lens.Lens, for traces that keep residuals


@dataclass
class RunInfo:
    """What a trace needs of the run: the prompt, the strategy as resolved, how it stopped."""

    prompt: str = ""
    prompt_ids: Sequence[int] = ()
    strategy: dict = field(default_factory=dict)
    processor_names: list[str] = field(default_factory=list)
    chooser: str = "greedy"
    eos_token_ids: Sequence[int] = ()
    stop_reason: str | None = None
    seeds: Sequence[int | None] | None = None  # per row
    attention_layers: Sequence[int] | None = None  # None: every layer of the model
    attention_heads: Sequence[int] | None = None
    prefill_attention: dict = field(default_factory=dict)
    lens_top_k: int = 5
    branch: int = 0
    parent: int | None = None
    fork_step: int | None = None
    token_text: Mapping[int, str] | None = None  # a source with no tokenizer names its ids' text here
    memory_budget: int | None = None  # Record(memory_budget=...) the run recorded under


def build_trace(arrays: Mapping[str, Any], model: ModelInfo, run: RunInfo) -> Trace:
    """The one way a `Trace` is made: arrays checked against the schema, token text, per-row facts."""
    arrays = conform(arrays)
    check_arrays(arrays, where="build_trace")
    prompt_ids = np.asarray(list(run.prompt_ids), dtype=np.int64)
    steps, rows = arrays["token_id"].shape
    token_text = dict(run.token_text or {})
    seen = {int(i) for i in prompt_ids}
    for name in ("token_id", "cand_id", "beam_token"):
        if name in arrays:
            seen.update(int(i) for i in np.unique(arrays[name]) if i >= 0)
    missing = sorted(seen - set(token_text))
    if missing:
        if model.token_text is None:
            raise ValueError(f"build_trace: no text for token ids {missing[:10]} (give ModelInfo.token_text "
                             "or RunInfo.token_text)")
        token_text.update((i, model.token_text(i)) for i in missing)
    finished = arrays.get("finished")
    eos = set(int(e) for e in run.eos_token_ids)
    texts, stops = [], []
    for r in range(rows):
        alive = np.arange(steps) if finished is None else np.flatnonzero(~finished[:, r])
        ids = [int(i) for i in arrays["token_id"][alive, r]]
        ended = bool(ids) and ids[-1] in eos
        kept = ids[:-1] if ended else ids
        texts.append(model.decode(kept) if model.decode is not None else "".join(token_text[i] for i in kept))
        stops.append("eos" if ended else run.stop_reason)
    seeds = list(run.seeds) if run.seeds is not None else [run.strategy.get("seed")] * rows
    if len(seeds) != rows:
        raise ValueError(f"build_trace: {len(seeds)} seeds for {rows} rows")
    layers = run.attention_layers if run.attention_layers is not None else range(model.num_layers)
    heads = run.attention_heads if run.attention_heads is not None else range(model.num_heads)
    return Trace(
        prompt=run.prompt, prompt_ids=prompt_ids, arrays=arrays, token_text=token_text, model_name=model.name,
        strategy=dict(run.strategy), processor_names=list(run.processor_names), stop_reason=run.stop_reason,
        texts=texts, chooser=run.chooser, attention_layers=list(layers), attention_heads=list(heads),
        prefill_attention=dict(run.prefill_attention), branch=run.branch, parent=run.parent,
        fork_step=run.fork_step, lens_top_k=run.lens_top_k,
        lens_object=model.lens if "residual" in arrays else None,
        row_stop_reasons=stops, seeds=seeds, memory_budget=run.memory_budget,
    )


def from_recording(recording: "Recording", state: "State", strategy: "Strategy", model: ModelInfo,
                   prompt_text: str, *, chooser: str | None = None, seeds: Sequence[int | None] | None = None,
                   branch: int = 0, parent: int | None = None, fork_step: int | None = None,
                   rows: int | None = None) -> Trace:
    """The trace of a local run (generate, a session's branch, teacher forcing, a comparison's group: `rows`, the
    group's, when the recording holds only some of the state's rows)."""
    rows = state.total_rows if rows is None else rows
    arrays = recording.arrays(rows, state.prompt_length)
    opts = recording.opts
    if seeds is None:
        seeds = [strategy.seed] * rows
    run = RunInfo(
        prompt=prompt_text, prompt_ids=state.sequences()[0][: state.prompt_length].tolist(),
        strategy=describe(strategy), processor_names=strategy.processor_names,
        chooser=chooser or strategy.chooser_name, eos_token_ids=strategy.eos_token_ids,
        stop_reason=state.stop_reason, seeds=seeds, attention_layers=opts.attention_layers,
        attention_heads=opts.attention_heads,
        prefill_attention={k: v.cpu().numpy() for k, v in recording.prefill_attention.items()},
        lens_top_k=opts.lens_top_k, branch=branch, parent=parent, fork_step=fork_step,
        memory_budget=opts.memory_budget,
    )
    return build_trace(arrays, model, run)


def from_beam_run(run: "BeamRun", recording: "Recording", strategy: "Strategy", model: ModelInfo, prompt_text: str,
                  prompt_ids: Sequence[int]) -> Trace:
    """The trace of a beam search: the returned sequences as rows, best first, each with its normalised score,
    and the whole tree."""
    opts = recording.opts
    rows = len(run.hypotheses)
    arrays = _beam_arrays(run, recording, len(prompt_ids))
    info = RunInfo(prompt=prompt_text, prompt_ids=list(prompt_ids), strategy=describe(strategy),
                   processor_names=strategy.processor_names, chooser=strategy.chooser_name,
                   eos_token_ids=strategy.eos_token_ids, stop_reason=run.stop_reason, seeds=[strategy.seed] * rows,
                   attention_layers=opts.attention_layers, attention_heads=opts.attention_heads,
                   lens_top_k=opts.lens_top_k, memory_budget=opts.memory_budget,
                   # the prompt's matrices are the same for every beam: one row per returned sequence
                   prefill_attention={k: v[:1].expand(rows, *v.shape[1:]).cpu().numpy()
                                      for k, v in recording.prefill_attention.items()})
    trace = build_trace(arrays, model, info)
    trace.row_scores = [h.score for h in run.hypotheses]
    # a returned sequence that did not end at EOS was finalised at the length limit
    trace.row_stop_reasons = ["eos" if r == "eos" else "max_new_tokens" for r in trace.row_stop_reasons]
    return trace


def _beam_arrays(run: BeamRun, recording, prompt_length: int) -> dict:
    """The trace's arrays: one row per returned hypothesis, each step taken from the candidate on its path
    (attention and residuals from its parent beam's forward), plus the whole tree as `beam_*` arrays."""
    steps, rows = run.steps, len(run.hypotheses)
    paths = [h.path for h in run.hypotheses]
    out: dict[str, np.ndarray] = {}
    finished = np.ones((steps, rows), dtype=bool)
    for r, path in enumerate(paths):
        finished[: len(path), r] = False

    for name, col in recording.columns.items():
        if not col or name == "finished":
            continue
        field = SCHEMA.get(name)
        fill = 0 if field is None else field.fill
        first = col[0]
        arr = np.full((steps, rows, *first.shape[1:]), fill, dtype=torch.empty(0, dtype=first.dtype).numpy().dtype)
        for t in range(steps):
            block = col[t].cpu().numpy()
            for r, path in enumerate(paths):
                if t < len(path):
                    arr[t, r] = block[path[t]]
        out[name] = arr
    out["finished"] = finished
    candidate = np.full((steps, rows), -1, dtype=np.int64)
    for r, path in enumerate(paths):
        candidate[: len(path), r] = path
    out["beam_candidate"] = candidate
    if "token_id" not in out:
        out["token_id"] = np.zeros((0, rows), dtype=np.int64)
    for name, items in (("attention", recording.attention), ("residual", recording.residuals)):
        like = next((x for x in items[:steps] if x is not None), None)
        if like is None:
            continue
        width = prompt_length + steps - 1 if name == "attention" else like.shape[-1]
        dtype = torch.empty(0, dtype=like.dtype).numpy().dtype
        first = min(recording.attention_first, steps) if name == "attention" else 0  # older rows: dropped (budget)
        arr = np.zeros((steps - first, rows, *like.shape[1:-1], width), dtype=dtype)
        for t in range(first, min(steps, len(items))):
            if items[t] is None:
                continue
            block = items[t].cpu().numpy()
            parents = run.tree.parent[t].tolist()
            for r, path in enumerate(paths):
                if t < len(path):
                    arr[t - first, r, ..., : block.shape[-1]] = block[parents[path[t]]]
        out[name] = arr
    tree = run.tree
    if steps:
        out.update(beam_parent=torch.stack(tree.parent).cpu().numpy().astype(np.int64),
                   beam_origin=torch.stack(tree.origin).cpu().numpy().astype(np.int64),
                   beam_token=torch.stack(tree.token).cpu().numpy().astype(np.int64),
                   beam_logprob=torch.stack(tree.logprob).float().cpu().numpy(),
                   beam_score=torch.stack(tree.score).float().cpu().numpy(),
                   beam_fate=torch.stack(tree.fate).cpu().numpy().astype(np.int64))
        if tree.group:  # group beam search: each candidate's group
            out["beam_group"] = torch.stack(tree.group).cpu().numpy().astype(np.int64)
    return out


def from_tokens(
    tokens: Sequence[str] | Sequence[Sequence[str]],
    logprobs: Sequence[float] | Sequence[Sequence[float]] | None = None,
    top_logprobs: Sequence | None = None,
    *,
    final_logprobs: Sequence[float] | Sequence[Sequence[float]] | None = None,
    prompt: str = "",
    prompt_tokens: Sequence[str] = (),
    model_name: str = "",
    chooser: str = "unknown",
    strategy: Mapping[str, Any] | None = None,
    stop_reason: str | None = None,
    eos_tokens: Sequence[str] = (),
    forced: Sequence[int] = (),
    vocab: dict[str, int] | None = None,
    arrays: Mapping[str, Any] | None = None,
    processor_names: Sequence[str] = (),
    attention_layers: Sequence[int] | None = None,
    attention_heads: Sequence[int] | None = None,
    lens_top_k: int = 5,
) -> Trace:
    """A trace from token strings and (optionally) their logprobs and top alternatives: no model, no tokenizer.

    `tokens` is one row's token texts, or a list of rows (a shorter row ended at its last token).
    Per row and step: `logprobs[s]` is the chosen token's raw log probability, `final_logprobs[s]` its
    log probability after the sampler's processing, and `top_logprobs[s]` a list of alternatives,
    most likely first, each `(text, logprob)` or `(text, logprob, final_logprob)`. Texts are interned to
    ids (equal text, one id; `vocab` maps text to id, is used first and is extended). What was not given
    is NA in the frames. `arrays` adds (or overrides) schema arrays such as `entropy` or `attention`,
    each [steps, rows, ...].
    """
    multi = bool(tokens) and not isinstance(tokens[0], str)
    rows_tokens = [list(r) for r in tokens] if multi else [list(tokens)]
    ids: dict[str, int] = vocab if vocab is not None else {}

    def intern(text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"from_tokens: token texts must be strings, got {type(text).__name__}")
        if text not in ids:
            ids[text] = max(ids.values(), default=-1) + 1
        return ids[text]

    def per_row(value, what: str) -> list:
        if value is None:
            return [None] * len(rows_tokens)
        value = [list(v) for v in value] if multi else [list(value)]
        for r, (v, row) in enumerate(zip(value, rows_tokens)):
            if len(v) != len(row):
                raise ValueError(f"from_tokens: row {r} has {len(row)} tokens but {len(v)} {what}")
        return value

    lp_rows, final_rows = per_row(logprobs, "logprobs"), per_row(final_logprobs, "final_logprobs")
    top_rows = per_row(top_logprobs, "top_logprobs")
    prompt_ids = [intern(t) for t in prompt_tokens]
    steps, rows = max((len(r) for r in rows_tokens), default=0), len(rows_tokens)
    out: dict[str, np.ndarray] = {
        "token_id": np.full((steps, rows), -1, np.int64),
        "forced": np.zeros((steps, rows), bool),
        "finished": np.zeros((steps, rows), bool),
    }
    for name, given in (("logprob", lp_rows), ("final_logprob", final_rows)):
        if any(v is not None for v in given):
            out[name] = np.full((steps, rows), np.nan, np.float32)
            for r, v in enumerate(given):
                if v is not None:
                    out[name][: len(v), r] = v
    k = max((len(alts) for top in top_rows if top is not None for alts in top), default=0)
    has_final = any(len(alt) > 2 for top in top_rows if top is not None for alts in top for alt in alts)
    if k:
        out["cand_id"] = np.full((steps, rows, k), -1, np.int64)
        out["cand_prob"] = np.full((steps, rows, k), np.nan, np.float32)
        if has_final:
            out["cand_final_prob"] = np.full((steps, rows, k), np.nan, np.float32)
    for r, row in enumerate(rows_tokens):
        out["finished"][len(row):, r] = True
        for s, text in enumerate(row):
            out["token_id"][s, r] = intern(text)
        for s, alts in enumerate(top_rows[r] or []):
            for j, alt in enumerate(alts):
                out["cand_id"][s, r, j] = intern(alt[0])
                out["cand_prob"][s, r, j] = np.exp(alt[1])
                if len(alt) > 2:
                    out["cand_final_prob"][s, r, j] = np.exp(alt[2])
    for s in forced:
        out["forced"][s, :] = True
    if "cand_id" in out:  # the chosen token's rank among the alternatives (NA where it is not among them)
        hit = out["cand_id"] == out["token_id"][:, :, None]
        out["rank"] = np.where(hit.any(-1), hit.argmax(-1), -1).astype(np.int64)
    out.update(arrays or {})
    info = RunInfo(prompt=prompt, prompt_ids=prompt_ids, strategy=dict(strategy or {}),
                   processor_names=list(processor_names), chooser=chooser,
                   eos_token_ids=[ids[t] for t in eos_tokens if t in ids], stop_reason=stop_reason,
                   attention_layers=attention_layers, attention_heads=attention_heads, lens_top_k=lens_top_k,
                   token_text={i: t for t, i in ids.items()})
    return build_trace(out, ModelInfo(name=model_name), info)
