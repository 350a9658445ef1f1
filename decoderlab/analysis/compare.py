"""Comparing decoding strategies side by side: every run of one prompt as a row of one batch.

Why batched: a comparison is many runs (strategies × seeds) of the same prompt. They share the prompt's
forward, and each later step is one forward for every row still running, where runs made one by one
pay a forward each. Rows are grouped by strategy; each group applies its own processors and chooser to
its rows, each row with its own generator, and a row that ends leaves the batch (`loop.retire_finished`).
So every run draws exactly what the same run made alone draws (the tests check it token for token).

A beam search of B beams is B rows of the batch: its `BeamSearch` picks, each step, which beam each of
its rows extends next, and the batch reorders those rows (ids and cache) while every other row stays.
Contrastive search, DoLa, group beam search and beam sampling are not batched: they run alone, through
`LM.generate`, and join the comparison as runs like the others.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..backends.local import LM
from ..backends.progress import progress_bar
from ..engine import Strategy, loop
from ..engine.rules.beams import BeamSearch
from ..errors import NumericError, StrategyError
from ..record import Record, Recording
from ..trace import Trace, from_beam_run, from_recording
from . import metrics


@dataclass
class Group:
    """The runs of one strategy in the batch: their run indices and the recording of their steps."""

    name: str
    strategy: Strategy
    runs: list[int]  # run indices (rows of the batch at the start)
    recording: Recording
    seeds: list[int | None] = field(default_factory=list)
    search: BeamSearch | None = None  # a beam search's state: its rows are the beams
    error: NumericError | None = None  # what ended the group early, if anything did


def _group_of(groups: list[Group]) -> dict[int, tuple[int, int]]:
    """Run index -> (group, row within the group)."""
    return {run: (g, i) for g, group in enumerate(groups) for i, run in enumerate(group.runs)}


@dataclass
class Rows:
    """Where one group's rows are in the batch: `at` selects them (a slice while they are contiguous, as they stay:
    rows leave the batch in order and beams are reordered among their own rows), `index` as indices, `local` each
    row's index within its group, `mine` [rows] which of the batch's rows are the group's, `unforced` [n] False."""

    at: slice | torch.Tensor
    index: torch.Tensor
    idx: list[int]
    local: torch.Tensor
    mine: torch.Tensor
    unforced: torch.Tensor


def _layout(state: loop.State, groups: list[Group]) -> list[Rows | None]:
    """Each group's `Rows` (None: it has none running), made again only when the batch's rows change (a retirement
    makes a new `state.row_ids`). Why: reading the run indices and sending index tensors to the device each step would
    stop the host for the device several times a step, and a slice selects rows without a copy."""
    cached = state.extra.get("compare_layout")
    if cached is not None and cached[0] is state.row_ids:
        return cached[1]
    where = _group_of(groups)
    running = state.row_ids.tolist()
    device = state.ids.device
    layout: list[Rows | None] = []
    for g in range(len(groups)):
        idx = [i for i, run in enumerate(running) if where[run][0] == g]
        if not idx:
            layout.append(None)
            continue
        index = torch.tensor(idx, device=device)
        at = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else index
        mine = torch.zeros(len(running), dtype=torch.bool, device=device)
        mine[at] = True
        layout.append(Rows(at, index, idx, torch.tensor([where[running[i]][1] for i in idx], device=device), mine,
                           torch.zeros(len(idx), dtype=torch.bool, device=device)))
    state.extra["compare_layout"] = (state.row_ids, layout)
    return layout


@torch.inference_mode()
def step(model, state: loop.State, groups: list[Group]) -> torch.Tensor:
    """One step for every running row: one forward, then each group's processors and chooser on its rows (a beam
    group's search on its beams, whose rows are then reordered). A group whose numbers go wrong (`NumericError`)
    ends there, keeping its steps so far; the other groups go on."""
    logits = loop.ensure_logits(model, state)
    layout = _layout(state, groups)
    token = torch.empty(state.rows, dtype=torch.long, device=logits.device)
    order = None  # which row each row continues (beams), identity elsewhere
    for group, rows in zip(groups, layout):
        if rows is None:
            continue
        at = rows.at
        try:
            if group.search is not None:
                picked, token[at] = group.search.step(state.steps, state.ids[at], logits[at], [group.recording],
                                                      group.recording.keep_stages)
                order = torch.arange(state.rows, device=logits.device) if order is None else order
                order[at] = rows.index[picked]
            else:
                token[at] = _choose(group, state, logits, rows)
        except NumericError as err:
            group.error = err
            token[at] = group.strategy.pad_token_id or 0
    if order is not None:
        state.ids = state.ids[order]
        state.cache.reorder_cache(order)
    state.ids = torch.cat([state.ids, token[:, None]], dim=-1)
    state.pending = token
    for group, rows in zip(groups, layout):
        if rows is None:
            continue
        if group.error is not None or (group.search is not None and group.search.stop is not None):
            state.finished = state.finished | rows.mine  # the group is over: its rows leave the batch
        elif group.search is None and group.strategy.eos_token_ids:
            ends = torch.isin(token, group.strategy.eos_tensor(token.device)) & rows.mine
            state.finished = state.finished | ends
    return token


