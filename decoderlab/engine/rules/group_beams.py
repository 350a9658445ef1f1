"""Diverse (group) beam search, one step at a time, every candidate of every group recorded.

transformers 5 took group beam search out of `generate` (it lives on in the hub repo
transformers-community/group-beam-search); this is transformers 4.x's `GenerationMixin._group_beam_search`
(generation/utils.py) with its `BeamSearchScorer(num_beam_groups=G)` and `BeamHypotheses`
(generation/beam_search.py) and `HammingDiversityLogitsProcessor` (generation/logits_process.py), for one
prompt, in decoderlab's loop (`loop.prefill`, `loop.ensure_logits`, `loop.process`, the observers):

- the B = num_beams rows run as one forward; the G groups of S = B / G beams are then processed in order.
  Only the first beam of each group starts at score 0 (the others at -1e9), so step 0 expands it alone;
- each group's rows: log-softmax of the raw logits, the processors, then the Hamming diversity penalty
  (`diversity_penalty` times how often each token was chosen at this step by the earlier groups' beams);
  the group's running scores are added and its S·V continuations flattened; the top max(2, 1 + #EOS)·S
  are kept (sorted, as `torch.topk`);
- the `BeamSearchScorer` rules per group, walking the candidates best first: an EOS candidate within the
  group's top S is offered to the group's finished hypotheses (score: summed logprob / generated length **
  length_penalty, EOS counted; kept while fewer than S, or if better than the worst, which it then
  replaces); other EOS candidates are dropped; non-EOS candidates become the group's running beams until S
  are found. The group is done when it holds S hypotheses and `early_stopping` says so (True: at once;
  False: when the worst one beats the best candidate's score / current generated length ** length_penalty;
  "never": the same bound, at max_length when length_penalty > 0). A done group's beams are padded
  (row 0 of the group, the pad token, score 0) and take no part any more, but their pad token still counts
  in later groups' Hamming penalty, as in the reference;
- the KV cache is reordered by the combined beam indices of all groups; the search stops when every group
  is done or at max_new_tokens, when the running beams of the groups not done are offered to their
  hypotheses (generated length = max_new_tokens). The returned sequences are the best
  `num_return_sequences` of all groups' hypotheses together (Python's stable sort, popped from the end: of
  equal scores, the later group's comes first).

Each step the observers see every group's candidates as rows of one `StepContext` (group 0's first, each
group's best first): the parent beam's ids, raw logits and processed scores (the diversity penalty
included), and the candidate's token; the trace builder builds the trace from them, with `beam_group` saying
which group each candidate belongs to. Fates: a candidate that became a running beam continues; one whose
hypothesis is among its group's finished hypotheses at the end of the step finished (a later, better one
may still replace it, as in plain beam search); the rest, and every candidate of a done group, are pruned.

Where this differs from the reference, and why:
- the Hamming penalty is a processor appended after the strategy's processors (it is added to
  `strategy.processors` as `HammingDiversityLogitsProcessor`, so the processors frame shows what it did).
  transformers 4.x's `_get_logits_processor` put it second (after `SequenceBiasLogitsProcessor`), before
  e.g. the repetition penalty; the hub repo that replaces it for transformers 5 appends it last, as here.
  The two orders agree unless a processor after it is not a shift of each token's score (repetition penalty,
  `renormalize_logits`, exponential decay length penalty, a user's processor);
- `diversity_penalty=0` runs (the groups are then identical copies of one beam search of S beams);
  transformers 4.x and the hub repo refuse it for that reason. It is a useful baseline here;
- a returned sequence that ended at EOS ends with the EOS token its candidate chose; the reference writes
  `eos_token_id[0]` after the hypothesis instead (the same token when there is one EOS id);
- the processors see the group's rows (as the reference's `group_input_ids`), one group at a time;
- no `synced_gpus`, streamer or batch of prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import LogitsProcessor

from .. import loop
from .beams import CONTINUES, FINISHED, NEG, PRUNED, BeamRun, BeamTree, Hypothesis, advance, show_candidates
from ..loop import Observer
from ...errors import StrategyError
from ..strategy import Strategy


class HammingDiversityLogitsProcessor(LogitsProcessor):
    """transformers 4.x's Hamming diversity penalty: the scores of group g's beams lose `diversity_penalty` for
    each time a beam of groups 0..g-1 chose the token at this step. Group beam search sets `current_tokens`
    (this step's tokens of all B beams, the earlier groups' filled in) and `group` before each group's call."""

    def __init__(self, diversity_penalty: float, num_beams: int, num_beam_groups: int):
        self.diversity_penalty = float(diversity_penalty)
        self.num_beams = num_beams
        self.group_size = num_beams // num_beam_groups
        self.current_tokens: torch.Tensor | None = None
        self.group = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = self.group * self.group_size
        if start == 0 or self.current_tokens is None:
            return scores
        frequency = torch.bincount(self.current_tokens[:start], minlength=scores.shape[-1]).to(scores.device)
        return scores - self.diversity_penalty * frequency


