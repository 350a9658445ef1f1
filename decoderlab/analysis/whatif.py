"""What other strategies would have done at one recorded step, with no new generation.

Why: "would nucleus 0.9 have allowed the token this run chose?", "how much does min-p 0.1 cut here?",
"what would greedy have said?" are questions about one step's distribution, not about new runs. The
step's raw logits and its prefix are all they need; each strategy's processors reshape the logits, and
the final distribution says what its chooser would do: greedy takes the argmax, sampling draws each
token with its final probability.

Where the logits come from: the recorded raw logits (`Record(logits=True)`, stored as float16), or, when
the trace did not record them, one forward of the model over the step's prefix (prompt + the row's
tokens before the step), which needs `lm=`. The recorded logits are rounded to float16: a what-if reads
those, so a cut-off or a greedy near-tie within float16 rounding may fall otherwise than in the run
(which saw float32); the forward gives float32 logits as the run saw them (up to the difference between a
cached and an uncached forward).

Where the processors come from: transformers builds them, the way decoderlab builds a run's
(`strategy.resolve`: the words over `model._prepare_generation_config`, then
`model._get_logits_processor`), in `generate`'s order, with the real prefix ids for those that read it
(repetition penalty, no_repeat_ngram, min_new_tokens). With `lm=`, `lm.strategy(prompt_length, **words)`
itself. Without a model, the same `resolve` runs on `Weightless`, a `GenerationMixin` with no weights
whose `generation_config` holds the run's EOS and pad ids (from `trace.strategy`) and transformers' global
defaults otherwise. What differs without the model: its `generation_config` is unknown, so a model that
ships sampling defaults (say `temperature=0.6, top_p=0.9`) gets transformers' global defaults instead
(`top_k=50` when sampling, no temperature, ...); a run whose EOS was turned off (`eos_token_id=[]`) gives
no EOS to the EOS-reading processors (`min_new_tokens`, `min_length`). Pass `lm=` where that matters.
Unless the words say otherwise, every strategy gets the run's `max_new_tokens` (it places
`forced_eos_token_id`). Strategies with a rule of their own (beam search, contrastive search, DoLa) decide
with more than a processor list and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from transformers import GenerationConfig, LogitsProcessorList, PretrainedConfig
from transformers.generation.utils import GenerationMixin

from ..backends.local import LM
from ..engine import Strategy, loop, resolve
from ..errors import StrategyError
from ..record import record_processors
from ..trace import Trace


__all__ = ["what_if", "what_if_at", "row_logits", "WhatIf", "WhatIfError", "run_words", "step_logits", "step_prefix", "strategy_for",
           "outcome", "has_logits", "Weightless", "TOKEN_COLUMNS", "SUMMARY_COLUMNS", "PROCESSOR_COLUMNS"]

TOKEN_COLUMNS = ["strategy", "token_id", "token", "raw_rank", "raw_prob", "final_rank", "final_prob", "kept",
                 "chosen", "choice_prob", "run_token"]
SUMMARY_COLUMNS = ["strategy", "chooser", "processors", "kept", "mass_removed", "entropy", "chosen_id",
                   "chosen_token", "top_id", "top_token", "top_prob", "run_token_kept", "run_token_prob"]
PROCESSOR_COLUMNS = ["strategy", "order", "processor", "kept", "mass_removed", "rank_before", "rank_after",
                     "rank_changed", "prob_after"]

# The run's strategy words that are not generate's words: what describe() adds about the run itself.
_NOT_WORDS = ("processors", "chooser", "seed", "dola_candidate_layers")


class WhatIfError(ValueError):
    """A what-if that cannot be answered as asked: a step the row did not take, no logits and no model,
    a strategy that is not generate's words, or one with a rule of its own."""


class Weightless(GenerationMixin):
    """A causal LM with no weights, for `strategy.resolve` without the model: transformers'
    `_prepare_generation_config` and `_get_logits_processor` read only its `config` (decoder-only, no
    generation parameters) and its `generation_config`."""

    device = torch.device("cpu")

    def __init__(self, generation_config: GenerationConfig):
        self.config = PretrainedConfig()
        self.generation_config = generation_config


