"""DoLa (Chuang et al. 2024, "Decoding by Contrasting Layers"), one recorded step at a time, offline.

transformers 5 moved DoLa out of `generate` to a hub repository (transformers-community/dola) that needs
`trust_remote_code` and a network; this is transformers 4.x's `_dola_decoding` (with its
`_dola_select_contrast` and `_relative_top_filter`) in the loop's parts. Each step, from the one forward
the loop makes anyway (with every layer's hidden states, `State.keep_hidden`):

1. the candidate premature layers (`candidate_layers`): `dola_layers="low"` / `"high"` are every second
   layer of the lower / upper half (at most 20 layers' span: `range(0, 20, 2)` / `range(N - 20, N, 2)` for
   N > 40 layers), starting at layer 2 when the word embeddings are tied to the output layer (an early
   exit at the embeddings would be the identity); a list is used as given. Layers are numbered as
   `output_hidden_states` numbers them: 0 the embeddings, i the output of block i; N, the last (after
   the final norm), is the mature layer.
2. premature logits: the output layer (`model.get_output_embeddings()`) applied to each candidate's hidden
   state at the last position, WITHOUT the final norm (as the reference; nor any logit scaling or
   soft-capping the model applies to its own logits); final logits: the model's logits, as float32.
3. the premature layer whose distribution is furthest from the final one. The reference's "JS divergence",
   computed as it does: with M = (softmax(final) + softmax(premature)) / 2, it is
   0.5 · (kl_div(log_softmax(final), M) + kl_div(log_softmax(premature), M)), each `F.kl_div(...,
   reduction="none").mean(-1)`. `F.kl_div(input, target)` is KL(target ‖ exp(input)), so this is
   ½(KL(M‖P) + KL(M‖Q)) averaged (not summed) over the vocabulary: not the textbook JS, but what
   transformers computed; the ranking is what matters, and it is the reference's.
4. the relative-top filter: tokens with log p_final < log max p_final + log(0.1) get −inf (the premature
   side gets −1e-3 there); DoLa scores = log_softmax(final) − log_softmax(premature) on the kept tokens.
5. the strategy's processors act on the DoLa scores (the reference's `logits_processor(input_ids,
   next_token_logits)`, warpers included since 4.45), and the chooser chooses (greedy, or sampling from
   softmax of the processed DoLa scores, with the row's generator: seeded with s, it draws what
   `torch.manual_seed(s)` before the reference draws).

Recorded: `ctx.logits` are the model's final logits (so a trace's raw logprob, rank and candidates are the
model's own), `ctx.scores` the processed DoLa scores (its final logprob and rank). `ctx.decision` holds
`dola_layer` [B] (the chosen premature layer) and `dola_divergence` [B, candidates] (every candidate's
divergence, in candidate order); `words.describe(strategy)` gives the candidate list as `dola_candidate_layers`.

Departures from the reference, and why:
- the premature layer is chosen per row. The reference averages the divergences over the batch and picks
  one layer for every row, so a row's tokens would depend on the rows beside it, and here on when other
  rows leave the batch at EOS (`loop.retire_finished`). With one row, as `generate` runs DoLa (it refuses
  `seeds=`), the two are the same.
- a list of layers is checked: a layer that is not a premature layer of the model (>= N) is a
  `StrategyError`, where the reference silently drops it (and fails inside `torch.stack` when none is
  left); a tuple is taken as a list. "low" with no layer to contrast (a 3-layer model with tied
  embeddings: `range(2, 1, 2)` is empty, where the reference fails in `torch.stack`) is a `StrategyError`.
- with a single candidate the reference skips the divergence; it is computed here anyway, to be recorded
  (the choice is that candidate either way).
- `_relative_top_filter`'s threshold floor, the `min_tokens_to_keep`-th largest log-probability, is taken
  with `topk` instead of sorting the vocabulary: the same value.
Nothing else: the premature logits keep the output layer's dtype (as the reference, which casts only the
final logits to float32), and the arithmetic is the reference's, op for op.

The recorded raw logits are the model's; the processors' effects are measured against the DoLa scores they
were given (`StepContext.inputs`), so what the relative-top filter removed is not counted as theirs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import loop
from ..loop import Observer, State
from ...errors import StrategyError
from ..strategy import Strategy

RELATIVE_TOP = 0.1  # the reference's relative_top: keep tokens with p >= 0.1 · max p
FILTER_VALUE = -float("inf")  # the reference's filter_value (final side)
BASE_FILTER_VALUE = -1e-3  # the reference's base_filter_value (premature side)


def is_tied(model) -> bool:
    """Whether the word embeddings are tied to the output layer, as the reference asks (the config's
    `tie_word_embeddings`; where a config lacks it, whether the two weights are one tensor)."""
    tied = getattr(model.config, "tie_word_embeddings", None)
    if tied is None:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        tied = out is not None and inp is not None and out.weight is inp.weight
    return bool(tied)


def premature_layers(num_layers: int, tied: bool, dola_layers) -> list[int]:
    """The candidate premature layers of an N-layer model, as transformers 4.x's `_dola_decoding` picks them
    (hidden-state indices: 0 the embeddings, N the final layer, which is the mature one)."""
    final_layer = num_layers
    if not tied:
        start_layer = 0
    elif final_layer > 2:
        start_layer = 2
    elif final_layer == 2:
        start_layer = 1
    else:
        start_layer = 0
    if isinstance(dola_layers, str) and dola_layers == "low":
        if start_layer == final_layer // 2:
            layers = [start_layer]
        else:
            layers = (list(range(start_layer, final_layer // 2, 2)) if final_layer <= 40
                      else list(range(start_layer, 20, 2)))
    elif isinstance(dola_layers, str) and dola_layers == "high":
        layers = (list(range(final_layer // 2, final_layer, 2)) if final_layer <= 40
                  else list(range(final_layer - 20, final_layer, 2)))
    elif isinstance(dola_layers, (list, tuple)) and dola_layers and all(
            isinstance(i, int) and not isinstance(i, bool) for i in dola_layers):
        bad = [i for i in dola_layers if not 0 <= i < final_layer]
        if bad:
            raise StrategyError(f"dola_layers={list(dola_layers)!r}: {bad} are not premature layers of this "
                                f"{final_layer}-layer model; give layers 0 (the embeddings) to {final_layer - 1} "
                                f"({final_layer}, the last, is the mature layer they are contrasted with)")
        layers = list(dola_layers)
    else:
        raise StrategyError(f"dola_layers={dola_layers!r}: must be 'low', 'high', or a list of layer indices")
    if not layers:
        raise StrategyError(f"dola_layers={dola_layers!r} leaves no premature layer in this {final_layer}-layer "
                            f"model{' with tied embeddings (which skips layers 0 and 1)' if tied else ''}: "
                            "give a list of layers")
    return layers


def candidate_layers(model, dola_layers) -> list[int]:
    """The candidate premature layers of `model` for `dola_layers` ("low", "high", or a list)."""
    return premature_layers(int(model.config.get_text_config().num_hidden_layers), is_tied(model), dola_layers)


def premature_logits(model, hidden: Sequence[torch.Tensor], layers: Sequence[int], device) -> torch.Tensor:
    """[L, B, V]: the output layer applied to each candidate layer's hidden state at the last position
    (no final norm), in the output layer's dtype, stacked in candidate order (the reference's stack)."""
    lm_head = model.get_output_embeddings()
    return torch.stack([lm_head(hidden[i][:, -1, :]).to(device) for i in layers], dim=0)


def divergences(final_logits: torch.Tensor, premature: torch.Tensor) -> torch.Tensor:
    """[L, B]: `_dola_select_contrast`'s JS divergence of each premature distribution from the final one,
    per row (before the reference's mean over the batch)."""
    softmax_mature_layer = F.softmax(final_logits, dim=-1)  # [B, V]
    softmax_premature_layers = F.softmax(premature, dim=-1)  # [L, B, V]
    avg_dist = 0.5 * (softmax_mature_layer[None, :, :] + softmax_premature_layers)
    log_softmax_mature_layer = F.log_softmax(final_logits, dim=-1)
    log_softmax_premature_layers = F.log_softmax(premature, dim=-1)
    kl1 = F.kl_div(log_softmax_mature_layer[None, :, :], avg_dist, reduction="none").mean(-1)
    kl2 = F.kl_div(log_softmax_premature_layers, avg_dist, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


def relative_top_filter(
    scores: torch.Tensor,
    baseline_scores: torch.Tensor,
    relative_top: float = RELATIVE_TOP,
    filter_value: float = FILTER_VALUE,
    base_filter_value: float = BASE_FILTER_VALUE,
    min_tokens_to_keep: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 4.x's `_relative_top_filter`: both sides log-softmaxed; where the final side's log p is
    below log max p + log(relative_top) (floored at its `min_tokens_to_keep`-th largest), the final side
    gets `filter_value` and the premature side `base_filter_value`."""
    scores_normalized = scores.log_softmax(dim=-1)
    baseline_scores_normalized = baseline_scores.log_softmax(dim=-1)
    min_thresh = torch.topk(scores_normalized, min_tokens_to_keep, dim=-1).values[..., -1]
    probs_max = torch.max(scores_normalized, dim=-1).values
    probs_thresh = probs_max + math.log(relative_top)
    probs_thresh = torch.min(min_thresh, probs_thresh).unsqueeze(-1)
    filtered = scores_normalized < probs_thresh
    baseline_scores_normalized[filtered] = base_filter_value
    scores_normalized[filtered] = filter_value
    return scores_normalized, baseline_scores_normalized


def contrast(final_logits: torch.Tensor, premature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DoLa's scores [B, V] from final logits [B, V] and candidate logits [L, B, V]; also each row's chosen
    candidate (an index into the L candidates) [B] and the divergences [L, B]."""
    js = divergences(final_logits, premature)
    chosen = js.argmax(dim=0)  # the first largest, as the reference's argmax
    base_logits = premature[chosen, torch.arange(premature.shape[1], device=premature.device)]
    final_normalized, base_normalized = relative_top_filter(final_logits, base_logits)
    return final_normalized - base_normalized, chosen, js


@torch.inference_mode()
def step(
    model,
    state: State,
    strategy: Strategy,
    observers: Sequence[Observer] = (),
    force: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DoLa step for every row (the loop's `step` contract): the processors and the chooser act on the
    DoLa scores; the recorded raw logits are the model's."""
    if model.get_output_embeddings() is None:
        raise StrategyError("dola_layers: DoLa needs the model's output layer (get_output_embeddings() is None)")
    layers = candidate_layers(model, strategy.config.dola_layers)
    strategy.dola_candidate_layers = layers  # for describe(): the strategy does not know the model
    logits = loop.ensure_logits(model, state, observers)
    if state.hidden is None:
        raise ValueError("DoLa reads every layer's hidden states: prefill with keep_hidden=True")
    premature = premature_logits(model, state.hidden, layers, logits.device)
    dola_scores, chosen, js = contrast(logits, premature)
    keep = any(o.keep_stages for o in observers)
    scores, stages = loop.process(strategy, state.ids, dola_scores.to(state.ids.device), keep, state.steps)
    decision = {"dola_layer": torch.tensor(layers, dtype=torch.long, device=chosen.device)[chosen],
                "dola_divergence": js.T.to(torch.float32)}
    return loop.choose(state, strategy, logits, scores, stages, observers, force, decision, inputs=dola_scores)