@dataclass
class _Finished:
    score: float  # normalised
    ids: list[int]  # generated ids
    path: list[int]  # candidate index at each step
    step: int


class _GroupHypotheses:
    """transformers 4.x's `BeamHypotheses` for one group: the S best finished sequences, in insertion order."""

    def __init__(self, size: int, length_penalty: float, early_stopping, max_length: int):
        self.size, self.length_penalty, self.early_stopping = size, length_penalty, early_stopping
        self.max_length = max_length
        self.beams: list[_Finished] = []
        self.worst_score = 1e9

    def add(self, sum_logprobs: float, ids: list[int], path: list[int], generated_len: int, step: int) -> None:
        score = sum_logprobs / (generated_len ** self.length_penalty)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append(_Finished(score, ids, path, step))
            if len(self.beams) > self.size:
                ranked = sorted((h.score, i) for i, h in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int, prompt_length: int) -> bool:
        if len(self.beams) < self.size:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0.0:
            length = cur_len - prompt_length
        else:  # "never" with length_penalty > 0: the longest possible sequence gives the highest score
            length = self.max_length - prompt_length
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty


def diversity_processor(strategy: Strategy) -> HammingDiversityLogitsProcessor | None:
    """The strategy's Hamming processor, appended to its processors on first use (None when diversity_penalty
    is 0: the reference adds none then)."""
    cfg = strategy.config
    penalty = float(cfg.diversity_penalty or 0.0)
    if penalty <= 0.0:
        return None
    for p in strategy.processors:
        if isinstance(p, HammingDiversityLogitsProcessor):
            return p
    proc = HammingDiversityLogitsProcessor(penalty, strategy.num_beams, int(cfg.num_beam_groups))
    strategy.processors.append(proc)
    return proc


