"""Comparing decoding strategies side by side: every run of one prompt as a row of one batch.

Why batched: a comparison is many runs (strategies × seeds) of the same prompt. They share the prompt's
forward, and each later step is one forward for every row still running, where runs made one by one
pay a forward each. Rows are grouped by strategy; each group applies its own processors and chooser to
its rows, each row with its own generator, and a row that ends leaves the batch (`loop.retire_finished`).
So every run draws exactly what the same run made alone draws (the tests check it token for token).

Strategies with a rule of their own (beam search, contrastive search, DoLa) are not batched here: they
run alone, through `LM.generate`, and join the comparison as runs like the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import loop, metrics
from .builder import from_recording
from .record import Record, Recording
from .strategy import Strategy, StrategyError
from .trace import Trace

if TYPE_CHECKING:
    from .lm import LM


@dataclass
class Group:
    """The runs of one strategy in the batch: their run indices and the recording of their steps."""

    name: str
    strategy: Strategy
    runs: list[int]  # run indices (rows of the batch at the start)
    recording: Recording
    seeds: list[int | None] = field(default_factory=list)


def _group_of(groups: list[Group]) -> dict[int, tuple[int, int]]:
    """Run index -> (group, row within the group)."""
    return {run: (g, i) for g, group in enumerate(groups) for i, run in enumerate(group.runs)}


@torch.inference_mode()
def step(model, state: loop.State, groups: list[Group]) -> torch.Tensor:
    """One step for every running row: one forward, then each group's processors and chooser on its rows."""
    logits = loop.ensure_logits(model, state)
    where = _group_of(groups)
    running = state.row_ids.tolist()
    token = torch.empty(state.rows, dtype=torch.long, device=logits.device)
    for g, group in enumerate(groups):
        idx = [i for i, run in enumerate(running) if where[run][0] == g]
        if not idx:
            continue
        at = torch.tensor(idx, device=logits.device)
        scores, stages = loop.process(group.strategy, state.ids[at], logits[at], group.recording.keep_stages)
        chosen = group.strategy.chooser(scores, [state.generators[i] for i in idx])
        local = torch.tensor([where[running[i]][1] for i in idx], device=logits.device)
        ctx = loop.StepContext(state.steps, state.ids[at], logits[at], scores, stages, chosen,
                               torch.zeros_like(chosen, dtype=torch.bool), state.finished[at], local)
        group.recording.on_step(ctx)
        token[at] = chosen
    state.ids = torch.cat([state.ids, token[:, None]], dim=-1)
    state.pending = token
    for g, group in enumerate(groups):
        if group.strategy.eos_token_ids:
            mine = torch.tensor([where[r][0] == g for r in running], device=token.device)
            ends = torch.isin(token, group.strategy.eos_tensor(token.device)) & mine
            state.finished = state.finished | ends
    return token


def run_batch(lm: "LM", ids: torch.Tensor, groups: list[Group], max_new_tokens: int,
              progress: Any = None) -> loop.State:
    """Decode every group's runs as rows of one batch until each row ends (EOS) or `max_new_tokens`: the loop's
    own `run`, with the groups' step. (Its stop check reads the first group's strategy: every group was
    resolved with this `max_new_tokens`, and all rows can have ended only if that group's rows can end.)"""
    seeds = [s for group in groups for s in group.seeds]
    state = loop.prefill(lm.model, ids.expand(len(seeds), -1), groups[0].strategy, seeds=seeds)

    def grouped_step(model, state, strategy, observers=()):
        return step(model, state, groups)

    def tick(step_index: int, token: torch.Tensor, rows: torch.Tensor) -> None:
        progress.update(1)
        progress.set_postfix(rows_running=len(rows), refresh=False)

    return loop.run(lm.model, state, groups[0].strategy, max_length=lm.context_window,
                    on_token=tick if progress is not None else None, step_fn=grouped_step)


