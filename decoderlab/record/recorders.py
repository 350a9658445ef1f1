"""The built-in per-step recorders: the choice, the top-k candidates, what each processor did, the raw logits.

Each step's softmax is computed once and shared (`scores_distribution`), so recording everything costs about
what recording the choice costs.
"""
from __future__ import annotations

import torch

from ..engine.loop import StepContext
from .options import Record
from .registry import recorder


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