# ---- the step -------------------------------------------------------------------------------------------------
def check_step(trace: Trace, step: int, row: int) -> int:
    """`step` as a step `row` took (negative counts from its last), or a clear error."""
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not 0 <= row < trace.rows:
        raise WhatIfError(f"row={row!r}: this trace has rows 0..{trace.rows - 1}")
    alive = trace.alive_steps(int(row))
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise WhatIfError(f"step={step!r}: must be a whole number (a step of row {row}: 0..{len(alive) - 1})")
    n = len(alive)
    s = int(step) + n if step < 0 else int(step)
    if not 0 <= s < n:
        raise WhatIfError(f"step={step}: row {row} took {n} steps (0..{n - 1}, or negative from its last)")
    return s


def step_prefix(trace: Trace, step: int, row: int = 0) -> np.ndarray:
    """The ids the model had read when it made step `step` of `row`: the prompt and the row's tokens before it."""
    tokens = trace.array("token_id")[:step, row]
    return np.concatenate([np.asarray(trace.prompt_ids, dtype=np.int64), tokens.astype(np.int64)])


def has_logits(trace: Trace) -> bool:
    """Whether the trace recorded its raw logits (`Record(logits=True)`)."""
    try:
        trace.array("logits")
    except KeyError:
        return False
    return True


def _check_lm(trace: Trace, lm: LM) -> None:
    if trace.model_name and lm.name != trace.model_name:
        raise WhatIfError(f"lm={lm.name!r} is not the model that made this trace ({trace.model_name!r}): a forward "
                          "of another model would answer for that model; pass the trace's own model")


@torch.inference_mode()
def forward_prefix(lm: LM, prefix: np.ndarray) -> torch.Tensor:
    """One forward of the model over `prefix`: the next token's raw logits [V], float32, as the loop computes them."""
    from transformers import DynamicCache

    ids = torch.as_tensor(prefix, dtype=torch.long, device=lm.device)[None]
    return loop.forward(lm.model, ids, DynamicCache(config=lm.model.config))[0]


def step_logits(trace: Trace, step: int, row: int = 0, lm: LM | None = None) -> tuple[torch.Tensor, str]:
    """The raw logits [V] (float32) of one step, and where they came from: the recorded logits, or one forward."""
    if has_logits(trace):
        return torch.from_numpy(np.asarray(trace.array("logits")[step, row], dtype=np.float32)), "recorded logits"
    if lm is None:
        raise WhatIfError("this trace did not record its logits: pass lm= (the model that made it) for one forward "
                          "of the step's prefix, or record with dl.Record(logits=True)")
    _check_lm(trace, lm)
    return forward_prefix(lm, step_prefix(trace, step, row)).cpu(), "model forward"


# ---- strategies -----------------------------------------------------------------------------------------------
def run_words(trace: Trace) -> dict[str, Any]:
    """The run's own strategy as `generate`'s words (from `trace.strategy`, as resolved): what
    `trace.what_if(step, {"as run": run_words(trace)})` compares with."""
    return {k: v for k, v in trace.strategy.items() if k not in _NOT_WORDS}


def _weightless(trace: Trace) -> Weightless:
    s = trace.strategy
    return Weightless(GenerationConfig(eos_token_id=s.get("eos_token_id"), pad_token_id=s.get("pad_token_id")))