class Comparison:
    """Runs of several strategies (× seeds × prompts) and the frames that compare them."""

    def __init__(self, traces: dict[tuple[str, str], Trace], prompts: list[str], strategies: list[str]):
        self.traces = traces  # (prompt, strategy) -> a trace with one row per seed
        self.prompts, self.strategies = prompts, strategies

    def trace(self, strategy: str, seed: int | None = None, prompt: str | None = None) -> Trace:
        """One run's trace (every frame, plot and widget works on it)."""
        prompt = self.prompts[0] if prompt is None else prompt
        key = (prompt, strategy)
        if key not in self.traces:
            raise KeyError(f"no run of strategy {strategy!r} on prompt {prompt!r}; strategies: {self.strategies}")
        tr = self.traces[key]
        if seed is None:
            return tr.row(0)
        if seed not in tr.seeds:
            raise KeyError(f"strategy {strategy!r} ran with seeds {tr.seeds}, not {seed}")
        return tr.row(tr.seeds.index(seed))

    @property
    def runs(self) -> pd.DataFrame:
        """One row per run: strategy, seed, prompt, text, length, stop reason, the output's mean logprob and
        perplexity under the model's raw distribution, mean entropy, distinct-1/2/3 and repetition."""
        rows = []
        for (prompt, name), tr in self.traces.items():
            runs = tr.runs
            for r in range(tr.rows):
                st = tr.steps[tr.steps["row"] == r]
                ids = st["token_id"].tolist()
                mean_lp = float(st["logprob"].mean()) if len(st) else float("nan")
                rows.append({
                    "strategy": name, "seed": runs["seed"][r], "prompt": prompt, "text": runs["text"][r],
                    "length": int(runs["length"][r]), "stop_reason": runs["stop_reason"][r],
                    "mean_logprob": mean_lp, "perplexity": float(np.exp(-mean_lp)),
                    "mean_entropy": float(st["entropy"].mean()) if len(st) else float("nan"),
                    "distinct_1": metrics.distinct_n(ids, 1), "distinct_2": metrics.distinct_n(ids, 2),
                    "distinct_3": metrics.distinct_n(ids, 3), "repetitive": metrics.is_repetitive(ids) if ids else False,
                    "repeated_4gram_share": metrics.repeated_ngram_share(ids),
                })
        return pd.DataFrame(rows).astype({"seed": "Int64"})

    @property
    def summary(self) -> pd.DataFrame:
        """One row per strategy: the runs' metrics, mean and standard deviation over seeds and prompts, with the
        share of repetitive runs and across-run diversity (distinct-n over all its runs, Self-BLEU-4)."""
        runs = self.runs
        out = []
        for name in self.strategies:
            mine = runs[runs["strategy"] == name]
            row: dict[str, Any] = {"strategy": name, "runs": len(mine)}
            for col in ("length", "perplexity", "mean_entropy", "distinct_2", "repeated_4gram_share"):
                row[col] = mine[col].mean()
                row[col + "_sd"] = mine[col].std(ddof=0)
            row["repetition_pct"] = 100.0 * mine["repetitive"].mean()
            seqs = [tr.row(r).token_ids for (p, n), tr in self.traces.items() if n == name for r in range(tr.rows)]
            row["distinct_2_all"] = metrics.distinct_n(seqs, 2)
            row["self_bleu_4"] = metrics.self_bleu(seqs)
            out.append(row)
        return pd.DataFrame(out)

    def _each_run(self):
        """(prompt, strategy, seed, one-row trace) for every run."""
        for (prompt, name), tr in self.traces.items():
            for r in range(tr.rows):
                seed = tr.seeds[r] if r < len(tr.seeds) else None
                yield prompt, name, seed, tr.row(r)

    @property
    def by_step(self) -> pd.DataFrame:
        """The runs aligned by step: one row per (prompt, strategy, seed, step) with the token, its probability
        and the entropy; see `divergence` for where each pair of runs parts ways."""
        frames = []
        for prompt, name, seed, tr in self._each_run():
            st = tr.steps
            frames.append(pd.DataFrame({"prompt": prompt, "strategy": name, "seed": seed, "step": st["step"],
                                        "token_id": st["token_id"], "token": st["token"], "prob": st["prob"],
                                        "entropy": st["entropy"]}))
        return pd.concat(frames, ignore_index=True).astype({"seed": "Int64"})

    @property
    def divergence(self) -> pd.DataFrame:
        """For each pair of runs of one prompt: the first step where their tokens differ (NA if one is a prefix
        of the other) and the two tokens there."""
        runs = list(self._each_run())
        rows = []
        for i, (p1, n1, s1, t1) in enumerate(runs):
            for p2, n2, s2, t2 in runs[i + 1 :]:
                if p1 != p2:
                    continue
                a, b = t1.token_ids, t2.token_ids
                first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
                rows.append({"prompt": p1, "strategy_a": n1, "seed_a": s1, "strategy_b": n2, "seed_b": s2,
                             "first_divergence": first,
                             "token_a": t1.tokens[first] if first is not None else None,
                             "token_b": t2.tokens[first] if first is not None else None})
        return pd.DataFrame(rows).astype({"seed_a": "Int64", "seed_b": "Int64", "first_divergence": "Int64"})

    def __repr__(self) -> str:
        return f"Comparison({len(self.strategies)} strategies, {len(self.prompts)} prompts, {len(self.runs)} runs)"