def _choose(group: Group, state: loop.State, logits: torch.Tensor, rows: Rows) -> torch.Tensor:
    """A token group's step on its rows: its processors, its chooser with each row's generator, its recording."""
    ids, raw = state.ids[rows.at], logits[rows.at]
    scores, stages = loop.process(group.strategy, ids, raw, group.recording.keep_stages, state.steps)
    chosen = group.strategy.chooser(scores, [state.generators[i] for i in rows.idx])
    ctx = loop.StepContext(state.steps, ids, raw, scores, stages, chosen, rows.unforced, state.finished[rows.at],
                           rows.local)
    group.recording.on_step(ctx)
    return chosen


def run_batch(lm: LM, ids: torch.Tensor, groups: list[Group], max_new_tokens: int,
              progress: Any = None) -> loop.State:
    """Decode every group's runs as rows of one batch until each row ends (EOS, or its beam search's stop) or
    `max_new_tokens` (every group was resolved with this one): the loop's own `run`, with the groups' step."""
    seeds = [s for group in groups for s in group.seeds]
    state = loop.prefill(lm.model, ids, groups[0].strategy, seeds=seeds, rows=len(seeds))  # one prefill, shared

    def grouped_step(model, state, strategy, observers=()):
        return step(model, state, groups)

    def tick(step_index: int, token: torch.Tensor, rows: torch.Tensor) -> None:
        progress.update(1)
        progress.set_postfix(rows_running=len(rows), refresh=False)

    try:
        return loop.run(lm.model, state, groups[0].strategy, max_length=lm.context_window,
                        on_token=tick if progress is not None else None, step_fn=grouped_step)
    except KeyboardInterrupt:  # Ctrl-C: every run keeps the steps all rows completed
        for group in groups:
            group.recording.drop_steps(state.steps)
        state.stop_reason = "interrupted"
        return state


RUN_COLUMNS = ["model", "strategy", "seed", "prompt", "text", "length", "stop_reason", "mean_logprob", "perplexity",
               "mean_entropy", "distinct_1", "distinct_2", "distinct_3", "repetitive", "repeated_4gram_share"]


@dataclass(frozen=True)
class Run:
    """One run of a comparison: which model, prompt, strategy and seed, and its one-row trace."""

    model: str
    prompt: str
    strategy: str
    seed: int | None
    trace: Trace


