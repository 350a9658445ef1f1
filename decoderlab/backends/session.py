"""`Session`: the loop's state held open, so a user can step, force a token, rewind and branch.

No second loop: a session calls `loop.step` on a `State` it keeps. Rewinding crops the KV cache
and the recording; forking copies them. Each step's random-generator state is kept, so a session
rewound to step k and stepped again draws the same tokens.
"""
from __future__ import annotations

import random
from typing import Callable

import pandas as pd
import torch
from transformers import DynamicCache

from ..engine import Strategy, loop
from ..errors import DecoderlabError, SessionError
from ..record import Record, Recording, top_candidates
from ..trace import ModelInfo, Trace, from_recording
from .branching import BranchingSession


class Session(BranchingSession):
    """Step through a generation on a local model. Every branch of the tree is a `Session`; `session.tree` lists
    them; what all sessions share (the tree, the checks, the frames returned) is `BranchingSession`'s.

    A session holds one row (one sequence); `generate(seeds=[...])` runs several. It needs the model,
    the resolved strategy, what a trace needs of the model (`ModelInfo`), the context window, and a
    way to turn text into token ids (for `choose(token="...")`); `LM.session` gives all of them.
    """

    def __init__(self, model, prompt_ids: torch.Tensor, prompt_text: str, record: Record, strategy: Strategy,
                 info: ModelInfo, *, context_window: int | None = None,
                 encode_token: Callable[[str], list[int]] | None = None, _parent: "Session | None" = None):
        if prompt_ids.shape[0] != 1:
            raise SessionError(f"a session holds one row, not {prompt_ids.shape[0]}: use generate(seeds=...) "
                               "for several")
        self.model = model
        self.prompt_text = prompt_text
        self.record = record
        self.info = info
        self.context_window = context_window
        self.encode_token = encode_token
        if _parent is not None:
            self._copy_from(_parent)
            return
        self.strategy = strategy
        if strategy.do_sample and strategy.seed is None:
            # sampling (asked for, or the model's default) with no seed: pick one, so that rewinds reproduce the draws
            strategy.seed = random.randrange(2**31)
        record.check(model)
        self.recording = Recording(record, host=(1, prompt_ids.shape[1]))  # steps move to host buffers as in generate
        self._plant()
        self._rng_states: list = []
        with self.recording.attached(model):
            # A cache that keeps every position (sliding-window layers masked, not trimmed), so that
            # rewind can always crop it instead of recomputing the prefix.
            self.state = loop.prefill(model, prompt_ids, strategy, [self.recording], cache=DynamicCache())

    def _copy_from(self, other: "Session") -> None:
        self.strategy = other.strategy
        self.recording = other.recording.copy()
        self.state = loop.copy_state(other.state)
        self._rng_states = list(other._rng_states)
        self._graft(other)

    # ---- where we are -----------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Tokens generated so far on this branch."""
        return self.state.steps

    @property
    def done(self) -> bool:
        return bool(self.state.finished.all()) if self.strategy.eos_token_ids else False

    def _build_trace(self) -> Trace:
        return from_recording(self.recording, self.state, self.strategy, self.info, self.prompt_text,
                              branch=self.branch, parent=self.parent, fork_step=self.fork_step)

    def candidates(self, k: int | None = None) -> pd.DataFrame:
        """The next step's top-k tokens (raw and final probabilities), before anything is chosen."""
        logits = self._next_logits()
        scores, _ = loop.process(self.strategy, self.state.ids, logits, False, self.steps)
        k = min(k or self.record.top_k, logits.shape[-1])
        top = top_candidates(logits, torch.softmax(logits, -1), torch.softmax(scores, -1), k)
        ids = top["cand_id"][0].tolist()
        return pd.DataFrame({"step": self.steps, "rank": range(k), "token_id": ids,
                             "token": [self.info.token_text(i) for i in ids], "logit": top["cand_logit"][0].tolist(),
                             "prob": top["cand_prob"][0].tolist(), "final_prob": top["cand_final_prob"][0].tolist()})

    # ---- moving -----------------------------------------------------------------------------------
    def _next_logits(self) -> torch.Tensor:
        with self.recording.attached(self.model):
            return loop.ensure_logits(self.model, self.state, [self.recording])

    def _window_full(self) -> bool:
        return loop.window_full(self.state.ids.shape[1], self.context_window)

    def _advance(self, force: torch.Tensor | None = None) -> None:
        """One step; if it fails, the session is as it was before it (generators included)."""
        saved = loop.generator_states(self.state)
        steps = self.steps
        try:
            with self.recording.attached(self.model):
                loop.step(self.model, self.state, self.strategy, [self.recording], force=force)
        except BaseException as err:
            loop.restore_generators(self.state, saved)
            self.recording.drop_steps(steps)  # a recorder may have failed half-way (the forward's capture stays)
            self._trace = None
            if isinstance(err, DecoderlabError) and err.trace is None:
                err.trace = self.trace  # the branch as it stands, before the failed step
            raise
        self._rng_states.append(saved)
        self._trace = None

    def _step(self, n: int) -> None:
        self.state.stop_reason = None
        for _ in range(n):
            if self.done:
                self.state.stop_reason = "eos"
                break
            if self._window_full():
                self.state.stop_reason = "context_window"
                break
            self._advance()
        if self.done:
            self.state.stop_reason = "eos"

    def _run(self) -> None:
        while not self.done and self.steps < self.strategy.max_new_tokens and not self._window_full():
            self._advance()
        self.state.stop_reason = loop.should_stop(self.state, self.strategy, self.context_window)

    def _choose(self, rank: int | None, token: str | int | None) -> None:
        """`token` is a vocabulary id, or text: a likely candidate (top 50) with exactly that text, or, for text
        without a leading space, with a leading space (the word as it would continue the text); otherwise text
        that is exactly one token."""
        if self._window_full():
            raise SessionError(f"the context window ({self.context_window} tokens) is full: rewind() first")
        if rank is not None:
            logits = self._next_logits()
            vocab = logits.shape[-1]
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < vocab:
                raise SessionError(f"rank={rank!r}: must be a whole number in [0, {vocab})")
            order = torch.topk(logits[0], rank + 1).indices
            token_id = int(order[rank])
        else:
            token_id = self._token_id(token)
        self._advance(force=torch.tensor([token_id], device=self.state.ids.device))

    def _token_id(self, token: str | int) -> int:
        vocab = self._next_logits().shape[-1]
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < vocab:
                raise SessionError(f"token id {token} is outside the vocabulary [0, {vocab})")
            return token
        if not isinstance(token, str) or not token:
            raise SessionError(f"token={token!r}: give a non-empty string or a token id")
        cands = self.candidates(k=max(self.record.top_k, 50))
        # the exact text among the likely tokens; else, for a bare word, the word as it would continue the text
        matches = [cands.token == token]
        if not token[0].isspace():
            matches.append(cands.token == " " + token)
        for match in matches:
            if match.any():
                return int(cands.token_id[match].iloc[0])
        if self.encode_token is None:
            raise SessionError(f"{token!r} is not among the likely candidates, and this session has no tokenizer "
                               "to encode it: pass a token id")
        ids = self.encode_token(token)
        if len(ids) != 1 and not token[0].isspace():  # a bare word, as it would continue the text (as above)
            spaced = self.encode_token(" " + token)
            if len(spaced) == 1:
                return int(spaced[0])
        if len(ids) != 1:
            pieces = [self.info.token_text(i) for i in ids]
            raise SessionError(f"{token!r} is {len(ids)} tokens {pieces}, not one: choose one of them, or pass an id")
        return int(ids[0])

    def _rewind(self, to: int) -> None:
        if to == self.steps:
            return
        loop.crop(self.state, to, self.strategy.eos_token_ids)
        self.recording.truncate(to)
        loop.restore_generators(self.state, self._rng_states[to])
        del self._rng_states[to:]
        self._trace = None

    def _child(self) -> "Session":
        return Session(self.model, self.state.ids[:, : self.state.prompt_length], self.prompt_text, self.record,
                       self.strategy, self.info, context_window=self.context_window,
                       encode_token=self.encode_token, _parent=self)