def compare(lm: "LM", prompts: str | Sequence[str], strategies: Mapping[str, Mapping[str, Any]], *,
            seeds: Sequence[int] = range(1), max_new_tokens: int = 64, chat: bool = False, record: Record | None = None,
            progress: bool | None = None) -> Comparison:
    """Run every strategy (× seeds, for strategies that sample) on every prompt, all runs of a prompt as one batch.

    `strategies` maps a name to `generate`'s words. Strategies that do not sample run once, not once per seed.
    """
    from .lm import _progress_bar

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not strategies:
        raise StrategyError("compare() needs at least one prompt and one strategy")
    seeds = list(seeds)
    if not seeds:
        raise StrategyError("seeds must name at least one seed")
    record = record or Record()
    if record.attention or record.lens or record.prefill_attention:
        raise StrategyError("compare() records choices, candidates and processors; attention and lens are recorded "
                            "per run: use lm.generate for the runs you want to look inside")
    traces: dict[tuple[str, str], Trace] = {}
    for prompt in prompts:
        ids, text = lm.encode(prompt, chat=chat)
        groups, alone = [], []
        for name, words in strategies.items():
            words = dict(words)
            for word in ("seed", "seeds", "max_new_tokens"):
                if word in words:
                    raise StrategyError(f"strategy {name!r}: {word}= is set by compare() for every run")
            strat = lm.strategy(ids.shape[1], max_new_tokens=max_new_tokens, **words)
            if strat.method != "token":
                alone.append((name, words))
                continue
            run_seeds = seeds if strat.do_sample else [seeds[0]]
            first = sum(len(g.runs) for g in groups)
            groups.append(Group(name, strat, list(range(first, first + len(run_seeds))), Recording(record),
                                list(run_seeds)))
        if groups:
            bar = _progress_bar(max_new_tokens, progress, sum(len(g.runs) for g in groups))
            try:
                state = run_batch(lm, ids, groups, max_new_tokens, bar)
            finally:
                if bar is not None:
                    bar.close()
            for group in groups:
                traces[(prompt, group.name)] = from_recording(group.recording, state, group.strategy, lm.model_info(),
                                                              text, seeds=group.seeds, rows=len(group.runs))
        for name, words in alone:
            traces[(prompt, name)] = lm.generate_ids(ids, text, max_new_tokens=max_new_tokens, progress=False,
                                                    record=record, **words)
    return Comparison(traces, prompts, list(strategies))