class Comparison:
    """Runs of several strategies (× seeds × prompts × models) and the frames that compare them."""

    def __init__(self, runs: list[Run], prompts: list[str], strategies: list[str], models: list[str],
                 interrupted: bool = False):
        self.run_list = runs
        self.prompts, self.strategies, self.models = prompts, strategies, models
        self.interrupted = interrupted  # stopped by Ctrl-C: the runs made so far, the last ones partial

    def trace(self, strategy: str, seed: int | None = None, prompt: str | None = None,
              model: str | None = None) -> Trace:
        """One run's trace (every frame, plot and widget works on it). Defaults: the first prompt, the first model,
        the strategy's first seed."""
        prompt = self.prompts[0] if prompt is None else prompt
        model = self.models[0] if model is None else model
        mine = [r for r in self.run_list if (r.model, r.prompt, r.strategy) == (model, prompt, strategy)]
        if not mine:
            raise KeyError(f"no run of strategy {strategy!r} on prompt {prompt!r} with model {model!r}; "
                           f"strategies: {self.strategies}, models: {self.models}")
        if seed is None:
            return mine[0].trace
        for r in mine:
            if r.seed == seed:
                return r.trace
        raise KeyError(f"strategy {strategy!r} ran with seeds {[r.seed for r in mine]}, not {seed}")

    @property
    def runs(self) -> pd.DataFrame:
        """One row per run: model, strategy, seed, prompt, text, length, stop reason, the output's mean logprob and
        perplexity under the model's raw distribution, mean entropy, distinct-1/2/3 and repetition."""
        rows = [{"model": run.model, "strategy": run.strategy, "seed": run.seed, "prompt": run.prompt,
                 **run_metrics(run.trace)} for run in self.run_list]
        return pd.DataFrame(rows, columns=RUN_COLUMNS).astype({"seed": "Int64"})

    @property
    def summary(self) -> pd.DataFrame:
        """One row per (model, strategy): the runs' metrics, mean and standard deviation over seeds and prompts,
        with the share of repetitive runs and across-run diversity (distinct-n over all its runs, Self-BLEU-4)."""
        runs = self.runs.assign(token_ids=[r.trace.token_ids for r in self.run_list])
        return summary_of(runs, self.models, self.strategies)

    @property
    def by_step(self) -> pd.DataFrame:
        """The runs aligned by step: one row per (model, prompt, strategy, seed, step) with the token, its
        probability and the entropy; see `divergence` for where each pair of runs parts ways."""
        frames = []
        for run in self.run_list:
            st = run.trace.choices
            frames.append(pd.DataFrame({"model": run.model, "prompt": run.prompt, "strategy": run.strategy,
                                        "seed": run.seed, "step": st["step"], "token_id": st["token_id"],
                                        "token": st["token"], "prob": st["prob"], "logprob": st["logprob"],
                                        "entropy": st["entropy"]}))
        if not frames:
            frames = [pd.DataFrame(columns=["model", "prompt", "strategy", "seed", "step", "token_id", "token", "prob",
                                            "logprob", "entropy"])]
        return pd.concat(frames, ignore_index=True).astype({"seed": "Int64"})

    @property
    def divergence(self) -> pd.DataFrame:
        """For each pair of runs of one prompt: the first step where their tokens differ (NA if one is a prefix
        of the other), the two tokens there and each run's logprob of its own token. Runs of one model compare
        token ids; runs of different models or backends compare token texts (their ids need not agree)."""
        each = [(r, r.trace.token_ids, r.trace.tokens, r.trace.choices["logprob"].to_numpy()) for r in self.run_list]
        rows = []
        for i, (a, ids_a, toks_a, lp_a) in enumerate(each):
            for b, ids_b, toks_b, lp_b in each[i + 1 :]:
                if a.prompt != b.prompt:
                    continue
                x, y = (ids_a, ids_b) if a.model == b.model else (toks_a, toks_b)
                first = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), None)
                rows.append({"prompt": a.prompt, "model_a": a.model, "strategy_a": a.strategy, "seed_a": a.seed,
                             "model_b": b.model, "strategy_b": b.strategy, "seed_b": b.seed,
                             "first_divergence": first,
                             "token_a": toks_a[first] if first is not None else None,
                             "token_b": toks_b[first] if first is not None else None,
                             "logprob_a": float(lp_a[first]) if first is not None else float("nan"),
                             "logprob_b": float(lp_b[first]) if first is not None else float("nan")})
        columns = ["prompt", "model_a", "strategy_a", "seed_a", "model_b", "strategy_b", "seed_b", "first_divergence",
                   "token_a", "token_b", "logprob_a", "logprob_b"]
        return pd.DataFrame(rows, columns=columns).astype({"seed_a": "Int64", "seed_b": "Int64",
                                                           "first_divergence": "Int64"})

    def __repr__(self) -> str:
        models = f", {len(self.models)} models" if len(self.models) > 1 else ""
        stopped = ", interrupted" if self.interrupted else ""
        return (f"Comparison({len(self.strategies)} strategies, {len(self.prompts)} prompts{models}, "
                f"{len(self.run_list)} runs{stopped})")


