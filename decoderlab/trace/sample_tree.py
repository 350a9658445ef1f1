"""`SampleTree`: n sampled continuations of one prompt merged into a prefix tree, with how many runs pass
through each node and what the model thought of each token there.

Why a tree: n samples printed one under another hide where they agree. Merged by their common prefixes, they
show at a glance where the runs part, how many take each branch, and how sure the model was at that point:
a split whose runs spread evenly where the model was sure is luck, one that follows the model's entropy is
the distribution at work. The split entropy (of the runs among a node's children) is set beside the model's
entropy at that position for this comparison.

Plain data, built from a batch `Trace` (one row per seed, as `lm.generate(prompt, seeds=...)` makes and
`lm.sample_tree` calls). Drawing it (`show`, `to_html`) is the views' work, plugged in by decoderlab's front
door through `trace.PRESENTERS`, so that this room never imports a view.
"""
from __future__ import annotations

import math
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..errors import StrategyError
from .trace import Trace, presenter

__all__ = ["SampleTree", "NODE_COLUMNS", "sample_seeds", "check_sampling"]

NODE_COLUMNS = ["node", "parent", "depth", "token_id", "token", "count", "share", "ends", "children", "prob",
                "final_prob", "logprob", "final_logprob", "cum_logprob", "cum_final_logprob", "split_entropy",
                "entropy", "final_entropy", "branch_mass", "rows"]
_FLOATS = ("prob", "final_prob", "logprob", "final_logprob", "entropy", "final_entropy")