def strategy_for(trace: Trace, words: Mapping[str, Any] | Sequence, name: str = "",
                 lm: LM | None = None, model: Any = None) -> Strategy:
    """Resolve one strategy's words (or a processor list) for this trace's prompt, as a run would resolve them:
    `lm.strategy(prompt_length, **words)`, or `resolve` on `model` (default: a `Weightless` stand-in)."""
    if isinstance(words, (list, tuple, LogitsProcessorList)):
        words = {"logits_processor": list(words)}
    if not isinstance(words, Mapping):
        raise WhatIfError(f"strategy {name!r}: {words!r} is neither generate's words (a dict such as "
                          "{'do_sample': True, 'top_p': 0.9}) nor a list of logits processors")
    words = dict(words)
    if "max_new_tokens" not in words and "max_length" not in words and trace.strategy.get("max_new_tokens"):
        words["max_new_tokens"] = int(trace.strategy["max_new_tokens"])
    prompt_length = len(trace.prompt_ids)
    try:
        if lm is not None:
            strat = lm.strategy(prompt_length, **words)
        else:
            strat = resolve(model if model is not None else _weightless(trace), prompt_length, **words)
    except StrategyError as err:
        raise WhatIfError(f"strategy {name!r}: {err}") from err
    if not strat.rule.by_processors:
        raise WhatIfError(f"strategy {name!r} is {strat.rule.name} search, which decides by a rule of its own (more "
                          "than a processor list and a chooser); what_if shows processor strategies: greedy or "
                          "sampling with temperature, top_k, top_p, min_p, typical_p, penalties, ...")
    return strat


# ---- one strategy at the step ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One strategy at one step: the final scores and distribution, each processor's effect, the greedy pick."""

    name: str
    strategy: Strategy
    scores: torch.Tensor  # [V] after every processor
    probs: torch.Tensor  # [V] softmax(scores); 0 where removed
    kept: torch.Tensor  # [V] bool: the final score is not -inf
    processors: dict[str, np.ndarray]  # per processor, as trace.processors (about the run's token), and "kept"
    chosen: int | None  # the chooser's pick when it does not draw (greedy), else None

    def choice_probs(self, ids: torch.Tensor) -> np.ndarray:
        """The chance that the chooser picks each of `ids`: sampling, its final probability; greedy, 1 for its
        pick and 0 otherwise; NaN for a chooser of the user's (`chosen` is one call of it; its odds are its own)."""
        name = self.strategy.chooser_name
        if name == "sample":
            return self.probs[ids].double().cpu().numpy()
        if name == "greedy":
            return (ids == self.chosen).double().cpu().numpy()
        return np.full(len(ids), np.nan)


@torch.inference_mode()
def outcome(name: str, strategy: Strategy, logits: torch.Tensor, prefix: torch.Tensor, run_token: int) -> Outcome:
    """Run `strategy`'s processors over one step's raw `logits` [V] with the real `prefix` ids [T], as the loop
    does (`loop.process`), and measure each processor as a run records it (`record.record_processors`)."""
    ids, raw = prefix[None], logits[None]
    scores, stages = loop.process(strategy, ids, raw, keep_stages=True)
    token = torch.tensor([run_token], device=raw.device)
    no = torch.zeros(1, dtype=torch.bool, device=raw.device)
    ctx = loop.StepContext(len(prefix), ids, raw, scores, stages, token, no, no)
    procs = {k: v[0].cpu().numpy() for k, v in record_processors(ctx, None).items()}
    procs["kept"] = np.array([int((~torch.isneginf(s[0])).sum()) for s in stages], dtype=np.int64)
    scores = scores[0]
    probs = torch.softmax(scores, dim=-1)
    chosen = None
    if strategy.chooser_name != "sample":  # greedy, or a chooser of the user's: its pick on these scores
        chosen = int(strategy.chooser(scores[None], [None])[0])
    return Outcome(name, strategy, scores, probs, ~torch.isneginf(scores), procs, chosen)


# ---- the answer -----------------------------------------------------------------------------------------------
@dataclass
class WhatIf:
    """What each strategy would have done at one step (the docs' compare page, "What-if at one step", lists the columns).

    `tokens`: one row per (strategy, token) over the tokens worth showing: the model's top `top` by raw
    probability, each strategy's top `top` by final probability, and the token the run chose.
    `summary`: one row per strategy. `processors`: one row per (strategy, processor), as `trace.processors`
    (rank and prob columns are about the token the run chose). `final_probs[name]`: the whole final
    distribution [V]; `raw_probs`: the model's.
    """

    step: int
    row: int
    source: str  # "recorded logits" or "model forward"
    run_token_id: int
    run_token: str
    raw_entropy: float
    tokens: pd.DataFrame
    summary: pd.DataFrame
    processors: pd.DataFrame
    raw_probs: np.ndarray = field(repr=False)
    final_probs: dict[str, np.ndarray] = field(repr=False)
    strategies: dict[str, Strategy] = field(repr=False)

    def __repr__(self) -> str:
        return (f"WhatIf(step={self.step}, row={self.row}, {len(self.strategies)} strategies, from {self.source}; "
                f"the run chose {self.run_token!r})")

    def _repr_html_(self) -> str:
        return self.summary._repr_html_()