def run_metrics(trace: Trace) -> dict[str, Any]:
    """The metrics of one run (`Comparison.runs`' columns after the run's names): its length, stop reason, mean
    logprob and perplexity under the model's raw distribution, mean entropy, distinct-1/2/3 and repetition."""
    st, ids = trace.choices, trace.token_ids
    mean_lp = float(st["logprob"].mean()) if len(st) else float("nan")
    return {"text": trace.text, "length": len(ids), "stop_reason": trace.stop_reason, "mean_logprob": mean_lp,
            "perplexity": float(np.exp(-mean_lp)),
            "mean_entropy": float(st["entropy"].mean()) if len(st) else float("nan"),
            "distinct_1": metrics.distinct_n(ids, 1), "distinct_2": metrics.distinct_n(ids, 2),
            "distinct_3": metrics.distinct_n(ids, 3), "repetitive": metrics.is_repetitive(ids) if ids else False,
            "repeated_4gram_share": metrics.repeated_ngram_share(ids)}


def summary_of(runs: pd.DataFrame, models: Sequence[str], strategies: Sequence[str]) -> pd.DataFrame:
    """One row per (model, strategy) of a runs frame (`Comparison.runs` with a `token_ids` column): the runs'
    metrics, mean and standard deviation over seeds and prompts, the share of repetitive runs and across-run
    diversity (distinct-2 over all its runs, Self-BLEU-4). A study's summary is the same (`dl.open_study`)."""
    out = []
    for model in models:
        for name in strategies:
            mine = runs[(runs["strategy"] == name) & (runs["model"] == model)]
            row: dict[str, Any] = {"model": model, "strategy": name, "runs": len(mine)}
            for col in ("length", "perplexity", "mean_entropy", "distinct_2", "repeated_4gram_share"):
                row[col] = mine[col].mean()
                row[col + "_sd"] = mine[col].std(ddof=0)
            row["repetition_pct"] = 100.0 * mine["repetitive"].astype(float).mean()
            seqs = [list(ids) for ids in mine["token_ids"]]
            row["distinct_2_all"] = metrics.distinct_n(seqs, 2)
            row["self_bleu_4"] = metrics.self_bleu(seqs)
            out.append(row)
    return pd.DataFrame(out)


def _batched_runs(lm: LM, model: str, prompt: str, strategies: Mapping[str, Mapping[str, Any]], seeds: list[int],
                  max_new_tokens: int, chat: bool, record: Record, progress: bool | None) -> list[Run]:
    """Every run of one prompt on a local model: the token strategies as rows of one batch, the strategies with
    a rule of their own (beams, contrastive, DoLa) alone."""
    ids, text = lm.encode(prompt, chat=chat)
    groups, alone = [], []
    for name, words in strategies.items():
        strat = lm.strategy(ids.shape[1], max_new_tokens=max_new_tokens, **words)
        first = sum(len(g.runs) for g in groups)
        if strat.rule.batch_search is not None and not strat.do_sample:
            search = strat.rule.batch_search(strat, ids.shape[1], ids.device)
            groups.append(Group(name, strat, list(range(first, first + strat.num_beams)), Recording(record),
                                [None] * strat.num_beams, search))
            continue
        if not strat.rule.by_processors:
            alone.append((name, words))
            continue
        run_seeds = seeds if strat.do_sample else [seeds[0]]
        groups.append(Group(name, strat, list(range(first, first + len(run_seeds))), Recording(record),
                            list(run_seeds)))
    runs: list[Run] = []
    if groups:
        bar = progress_bar(max_new_tokens, progress, sum(len(g.runs) for g in groups))
        try:
            state = run_batch(lm, ids, groups, max_new_tokens, bar)
        finally:
            if bar is not None:
                bar.close()
        for group in groups:
            if group.search is not None:
                result = group.search.result()
                if result.hypotheses:  # (a beam search that failed before any beam finished returns none)
                    tr = from_beam_run(result, group.recording, group.strategy, lm.model_info(), text,
                                       ids[0].tolist())
                    runs.append(Run(model, prompt, group.name, None, _failed(tr.row(0), group.error)))
                continue
            tr = _failed(from_recording(group.recording, state, group.strategy, lm.model_info(), text,
                                        seeds=group.seeds, rows=len(group.runs)), group.error)
            sampled = group.strategy.do_sample
            runs += [Run(model, prompt, group.name, s if sampled else None, tr.row(r)) for r, s in enumerate(group.seeds)]
    for name, words in alone:
        if any(r.trace.stop_reason == "interrupted" for r in runs):
            break
        try:
            tr = lm.generate_ids(ids, text, max_new_tokens=max_new_tokens, progress=False, record=record, **words)
        except NumericError as err:  # the other runs go on; this one keeps the steps it took
            if err.trace is None:
                continue
            tr = _failed(err.trace, err)
        runs.append(Run(model, prompt, name, None, tr.row(0)))
    order = list(strategies)
    return sorted(runs, key=lambda r: order.index(r.strategy))