def sample_seeds(n: Any, seed: Any, words: dict) -> list[int]:
    """The seeds of a tree of `n` samples from `seed`: seed, seed + 1, ..., seed + n - 1 (a clear error for
    anything but whole numbers, n >= 1, and for `seeds=` among the strategy `words`)."""
    if "seeds" in words:
        raise StrategyError("sample_tree takes seed= (run i draws with seed + i) and n=, not seeds=")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise StrategyError(f"n={n!r}: the number of samples must be a whole number >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise StrategyError(f"seed={seed!r}: must be a whole number (run i is seeded with seed + i)")
    return list(range(int(seed), int(seed) + int(n)))


def check_sampling(strategy: Any, n: int, words: dict) -> None:
    """Refuse what cannot be a tree of samples, before anything runs: a beam search (its rows are beams, not
    samples) and rules that decode one run at a time (contrastive search, DoLa). Warn when nothing is drawn:
    n greedy runs are one path, n times."""
    if strategy.num_beams > 1:
        raise StrategyError(f"num_beams={strategy.num_beams}: a sample tree merges n sampled runs; a beam search keeps "
                            "its own tree: lm.generate(prompt, num_beams=...) and trace.beams")
    if not strategy.rule.by_processors:
        raise StrategyError(f"{strategy.rule.name} decoding runs one sequence at a time, so it cannot be sampled as "
                            "rows of one batch; drop its words (penalty_alpha, dola_layers, ...)")
    if n > 1 and not strategy.do_sample and "chooser" not in words:
        warnings.warn(f"do_sample=False: all {n} runs are the same greedy run, so the tree is one path; "
                      "leave do_sample=True (the default) to sample", UserWarning, stacklevel=3)


class SampleTree:
    """n runs of one prompt, one row each of a batch trace, merged into a prefix tree.

    Node 0 is the prompt; every other node is one token after its parent's prefix, shared by the `count`
    runs that begin so. Nodes are numbered depth first, the branch most runs take first. A run is a path
    from the root to its leaf (`runs.leaf`): `path(seed)` gives its nodes, whose tokens are the ones
    `lm.generate(prompt, seed=seed, ...)` draws alone with the same words.
    """

    def __init__(self, trace: Trace):
        if trace.has_beams:
            raise ValueError("a beam search's trace holds beams, not samples: its tree is trace.beams")
        self.trace = trace
        self._grow()

    # ---- building ----------------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Merge the runs into a tree (`_Walk`), number its nodes depth first with the busiest child first (ties:
        the lower seed's), and read each node's numbers off the recorded steps."""
        ch = self.trace.choices
        n = self.trace.rows
        order = np.lexsort((ch["step"].to_numpy(), ch["row"].to_numpy()))  # run by run, step by step
        walk = _Walk(ch["row"].to_numpy()[order], ch["token_id"].to_numpy()[order], n)

        new, seen, stack = [0] * len(walk.parent), [], [0]
        while stack:
            v = stack.pop()
            new[v] = len(seen)
            seen.append(v)
            stack.extend(sorted(walk.kids[v].values(), key=lambda c: (len(walk.through[c]), -walk.through[c][0])))
        size = len(seen)
        self._parent = np.array([-1 if walk.parent[v] < 0 else new[walk.parent[v]] for v in seen], dtype=np.int64)
        self._children = [sorted(new[c] for c in walk.kids[v].values()) for v in seen]
        self._rows = [tuple(walk.through[v]) for v in seen]
        self._leaf = np.array([new[v] for v in walk.leaf], dtype=np.int64)
        counts = np.array([len(walk.through[v]) for v in seen], dtype=np.int64)
        depth = np.zeros(size, dtype=np.int64)
        for v in range(1, size):  # a parent is numbered before its children
            depth[v] = depth[self._parent[v]] + 1

        recorded = {c: ch[c].to_numpy(dtype=np.float64, na_value=np.nan)[order] for c in _FLOATS}
        made, after = np.array(walk.made_at)[seen], np.array(walk.after_at)[seen]

        def at(where: np.ndarray, column: str) -> np.ndarray:
            """A recorded column at those steps (NaN where there is none: the root's token, a leaf's next step)."""
            values = recorded[column]
            if not len(values):
                return np.full(len(where), np.nan)
            return np.where(where >= 0, values[np.maximum(where, 0)], np.nan)

        logprob, final_logprob, final_prob = at(made, "logprob"), at(made, "final_logprob"), at(made, "final_prob")
        cum, cum_final = np.zeros(size), np.zeros(size)
        for v in range(1, size):
            cum[v] = cum[self._parent[v]] + logprob[v]
            cum_final[v] = cum_final[self._parent[v]] + final_logprob[v]
        split_entropy, branch_mass = np.full(size, np.nan), np.full(size, np.nan)
        for v, kids in enumerate(self._children):
            if kids:
                split_entropy[v] = entropy_of_counts(counts[kids])
                branch_mass[v] = float(final_prob[kids].sum())
        ids = np.array([walk.token[v] for v in seen], dtype=np.int64)
        text = self.trace.token_text
        self._nodes = pd.DataFrame({
            "node": np.arange(size, dtype=np.int64),
            "parent": pd.arrays.IntegerArray(np.maximum(self._parent, 0), self._parent < 0),
            "depth": depth,
            "token_id": pd.arrays.IntegerArray(np.maximum(ids, 0), ids < 0),
            "token": np.array(["" if i < 0 else text.get(int(i), f"<{int(i)}>") for i in ids], dtype=object),
            "count": counts, "share": counts / max(n, 1),
            "ends": np.array([walk.ends[v] for v in seen], dtype=np.int64),
            "children": np.array([len(k) for k in self._children], dtype=np.int64),
            "prob": at(made, "prob"), "final_prob": final_prob, "logprob": logprob, "final_logprob": final_logprob,
            "cum_logprob": cum, "cum_final_logprob": cum_final, "split_entropy": split_entropy,
            "entropy": at(after, "entropy"), "final_entropy": at(after, "final_entropy"), "branch_mass": branch_mass,
            "rows": self._rows,
        }, columns=NODE_COLUMNS)

    # ---- facts --------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """How many runs the tree holds."""
        return self.trace.rows

    @property
    def seeds(self) -> list:
        """Each run's seed, in row order."""
        return list(self.trace.seeds)

    @property
    def prompt(self) -> str:
        """The prompt as text (after the chat template, where one was applied)."""
        return self.trace.prompt

    def __len__(self) -> int:
        return len(self._nodes)

    def __repr__(self) -> str:
        parts = len(self.where_they_part)
        return (f"SampleTree(model={self.trace.model_name!r}, runs={self.n}, nodes={len(self)}, "
                f"distinct={len(set(self._leaf.tolist()))}, splits={parts})")

    # ---- frames -------------------------------------------------------------------------------------------
    @property
    def nodes(self) -> pd.DataFrame:
        """One row per node: `node`, `parent` (NA for the root, node 0, the prompt), `depth` (tokens after the
        prompt), `token_id`, `token`, `count` (runs through it) and `share` (of all runs), `ends` (runs that stop
        here), `children`; the model's `prob`/`logprob` of the token given its prefix, raw and after the processors
        (`final_`), and summed along the path (`cum_logprob`, `cum_final_logprob`); at a node with children, the
        entropy of how its runs split among them (`split_entropy`, nats), the model's entropy at that position,
        raw and final (`entropy`, `final_entropy`), and the final probability the children's tokens had in all
        (`branch_mass`: how much of the distribution the samples reached); `rows`, the runs through it.

        The model's numbers are those the first run through the node recorded (runs through one node share its
        prefix, so they recorded the same numbers, to the rounding of a batched forward)."""
        return self._nodes

    @cached_property
    def runs(self) -> pd.DataFrame:
        """One row per run: its `row` in the trace, `seed`, `leaf` node, `length` (tokens, EOS included),
        `stop_reason`, `text`, its `logprob` and `final_logprob` summed over its tokens, and its `token_ids`."""
        runs = self.trace.runs
        ids = self.trace.array("token_id") if self.trace.num_steps else np.zeros((0, self.n), np.int64)
        token_ids = [tuple(int(t) for t in ids[self.trace.alive_steps(r), r]) for r in range(self.n)]
        return pd.DataFrame({
            "row": runs["row"], "seed": runs["seed"], "leaf": self._leaf, "length": runs["length"],
            "stop_reason": runs["stop_reason"], "text": runs["text"],
            "logprob": self._nodes["cum_logprob"].to_numpy()[self._leaf],
            "final_logprob": self._nodes["cum_final_logprob"].to_numpy()[self._leaf], "token_ids": token_ids,
        })

    @cached_property
    def where_they_part(self) -> pd.DataFrame:
        """The nodes where runs split (two children or more), by depth: `node`, `depth`, `count`, `parts` (how many
        ways), `split_entropy` beside the model's `entropy` and `final_entropy` there, `branch_mass`, the branches'
        first `tokens` and their `counts` (busiest first), and the generated `prefix` before the split."""
        nd = self._nodes
        at = nd[nd["children"] >= 2].sort_values(["depth", "node"])
        tokens = nd["token"].to_numpy()
        rows = [{
            "node": int(v), "depth": int(d), "count": int(c), "parts": int(k), "split_entropy": h, "entropy": e,
            "final_entropy": fe, "branch_mass": m,
            "tokens": tuple(tokens[c_] for c_ in self._children[v]),
            "counts": tuple(int(nd["count"].iat[c_]) for c_ in self._children[v]),
            "prefix": "".join(tokens[u] for u in self.path_to(int(v))[1:]),
        } for v, d, c, k, h, e, fe, m in at[["node", "depth", "count", "children", "split_entropy", "entropy",
                                               "final_entropy", "branch_mass"]].itertuples(index=False)]
        columns = ["node", "depth", "count", "parts", "split_entropy", "entropy", "final_entropy", "branch_mass",
                   "tokens", "counts", "prefix"]
        return pd.DataFrame(rows, columns=columns)

    @cached_property
    def segments(self) -> pd.DataFrame:
        """The tree with its chains collapsed: one row per chain of nodes that the same runs pass (each but the
        last has one child and no run ends there), as a drawing shows it, one edge and one label. `segment` is the
        chain's last node (its id), `first` its first, `parent` the node it hangs from; `nodes` the chain, `text`
        its tokens joined, `count` its runs, `depth_first`/`depth_last`, the first token's `prob` and
        `final_prob` (where the chain's runs chose it), and the lowest `min_prob` along the chain."""
        nd = self._nodes
        prob = nd["prob"].to_numpy()
        final_prob = nd["final_prob"].to_numpy()
        tokens, counts, ends = nd["token"].to_numpy(), nd["count"].to_numpy(), nd["ends"].to_numpy()
        rows = []
        for first in range(1, len(nd)):  # a chain starts under the root or under a node where the runs part
            p = int(self._parent[first])
            if p != 0 and len(self._children[p]) == 1 and ends[p] == 0:
                continue
            chain = [first]
            while len(self._children[chain[-1]]) == 1 and ends[chain[-1]] == 0:
                chain.append(self._children[chain[-1]][0])
            last = chain[-1]
            rows.append({"segment": last, "first": first, "parent": p, "nodes": tuple(chain),
                         "text": "".join(tokens[chain]), "count": int(counts[first]),
                         "depth_first": int(nd["depth"].iat[first]), "depth_last": int(nd["depth"].iat[last]),
                         "prob": float(prob[first]), "final_prob": float(final_prob[first]),
                         "min_prob": float(np.nanmin(prob[chain])) if not np.isnan(prob[chain]).all() else math.nan})
        columns = ["segment", "first", "parent", "nodes", "text", "count", "depth_first", "depth_last", "prob",
                   "final_prob", "min_prob"]
        return pd.DataFrame(rows, columns=columns)

    # ---- walking -------------------------------------------------------------------------------------------
    def children(self, node: int) -> list[int]:
        """A node's children, busiest first."""
        return list(self._children[self._check(node)])

    def path_to(self, node: int) -> list[int]:
        """The nodes from the root (0) down to `node`."""
        v = self._check(node)
        out = [v]
        while self._parent[v] >= 0:
            v = int(self._parent[v])
            out.append(v)
        return out[::-1]

    def runs_through(self, node: int) -> pd.DataFrame:
        """The runs (rows of `runs`) whose tokens begin with `node`'s prefix."""
        return self.runs.iloc[list(self._rows[self._check(node)])]

    def path(self, seed: int) -> pd.DataFrame:
        """The nodes of the run with seed `seed`, root left out, in order: its `token_id`s are the tokens
        `lm.generate(prompt, seed=seed, ...)` draws with the tree's words."""
        if seed not in self.seeds:
            raise KeyError(f"no run with seed {seed!r}: this tree's seeds are {self._seed_range()}")
        leaf = int(self._leaf[self.seeds.index(seed)])
        return self._nodes.iloc[self.path_to(leaf)[1:]].reset_index(drop=True)

    def _seed_range(self) -> str:
        s = self.seeds
        if not s or any(not isinstance(x, (int, np.integer)) for x in s):
            return repr(s) if s else "none (a trace made without seeds)"
        return f"{s[0]}..{s[-1]}" if s == list(range(s[0], s[0] + len(s))) else repr(s)

    def _check(self, node: Any) -> int:
        if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or not 0 <= node < len(self._nodes):
            raise IndexError(f"node {node!r} is outside this tree's {len(self._nodes)} nodes")
        return int(node)

    # ---- what the views provide -----------------------------------------------------------------------------
    def show(self, **kwargs: Any):
        """The tree widget (Jupyter): branches as wide as their runs, coloured by the model's probability; pick a
        node or a split to see its runs and numbers (`decoderlab.views.tree_view.SampleTreeView`)."""
        return presenter("sample_tree_show")(self, **kwargs)

    def to_html(self, path: str | Path | None = None) -> str:
        """One self-contained page (no JavaScript): the tree drawn, where the runs part, and every run."""
        page = presenter("sample_tree_html")(self)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page


class _Walk:
    """The runs walked down a tree one token at a time, a node made wherever a run's token is new there (ids in
    order of making). `made_at` is the step record (an index into the run-by-run steps) that chose a node's token;
    `after_at` one that chose the token after it (the position whose distribution its children were drawn from)."""

    def __init__(self, row: np.ndarray, token: np.ndarray, n: int):
        self.parent, self.token, self.made_at, self.after_at = [-1], [-1], [-1], [-1]
        self.kids: list[dict[int, int]] = [{}]
        self.through: list[list[int]] = [[]]  # the runs through each node
        self.ends, self.leaf = [0], [0] * n
        starts, stops = np.searchsorted(row, np.arange(n)), np.searchsorted(row, np.arange(n), side="right")
        for r in range(n):
            cur = 0
            self.through[0].append(r)
            for i in range(starts[r], stops[r]):
                if self.after_at[cur] < 0:
                    self.after_at[cur] = i
                cur = self._child(cur, int(token[i]), i)
                self.through[cur].append(r)
            self.ends[cur] += 1
            self.leaf[r] = cur

    def _child(self, node: int, token: int, record: int) -> int:
        child = self.kids[node].get(token)
        if child is None:
            child = self.kids[node][token] = len(self.parent)
            self.parent.append(node)
            self.token.append(token)
            self.made_at.append(record)
            self.after_at.append(-1)
            self.kids.append({})
            self.through.append([])
            self.ends.append(0)
        return child


def entropy_of_counts(counts: Sequence[float]) -> float:
    """The entropy (nats) of how runs spread over branches with these counts: -sum(p log p), p = count / total."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum()) + 0.0
