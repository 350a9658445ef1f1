"""Contrastive search (Su et al. 2022), one recorded step at a time, offline.

transformers 5 moved it out of `generate` to a hub repository (transformers-community/contrastive-search)
that needs `trust_remote_code` and a network; this is transformers 4.x's `_contrastive_search` for one
row, in the loop's parts. Each step: the processors act on the raw logits; the candidates are the
top-k of the processed distribution; all k are forwarded in one batch on a copy of the cache (the
look-ahead); each candidate's degeneration penalty is the largest cosine similarity between its
last-layer hidden state and those of the whole context (prompt included); its score is
(1 − α)·p(v) − α·penalty; the best is chosen, its row of the cache kept, and its look-ahead logits are
the next step's logits. What each step decided (every candidate's model confidence, penalty and
score) is recorded as `contrastive_*` arrays.

Departures from the reference: none in the arithmetic. The look-ahead forward also records attention
and residuals like any forward, for all k candidates; the recording keeps the chosen candidate's row.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from .. import loop
from ..loop import Observer, State, StepContext
from ..strategy import Strategy


@torch.inference_mode()
def step(model, state: State, strategy: Strategy, observers: Sequence[Observer] = (),
         force: torch.Tensor | None = None) -> torch.Tensor:
    """One contrastive-search step for a one-row state (the loop's `step` contract)."""
    if state.rows != 1:
        raise ValueError("contrastive search steps one row at a time")
    if force is not None:
        raise ValueError("contrastive search chooses by its own rule: a token cannot be forced into it")
    alpha, k = float(strategy.config.penalty_alpha), int(strategy.config.top_k)
    logits = loop.ensure_logits(model, state, observers)
    context = state.extra.get("context")
    if context is None:  # the prompt's last-layer hidden states, from the prefill
        context = state.extra["context"] = state.hidden[-1]
    keep = any(o.keep_stages for o in observers)
    scores, stages = loop.process(strategy, state.ids, logits, keep, state.steps)
    top_probs, top_ids = torch.topk(torch.softmax(scores, dim=-1), k=k, dim=-1)  # [1, k]

    # the look-ahead: every candidate forwarded at once, on the cache repeated k times
    candidates = torch.cat([state.ids.expand(k, -1), top_ids.view(k, 1)], dim=-1)
    loop.notify_forward(observers, replace(state, ids=candidates), state.steps + 1)
    state.cache.batch_repeat_interleave(k)
    ahead_logits, hidden = loop.forward_hidden(model, top_ids.view(k, 1), state.cache)
    next_hidden = hidden[-1]  # [k, 1, D]

    # the ranking (transformers' _ranking_fast)
    norm_context = context / context.norm(dim=2, keepdim=True)  # [1, T, D]
    norm_next = next_hidden / next_hidden.norm(dim=2, keepdim=True)  # [k, 1, D]
    cosine = torch.matmul(norm_context.expand(k, -1, -1), norm_next.transpose(1, 2)).squeeze(-1)  # [k, T]
    penalty = cosine.max(dim=-1).values  # [k]
    score = (1.0 - alpha) * top_probs.view(-1) - alpha * penalty
    chosen = int(score.argmax())
    token = top_ids[:, chosen]

    state.cache.batch_select_indices(torch.tensor([chosen]))  # host index: serves every device of a sharded model
    for o in observers:
        if hasattr(o, "keep_forward_rows"):
            o.keep_forward_rows(state.steps + 1, torch.tensor([chosen], device=token.device))
    decision = {"contrastive_id": top_ids, "contrastive_confidence": top_probs,
                "contrastive_penalty": penalty[None], "contrastive_score": score[None]}
    ctx = StepContext(state.steps, state.ids, logits, scores, stages, token, torch.zeros_like(state.finished),
                      state.finished, state.row_ids, decision)
    for o in observers:
        o.on_step(ctx)
    state.ids = torch.cat([state.ids, token[:, None]], dim=-1)
    state.extra["context"] = torch.cat([context, next_hidden[chosen : chosen + 1]], dim=1)
    state.next_logits = ahead_logits[chosen : chosen + 1]
    state.pending = None  # forwarded already, in the look-ahead
    if strategy.eos_token_ids:
        state.finished = state.finished | torch.isin(token, strategy.eos_tensor(token.device))
    return token