def _failed(trace: Trace, error: NumericError | None) -> Trace:
    """A group's trace, its stop reasons saying what ended it early, if anything did."""
    if error is not None:
        why = f"error: NumericError at step {error.step} ({error.processor or 'unknown'})"
        trace.stop_reason, trace.row_stop_reasons = why, [why] * trace.rows
    return trace


def _backend_runs(backend: Any, model: str, prompt: str, strategies: Mapping[str, Mapping[str, Any]],
                  seeds: list[int], max_new_tokens: int, chat: bool, record: Record) -> list[Run]:
    """Every run of one prompt on a backend that is not a local model (an API): one request per run."""
    runs = []
    for name, words in strategies.items():
        sampled = backend.samples(dict(words))
        for seed in seeds if sampled else [None]:
            tr = backend.generate(prompt, chat=chat, seed=seed, max_new_tokens=max_new_tokens, record=record,
                                  progress=False, **words)
            runs.append(Run(model, prompt, name, seed, tr.row(0) if tr.rows > 1 else tr))
    return runs


def _models(models: Any) -> dict[str, Any]:
    """A mapping name -> backend, from one backend or a mapping."""
    if isinstance(models, Mapping):
        if not models:
            raise StrategyError("compare() needs at least one model")
        out = dict(models)
    else:
        out = {getattr(models, "name", "") or "model": models}
    for name, backend in out.items():
        if not hasattr(backend, "generate"):
            raise StrategyError(f"model {name!r} is a {type(backend).__name__}, not a decoderlab model or backend "
                                "(dl.load(...) or dl.connect(...))")
    return out


def check_settings(strategies: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], record: Record | None,
                   who: str = "compare()") -> tuple[dict[str, dict[str, Any]], list[int], Record]:
    """The strategies, seeds and record of a comparison (or a study), checked: (strategies, seeds, record)."""
    if not isinstance(strategies, Mapping) or not strategies:
        raise StrategyError(f"{who} needs strategies as a mapping name -> generate's words, with at least one")
    seeds = list(seeds)
    if not seeds:
        raise StrategyError("seeds must name at least one seed")
    record = record or Record()
    if record.captures_forward:
        raise StrategyError(f"{who} records choices, candidates and processors; attention and lens are recorded "
                            "per run: use lm.generate for the runs you want to look inside")
    strategies = {name: dict(words) for name, words in strategies.items()}
    for name, words in strategies.items():
        for word in ("seed", "seeds", "max_new_tokens"):
            if word in words:
                raise StrategyError(f"strategy {name!r}: {word}= is set by {who} for every run")
    return strategies, seeds, record


def compare(models: LM | Any | Mapping[str, Any], prompts: str | Sequence[str],
            strategies: Mapping[str, Mapping[str, Any]], *, seeds: Sequence[int] = range(1), max_new_tokens: int = 64,
            chat: bool = False, record: Record | None = None, progress: bool | None = None) -> Comparison:
    """Run every strategy (× seeds, for strategies that sample) on every prompt; on a local model all runs of a
    prompt are rows of one batch.

    `models` is a model (`dl.load`), an API backend (`dl.connect`), or a mapping name -> either, to compare models
    or engines on the same prompts. `strategies` maps a name to `generate`'s words. Strategies that do not sample
    run once, not once per seed.
    """
    backends = _models(models)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not strategies:
        raise StrategyError("compare() needs at least one prompt and one strategy")
    strategies, seeds, record = check_settings(strategies, seeds, record)
    runs: list[Run] = []
    for model, backend in backends.items():
        for prompt in prompts:
            if isinstance(backend, LM):
                runs += _batched_runs(backend, model, prompt, strategies, seeds, max_new_tokens, chat, record, progress)
            else:
                runs += _backend_runs(backend, model, prompt, strategies, seeds, max_new_tokens, chat, record)
            if any(r.trace.stop_reason == "interrupted" for r in runs):
                warnings.warn(f"compare() interrupted: returning the {len(runs)} runs made so far (those stopped "
                              "mid-way have stop_reason 'interrupted')", stacklevel=2)
                return Comparison(runs, prompts, list(strategies), list(backends), interrupted=True)
    return Comparison(runs, prompts, list(strategies), list(backends))