def _rank_of(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of each of `ids` in `values` [V] (ties count in the token's favour, as the recorders rank)."""
    return (values[None, :] > values[ids][:, None]).sum(-1)


def shown_ids(raw_probs: torch.Tensor, outcomes: Sequence[Outcome], run_token: int, top: int) -> torch.Tensor:
    """The tokens a what-if shows: the model's top `top`, each strategy's top `top` kept ones, the run's token;
    ordered by raw rank."""
    k = min(top, raw_probs.numel())
    parts = [torch.topk(raw_probs, k).indices, torch.tensor([run_token], device=raw_probs.device)]
    for o in outcomes:
        parts.append(torch.topk(o.probs, min(k, int(o.kept.sum()))).indices)
    ids = torch.unique(torch.cat(parts))
    return ids[torch.argsort(_rank_of(raw_probs, ids), stable=True)]


def frames(outcomes: Sequence[Outcome], logits: torch.Tensor, run_token: int, namer: Callable[[list[int]], list[str]],
           top: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The tokens, summary and processors frames of a what-if."""
    raw_probs = torch.softmax(logits.float(), dim=-1)
    ids = shown_ids(raw_probs, outcomes, run_token, top)
    id_list = ids.tolist()
    names = namer(id_list)
    raw_rank = _rank_of(logits, ids).cpu().numpy()
    tok_rows, sum_rows, proc_rows = [], [], []
    for o in outcomes:
        kept = o.kept[ids].cpu().numpy()
        final = o.probs[ids].double().cpu().numpy()
        ranks = _rank_of(o.scores, ids).cpu().numpy()
        final_rank = pd.arrays.IntegerArray(ranks.astype(np.int64), ~kept)  # NA where removed
        chosen = np.array([i == o.chosen for i in id_list])
        tok_rows.append(pd.DataFrame({
            "strategy": o.name, "token_id": np.array(id_list, dtype=np.int64), "token": names, "raw_rank": raw_rank,
            "raw_prob": raw_probs[ids].double().cpu().numpy(), "final_rank": final_rank, "final_prob": final,
            "kept": kept, "chosen": chosen, "choice_prob": o.choice_probs(ids), "run_token": np.array(id_list) == run_token}))
        p = o.probs
        top_id = int(torch.argmax(o.scores))
        sum_rows.append({
            "strategy": o.name, "chooser": o.strategy.chooser_name, "processors": tuple(o.strategy.processor_names),
            "kept": int(o.kept.sum()), "mass_removed": float(raw_probs[~o.kept].double().sum()),
            "entropy": float(torch.special.entr(p.double()).sum()),
            "chosen_id": o.chosen, "chosen_token": None if o.chosen is None else namer([o.chosen])[0],
            "top_id": top_id, "top_token": namer([top_id])[0], "top_prob": float(p[top_id]),
            "run_token_kept": bool(o.kept[run_token]),
            "run_token_prob": float(o.choice_probs(torch.tensor([run_token], device=p.device))[0]),
        })
        pr = o.processors
        m = len(pr["kept"])
        proc_rows.append(pd.DataFrame({
            "strategy": [o.name] * m, "order": np.arange(m), "processor": o.strategy.processor_names,
            "kept": pr["kept"], "mass_removed": pr["proc_mass_removed"].astype(np.float64),
            "rank_before": pr["proc_rank_before"].astype(np.int64), "rank_after": pr["proc_rank_after"].astype(np.int64),
            "rank_changed": pr["proc_rank_before"] != pr["proc_rank_after"],
            "prob_after": pr["proc_prob_after"].astype(np.float64)}))
    tokens = pd.concat(tok_rows, ignore_index=True) if tok_rows else pd.DataFrame(columns=TOKEN_COLUMNS)
    summary = pd.DataFrame(sum_rows, columns=SUMMARY_COLUMNS).astype({"chosen_id": "Int64"})
    procs = pd.concat(proc_rows, ignore_index=True) if proc_rows else pd.DataFrame(columns=PROCESSOR_COLUMNS)
    return tokens[TOKEN_COLUMNS], summary, procs[PROCESSOR_COLUMNS]


def token_namer(trace: Trace, lm: LM | None = None) -> Callable[[list[int]], list[str]]:
    """Token ids to text: the model's tokenizer with `lm=`, else the text the trace holds (ids it never saw read
    `<id>`, as in the trace's frames)."""
    if lm is not None:
        return lambda ids: [lm.token_text(i) for i in ids]
    known = trace.token_text
    return lambda ids: [known.get(int(i), f"<{int(i)}>") for i in ids]


def what_if(trace: Trace, step: int, strategies: Mapping[str, Any], *, row: int = 0, lm: LM | None = None,
            top: int = 20) -> WhatIf:
    """What each strategy would have done at step `step` of `row` (see the module docstring)."""
    step = check_step(trace, step, row)
    logits, source = step_logits(trace, step, row, lm)
    return what_if_at(trace, step, row, logits, source, strategies, lm=lm, top=top)


def what_if_at(trace: Trace, step: int, row: int, logits: torch.Tensor, source: str,
               strategies: Mapping[str, Any], *, lm: LM | None = None, top: int = 20) -> WhatIf:
    """`what_if` with the step's raw logits [V] already at hand (the playground keeps them between slider moves)."""
    if not isinstance(strategies, Mapping) or not strategies:
        raise WhatIfError(f"strategies={strategies!r}: give a dict of name -> generate's words, e.g. "
                          "{'greedy': {}, 'top-p 0.9': {'do_sample': True, 'top_p': 0.9}}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise WhatIfError(f"top={top!r}: must be a whole number >= 1 (tokens shown per strategy)")
    device = lm.device if lm is not None else torch.device("cpu")
    logits = logits.to(device=device, dtype=torch.float32)
    prefix = torch.as_tensor(step_prefix(trace, step, row), device=device)
    run_token = int(trace.array("token_id")[step, row])
    resolved = {name: strategy_for(trace, words, name, lm) for name, words in strategies.items()}
    outcomes = [outcome(name, s, logits, prefix, run_token) for name, s in resolved.items()]
    namer = token_namer(trace, lm)
    tokens, summary, procs = frames(outcomes, logits, run_token, namer, top)
    raw_probs = torch.softmax(logits, dim=-1)
    return WhatIf(step=step, row=int(row), source=source, run_token_id=run_token, run_token=namer([run_token])[0],
                  raw_entropy=float(torch.special.entr(raw_probs.double()).sum()), tokens=tokens, summary=summary,
                  processors=procs, raw_probs=raw_probs.cpu().numpy(),
                  final_probs={o.name: o.probs.cpu().numpy() for o in outcomes}, strategies=resolved)


@torch.inference_mode()
def row_logits(lm: LM, trace: Trace, row: int = 0) -> torch.Tensor:
    """Every step's raw logits of `row` [steps, V] (float32, CPU) from one forward over the prompt and the row's
    tokens: what `forward_prefix` gives step by step, in one pass (the playground's source without recorded logits)."""
    _check_lm(trace, lm)
    n = len(trace.alive_steps(row))
    ids = torch.as_tensor(step_prefix(trace, n - 1, row), dtype=torch.long, device=lm.device)[None]
    out = lm.model(input_ids=ids, use_cache=False, logits_to_keep=n)
    return out.logits[0, -n:].to(dtype=torch.float32, device="cpu")
