"""A comparison's runs as the compare view lays them out: which run (`RunKey`), what its line shows (`RunLine`,
built once per run from its trace's steps), and where two runs part (from `cmp.divergence`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .display import format_number, is_missing, token_label
from .kit import token_colour, token_title

if TYPE_CHECKING:
    import pandas as pd

    from ..trace import Trace


@dataclass(frozen=True)
class RunKey:
    """Which run: model (its name in the comparison), prompt, strategy, seed (None: not sampled)."""

    model: str
    prompt: str
    strategy: str
    seed: int | None


@dataclass(frozen=True)
class RunLine:
    """What a run's line shows, built once per run: its facts, its tokens' labels and hover texts, and which
    steps have which colour."""

    facts: str  # length, stop reason, metrics: the label's hover text
    options: tuple[tuple[str, int], ...]  # (token label, step)
    tooltips: tuple[str, ...]
    colours: tuple[tuple[str, tuple[int, ...]], ...]  # (colour, steps of that colour)
    tokens: tuple[str, ...]  # the tokens' exact text


def _seed(x: Any) -> int | None:
    return None if is_missing(x) else int(x)


def run_keys(runs: "pd.DataFrame") -> list[RunKey]:
    """Every run of a comparison, in its frame's order (`cmp.runs`)."""
    cols = zip(runs["model"], runs["prompt"], runs["strategy"], runs["seed"])
    return [RunKey(m, p, s, _seed(seed)) for m, p, s, seed in cols]


def divergence_pairs(div: "pd.DataFrame") -> dict[tuple[RunKey, RunKey], int | None]:
    """(run a, run b) -> the first step where they differ (None: one is a prefix of the other), both ways round,
    from `cmp.divergence`."""
    out: dict[tuple[RunKey, RunKey], int | None] = {}
    if not len(div):
        return out
    cols = [div[c] for c in ("prompt", "model_a", "strategy_a", "seed_a", "model_b", "strategy_b", "seed_b",
                             "first_divergence")]
    for p, ma, sa, seed_a, mb, sb, seed_b, first in zip(*cols):
        a, b = RunKey(ma, p, sa, _seed(seed_a)), RunKey(mb, p, sb, _seed(seed_b))
        out[(a, b)] = out[(b, a)] = None if is_missing(first) else int(first)
    return out


def run_line(trace: "Trace", facts: str) -> RunLine:
    """A run's line from its trace's steps: token labels, the trace view's hover texts and colours."""
    st = trace.choices
    options, tooltips, by_colour = [], [], {}
    cols = zip(st["step"], st["token"], st["prob"], st["rank"], st["final_prob"], st["forced"], st["choice"])
    for step, token, prob, rank, final_prob, forced, choice in cols:
        step = int(step)
        options.append((token_label(token, 8), step))
        tooltips.append(token_title(step, token, prob, rank, final_prob, "forced" if forced else choice))
        by_colour.setdefault(token_colour(prob), []).append(step)
    return RunLine(facts, tuple(options), tuple(tooltips),
                   tuple((c, tuple(s)) for c, s in by_colour.items()), tuple(st["token"]))


def run_facts(run: Any) -> str:
    """A run's length, stop reason and metrics, from its row of `cmp.runs`."""
    return (f"{int(run.length)} tokens · stop: {run.stop_reason} · perplexity {format_number(run.perplexity)}"
            f" · mean entropy {format_number(run.mean_entropy)} · distinct-2 {format_number(run.distinct_2)}"
            f" · repetitive: {'yes' if run.repetitive else 'no'}")
