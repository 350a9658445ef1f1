"""`BranchingSession`: what every session shares, whatever holds its state: a tree of branches, the checks on
step / choose / rewind / fork, the trace rebuilt only after a change, and the frames those calls return.

A local session (`Session`) keeps a KV cache; a server's (`APISession`) keeps only tokens and asks the server
for each step. They differ only in the hooks below, so the widgets (`dl.explore`) and a user's code drive
both the same way.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

from ..errors import SessionError
from ..trace import Trace


def _is_step(value: Any, last: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 0 <= value <= last


class BranchingSession:
    """Step through a generation, force a token, rewind and branch. Every branch is a session of the same class;
    `session.tree` lists them. Subclasses give the hooks: `steps`, `done`, `text`, `_build_trace`, `_step`,
    `_run`, `_choose`, `_rewind`, `_child` and `candidates`."""

    branches: list
    branch: int
    parent: int | None
    fork_step: int | None

    def _plant(self) -> None:
        """This session as the root of a new tree."""
        self.branches = [self]
        self.branch, self.parent, self.fork_step = 0, None, None
        self._trace: Trace | None = None

    def _graft(self, parent: "BranchingSession") -> None:
        """This session as a new branch of `parent`'s tree, forked where `parent` stands now."""
        self.branches = parent.branches
        self.branch, self.parent, self.fork_step = len(self.branches), parent.branch, parent.steps
        self.branches.append(self)
        self._trace = None

    # ---- hooks ------------------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Tokens generated so far on this branch."""
        raise NotImplementedError

    @property
    def done(self) -> bool:
        """Whether this branch ended (EOS)."""
        raise NotImplementedError

    def _build_trace(self) -> Trace:
        raise NotImplementedError

    def _step(self, n: int) -> None:
        """Up to `n` steps with the session's strategy, stopping where the branch ends."""
        raise NotImplementedError

    def _run(self) -> None:
        """Steps until the branch ends or reaches the strategy's max_new_tokens."""
        raise NotImplementedError

    def _choose(self, rank: int | None, token: str | int | None) -> None:
        """One forced step: the candidate at `rank`, or `token`."""
        raise NotImplementedError

    def _rewind(self, to: int) -> None:
        """Back to just before step `to` (a valid step, checked); drops the cached trace if anything changed."""
        raise NotImplementedError

    def _child(self) -> "BranchingSession":
        """A new branch, a copy of this one as it stands."""
        raise NotImplementedError

    def candidates(self, k: int | None = None) -> pd.DataFrame:
        raise NotImplementedError

    # ---- where we are -----------------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        return self.trace.text

    def _describe(self) -> str:
        return f"branch={self.branch}, steps={self.steps}, done={self.done}, text={self.text[-60:]!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._describe()})"

    @property
    def trace(self) -> Trace:
        """This branch's trace so far (rebuilt only after it changes)."""
        if self._trace is None:
            self._trace = self._build_trace()
        return self._trace

    @property
    def tree(self) -> pd.DataFrame:
        """One row per branch: (branch, parent, fork_step, steps, text)."""
        frame = pd.DataFrame([{"branch": b.branch, "parent": b.parent, "fork_step": b.fork_step,
                               "steps": b.steps, "text": b.text} for b in self.branches])
        return frame.astype({"parent": "Int64", "fork_step": "Int64"})  # the root has none: <NA>, not NaN

    def branch_of(self, index: int) -> "BranchingSession":
        """The branch with that number."""
        return self.branches[index]

    def _new_rows(self, since: int) -> pd.DataFrame:
        steps = self.trace.choices
        return steps[steps.step >= since].reset_index(drop=True)

    # ---- moving -----------------------------------------------------------------------------------------------
    def step(self, n: int = 1) -> pd.DataFrame:
        """Decode `n` tokens with the session's strategy; return their rows of `trace.choices` (`trace.steps`
        less the lens's commit layer, which would unembed every step again). Stops early where the branch ends
        (EOS; a local model's full context window). An explicit step is not limited by the strategy's
        `max_new_tokens` (that is `run()`'s)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SessionError(f"step(n={n!r}): n must be a whole number >= 1")
        since = self.steps
        self._step(n)
        return self._new_rows(since)

    def run(self) -> pd.DataFrame:
        """Decode until the branch ends or the strategy's max_new_tokens; return the new rows."""
        since = self.steps
        self._run()
        return self._new_rows(since)

    def choose(self, rank: int | None = None, token: str | int | None = None) -> pd.DataFrame:
        """Force the next token: the candidate at `rank` (0 = the model's favourite), or any `token` (its text, or
        a token id). Recorded as forced, with the model's probability where it is known."""
        if (rank is None) == (token is None):
            raise SessionError("choose() takes exactly one of rank= or token=")
        if self.done:
            raise SessionError("this branch already ended at EOS: rewind() or fork() first")
        since = self.steps
        self._choose(rank, token)
        return self._new_rows(since)

    def rewind(self, to: int) -> "BranchingSession":
        """Go back to just before step `to` (keep `to` tokens); the prefix is not recomputed."""
        if not _is_step(to, self.steps):
            raise SessionError(f"rewind(to={to!r}): must be a step in [0, {self.steps}]")
        self._rewind(to)
        return self

    def fork(self, at: int | None = None) -> "BranchingSession":
        """An independent branch sharing this branch's prefix (up to step `at`, default: now)."""
        if at is not None and not _is_step(at, self.steps):
            raise SessionError(f"fork(at={at!r}): must be a step in [0, {self.steps}]")
        child = self._child()
        if at is not None:
            child.rewind(at)
            child.fork_step = at
        return child
