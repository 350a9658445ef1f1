"""Beam search, one step at a time, every candidate recorded: the tree `generate` keeps to itself.

Read it as transformers 5's `GenerationMixin._beam_search` (generation/utils.py) for one prompt, in
the loop's parts (`loop.forward`, `loop.process`, the observers): the processors act on the
log-softmax of the raw logits; running scores are added and flattened to B·V; K = max(2, 1 + #EOS)·B
continuations are kept (top-k, or drawn without replacement when sampling); a continuation that
ends (EOS, or the length limit) is finalised only if it ranks within the top B of the K, with its
summed logprob divided by (generated length) ** length_penalty; the first step expands beam 0
only; stopping follows `early_stopping`. Each step, the observers see the K continuations as rows
(their parent beam's logits and scores, and the continuation's token), so the usual recorders
record every candidate; `tree` says which continued, which finished and which were pruned, and
`hypotheses` the finished sequences with the candidate path that made each.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import loop
from ..loop import Observer, State, StepContext
from ..strategy import Strategy

CONTINUES, FINISHED, PRUNED = 0, 1, 2  # a candidate's fate
NEG = -1.0e9  # transformers' "impossible" score


@dataclass
class Hypothesis:
    """A finished sequence: its generated ids, its normalised score, and at each step the candidate
    (index among that step's K) it came from."""

    ids: list[int]
    score: float
    path: list[int]


@dataclass
class BeamTree:
    """Per step, the K candidates: parent beam, the candidate it grew from, token, logprob, score, fate."""

    parent: list[torch.Tensor] = field(default_factory=list)  # [K] beam row (in that step's forward)
    origin: list[torch.Tensor] = field(default_factory=list)  # [K] candidate index at the step before (-1 at 0)
    token: list[torch.Tensor] = field(default_factory=list)  # [K]
    logprob: list[torch.Tensor] = field(default_factory=list)  # [K] the token's processed logprob
    score: list[torch.Tensor] = field(default_factory=list)  # [K] cumulative (unnormalised)
    fate: list[torch.Tensor] = field(default_factory=list)  # [K] CONTINUES / FINISHED / PRUNED
    group: list[torch.Tensor] = field(default_factory=list)  # [K] the candidate's beam group (group beam search)

    def add(self, parent: torch.Tensor, origin: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor,
            score: torch.Tensor, fate: torch.Tensor, group: torch.Tensor | None = None) -> None:
        """One step's K candidates."""
        self.parent.append(parent)
        self.origin.append(origin)
        self.token.append(token)
        self.logprob.append(logprob)
        self.score.append(score)
        self.fate.append(fate)
        if group is not None:
            self.group.append(group)


@dataclass
class BeamRun:
    """What `beam_search` returns: the returned hypotheses best first, the tree, and why it stopped."""

    hypotheses: list[Hypothesis]
    tree: BeamTree
    stop_reason: str
    steps: int


def show_candidates(observers: Sequence[Observer], step: int, ids: torch.Tensor, logits: torch.Tensor,
                    scores: torch.Tensor, stages: list[torch.Tensor], token: torch.Tensor, parent: torch.Tensor) -> None:
    """Observers see the step's K candidates as rows: each its parent beam's ids and raw logits, its scores
    (`scores` and `stages` already one row per candidate), and its token."""
    no = torch.zeros(token.shape, dtype=torch.bool, device=token.device)
    ctx = StepContext(step, ids[parent], logits[parent], scores, stages, token, no, no.clone(), parent)
    for o in observers:
        o.on_step(ctx)


def advance(state: State, rows: torch.Tensor, token: torch.Tensor) -> None:
    """The running beams of the next step: beam i extends row `rows[i]` (ids and KV cache reordered) with
    `token[i]`, which the next step forwards."""
    state.ids = torch.cat([state.ids[rows], token[:, None]], dim=-1)
    state.cache.reorder_cache(rows)
    state.pending = token
    state.next_logits = None


class BeamSearch:
    """One beam search between its steps: the running scores, the finished hypotheses, the tree, and (once it
    ends) why. `step` takes the B beams' ids and raw logits and returns which beam each next beam extends and
    with which token; the caller reorders its rows and cache (`advance`, or a comparison's batch, where the B
    beams are B rows among others)."""

    def __init__(self, strategy: Strategy, prompt_length: int, device: torch.device,
                 generator: torch.Generator | None = None):
        cfg = strategy.config
        self.strategy, self.generator, self.device = strategy, generator, device
        self.beams = strategy.num_beams
        self.length_penalty, self.early_stopping = float(cfg.length_penalty), cfg.early_stopping
        self.prompt_length = prompt_length
        self.max_length = prompt_length + strategy.max_new_tokens
        self.eos = strategy.eos_tensor(device) if strategy.eos_token_ids else None
        self.keep_k = max(2, 1 + len(strategy.eos_token_ids)) * self.beams
        self.top_b = torch.arange(self.keep_k, device=device) < self.beams
        self.running_scores = torch.full((self.beams,), NEG, device=device)
        self.running_scores[0] = 0.0  # the first step expands beam 0 only
        self.paths: list[list[int]] = [[] for _ in range(self.beams)]
        self.finished: list[Hypothesis | None] = [None] * self.beams
        self.finished_scores = torch.full((self.beams,), NEG, device=device)
        self.improvable = True
        self.tree = BeamTree()
        self.origin_of_row = torch.full((self.beams,), -1, dtype=torch.long, device=device)
        self.stop: str | None = None

    def step(self, step: int, ids: torch.Tensor, logits: torch.Tensor, observers: Sequence[Observer] = (),
             keep_stages: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One step from the beams' ids [B, T] and raw logits [B, V]: (rows [B], tokens [B]) of the next beams."""
        cur_len, beams = ids.shape[1], self.beams
        log_probs = torch.log_softmax(logits, dim=-1)
        scores, stages = loop.process(self.strategy, ids, log_probs, keep_stages, step)
        vocab = scores.shape[-1]
        total = (scores + self.running_scores[:, None]).reshape(-1)
        if self.strategy.do_sample:
            idx = torch.multinomial(torch.softmax(total, -1), self.keep_k, generator=self.generator)
            top, order = total[idx].sort(descending=True)
            idx = idx[order]
        else:
            top, idx = torch.topk(total, self.keep_k)
        parent, token = idx // vocab, idx % vocab
        ends = (torch.zeros(self.keep_k, dtype=torch.bool, device=self.device) if self.eos is None
                else torch.isin(token, self.eos))
        ends = ends | (cur_len + 1 >= self.max_length)

        show_candidates(observers, step, ids, logits, scores[parent], [s[parent] for s in stages], token, parent)

        # the B best continuations that go on (transformers' _get_running_beams_for_next_iteration)
        running = top + ends.float() * NEG
        sel = torch.topk(running, beams).indices
        fate = self._finalise(ids, top, ends, parent, token, cur_len)
        fate[sel[~ends[sel]]] = CONTINUES  # an ended candidate is never expanded again
        self.tree.add(parent, self.origin_of_row[parent], token, scores[parent, token], top, fate)

        # the running beams for the next step: scores, paths
        rows = parent[sel]
        self.paths = [self.paths[int(b)] + [int(k)] for b, k in zip(rows, sel)]
        self.origin_of_row = sel.clone()
        self.running_scores = running[sel]
        self._check_stop(cur_len + 1, ends)
        return rows, token[sel]

    def _finalise(self, ids: torch.Tensor, top: torch.Tensor, ends: torch.Tensor, parent: torch.Tensor,
                  token: torch.Tensor, cur_len: int) -> torch.Tensor:
        """Finalise the top-B continuations that end (transformers' _update_finished_beams); the K fates."""
        beams = self.beams
        just_finished = ends & self.top_b
        normalised = top / ((cur_len + 1 - self.prompt_length) ** self.length_penalty)
        full = all(h is not None for h in self.finished)
        if full and self.early_stopping is True:
            normalised = normalised + NEG
        if not self.improvable:
            normalised = normalised + NEG
        normalised = normalised + (~just_finished).float() * NEG
        merged = torch.cat([self.finished_scores, normalised])
        best = torch.topk(merged, beams).indices.tolist()
        fate = torch.full((self.keep_k,), PRUNED, dtype=torch.long, device=self.device)
        new_finished, new_scores = [], []
        for i in best:
            if i < beams:
                new_finished.append(self.finished[i])
            else:
                k = i - beams
                if bool(just_finished[k]):
                    fate[k] = FINISHED
                    b = int(parent[k])
                    new_finished.append(Hypothesis(ids=ids[b, self.prompt_length:].tolist() + [int(token[k])],
                                                   score=float(merged[i]), path=self.paths[b] + [k]))
                else:
                    new_finished.append(None)
            new_scores.append(merged[i])
        self.finished, self.finished_scores = new_finished, torch.stack(new_scores)
        return fate

    def _check_stop(self, cur_len: int, ends: torch.Tensor) -> None:
        """transformers' _check_early_stop_heuristic and _beam_search_has_unfinished_sequences."""
        lp, early = self.length_penalty, self.early_stopping
        best_len = (self.max_length if early == "never" and lp > 0 else cur_len) - self.prompt_length
        best_possible = self.running_scores[0] / (best_len ** lp)
        is_finished = torch.tensor([h is not None for h in self.finished], device=self.device)
        worst = torch.where(is_finished, self.finished_scores.min(), torch.full_like(self.finished_scores, NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())
        if bool(ends.all()):
            self.stop = "max_new_tokens" if cur_len >= self.max_length else "eos"
        elif not self.improvable:
            self.stop = "no better beam possible"
        elif bool(is_finished.all()) and early is True:
            self.stop = "beams finished"

    def result(self) -> BeamRun:
        """The returned hypotheses, best first (the order of transformers' topk), the tree and why it stopped."""
        hyps = [h for h in self.finished if h is not None]
        n = int(self.strategy.config.num_return_sequences or 1)
        return BeamRun(hypotheses=hyps[:n], tree=self.tree, stop_reason=self.stop or "max_new_tokens",
                       steps=len(self.tree.token))


def beam_search(model, prompt_ids: torch.Tensor, strategy: Strategy, observers: Sequence[Observer] = (),
                generator: torch.Generator | None = None) -> BeamRun:
    """Beam search from `prompt_ids` [1, P] as `generate(num_beams=B, ...)` runs it; observers see every candidate."""
    beams = strategy.num_beams
    state = loop.prefill(model, prompt_ids.expand(beams, -1), strategy, observers, seeds=[None] * beams)
    search = BeamSearch(strategy, prompt_ids.shape[1], prompt_ids.device, generator)
    keep = any(o.keep_stages for o in observers)
    while search.stop is None:
        logits = loop.ensure_logits(model, state, observers)
        rows, token = search.step(state.steps, state.ids, logits, observers, keep)
        advance(state, rows, token)
    return search.result()