def group_beam_search(model, prompt_ids: torch.Tensor, strategy: Strategy, observers: Sequence[Observer] = (),
                      generator: torch.Generator | None = None) -> BeamRun:
    """Group beam search from `prompt_ids` [1, P] as transformers 4.x's `generate(num_beams=B,
    num_beam_groups=G, diversity_penalty=d)` ran it; observers see every group's candidates. `generator` is
    unused (group beam search does not sample); it keeps `beams.beam_search`'s signature."""
    cfg = strategy.config
    beams, groups = strategy.num_beams, int(cfg.num_beam_groups or 1)
    if strategy.do_sample:
        raise StrategyError(f"do_sample=True with num_beam_groups={groups}: group (diverse) beam search does not "
                            "sample; pass do_sample=False")
    if groups < 2 or beams % groups:
        raise StrategyError(f"group beam search needs num_beam_groups >= 2 dividing num_beams (got num_beams={beams}, "
                            f"num_beam_groups={groups})")
    size = beams // groups
    length_penalty, early_stopping = float(cfg.length_penalty), cfg.early_stopping
    prompt_length = prompt_ids.shape[1]
    max_length = prompt_length + strategy.max_new_tokens
    device = prompt_ids.device
    eos_ids = set(strategy.eos_token_ids)
    keep_k = max(2, 1 + len(eos_ids)) * size  # per group
    hamming = diversity_processor(strategy)

    state = loop.prefill(model, prompt_ids.expand(beams, -1), strategy, observers, seeds=[None] * beams)
    beam_scores = torch.full((beams,), NEG, device=device)
    beam_scores[::size] = 0.0  # the first beam of each group
    paths: list[list[int]] = [[] for _ in range(beams)]
    origin_of_row = torch.full((beams,), -1, dtype=torch.long, device=device)
    hyps = [_GroupHypotheses(size, length_penalty, early_stopping, max_length) for _ in range(groups)]
    done = [False] * groups
    tree = BeamTree()
    keep = any(o.keep_stages for o in observers)
    group_of_cand = torch.arange(groups, device=device).repeat_interleave(keep_k)
    stop = "max_new_tokens"
    while True:
        t = state.steps
        cur_len = state.ids.shape[1]
        logits = loop.ensure_logits(model, state, observers)
        log_probs = torch.log_softmax(logits, dim=-1)
        current = torch.zeros(beams, dtype=torch.long, device=device)  # this step's token of each beam
        reorder = torch.zeros(beams, dtype=torch.long, device=device)  # the row each beam extends
        next_scores = torch.zeros(beams, device=device)
        next_origin = torch.full((beams,), -1, dtype=torch.long, device=device)
        next_paths: list[list[int]] = [[] for _ in range(beams)]
        cand_parent, cand_token, cand_top, cand_scores, cand_stages, fates = [], [], [], [], [], []
        for g in range(groups):
            rows = torch.arange(g * size, (g + 1) * size, device=device)
            if hamming is not None:
                hamming.current_tokens, hamming.group = current, g
            scores, stages = loop.process(strategy, state.ids[rows], log_probs[rows], keep, state.steps)
            vocab = scores.shape[-1]
            total = (scores + beam_scores[rows, None]).view(1, size * vocab)
            top, idx = torch.topk(total, keep_k, dim=1, largest=True, sorted=True)
            top, idx = top[0], idx[0]
            local, token = idx // vocab, idx % vocab
            offset = g * keep_k  # the group's first candidate among the step's K
            fate = torch.full((keep_k,), PRUNED, dtype=torch.long, device=device)
            if done[g]:  # pad the group: row 0 of the group, the pad token, score 0
                if strategy.pad_token_id is None:
                    raise StrategyError("a finished beam group is padded, and there is no pad token: pass pad_token_id")
                reorder[rows] = int(rows[0])
                current[rows] = strategy.pad_token_id
                for r in rows.tolist():
                    next_paths[r] = paths[int(rows[0])]
            else:  # BeamSearchScorer.process for this group
                chosen: list[int] = []  # the ranks that become the group's running beams
                parents = (local + g * size).tolist()
                for rank, (tok, score) in enumerate(zip(token.tolist(), top.tolist())):
                    if tok in eos_ids:
                        if rank >= size:  # an EOS outside the group's top S is not a hypothesis
                            continue
                        b = parents[rank]
                        hyps[g].add(score, state.ids[b, prompt_length:].tolist() + [tok], paths[b] + [offset + rank],
                                    cur_len + 1 - prompt_length, t)
                    else:
                        chosen.append(rank)
                    if len(chosen) == size:
                        break
                if len(chosen) < size:
                    raise RuntimeError(f"group {g} found {len(chosen)} of its {size} beams among {keep_k} candidates "
                                       "(too many scores are -inf)")
                sel = torch.tensor(chosen, device=device)
                reorder[rows], current[rows], next_scores[rows] = local[sel] + g * size, token[sel], top[sel]
                next_origin[rows] = offset + sel
                fate[sel] = CONTINUES
                for row, rank in zip(rows.tolist(), chosen):
                    next_paths[row] = paths[parents[rank]] + [offset + rank]
                done[g] = done[g] or hyps[g].is_done(float(top.max()), cur_len + 1, prompt_length)
            cand_parent.append(local + g * size)
            cand_token.append(token)
            cand_top.append(top)
            cand_scores.append(scores[local])
            cand_stages.append([s[local] for s in stages])
            fates.append(fate)

        parent, token = torch.cat(cand_parent), torch.cat(cand_token)
        scores_k = torch.cat(cand_scores)
        stages_k = [torch.cat([st[i] for st in cand_stages]) for i in range(len(cand_stages[0]))]
        show_candidates(observers, state.steps, state.ids, logits, scores_k, stages_k, token, parent)
        fate = torch.cat(fates)
        tree.add(parent, origin_of_row[parent], token, scores_k.gather(-1, token[:, None]).squeeze(-1),
                 torch.cat(cand_top), fate, group_of_cand)

        beam_scores, origin_of_row, paths = next_scores, next_origin, next_paths
        advance(state, reorder, current)

        at_limit = cur_len + 1 >= max_length
        if at_limit:  # the running beams of the groups not done are offered to their hypotheses
            for g in range(groups):
                if done[g]:
                    continue
                for row in range(g * size, (g + 1) * size):
                    hyps[g].add(float(beam_scores[row]), state.ids[row, prompt_length:].tolist(), paths[row],
                                state.ids.shape[1] - prompt_length, t)
                    fate[paths[row][-1]] = PRUNED  # finished below if kept
        for g in range(groups):
            for h in hyps[g].beams:
                if h.step == t:
                    fate[h.path[-1]] = FINISHED
        if at_limit:
            break
        if all(done):
            stop = "beams finished" if early_stopping is True else "no better beam possible"
            break

    ranked = sorted((h for g in range(groups) for h in hyps[g].beams), key=lambda h: h.score)
    best = list(reversed(ranked))[: int(cfg.num_return_sequences or 1)]  # the reference pops from the end
    return BeamRun(hypotheses=[Hypothesis(ids=h.ids, score=h.score, path=h.path) for h in best], tree=tree,
                   stop_reason=stop, steps=len(tree.token))
