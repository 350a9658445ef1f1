"""Where two engines part, and why: `forks(a, b, prompts)` runs the same prompts greedily on two engines and, for
each prompt, finds the first step where the greedy paths part and says what made them part.

Why: the same weights run by two engines (two dtypes, two attention kernels, compiled and eager, transformers and
a server) give the same greedy text until, at some step, they do not. Most such forks mean nothing: two tokens were
nearly tied and the engines' arithmetic tipped the choice. Some are a real difference that changes every later
token: the engines read different prompts or ran different processors. Telling them apart by eye means reading both
sides' candidates and re-running the step by hand; this does it for every prompt, in this order (docs/forks.md):
the prompts differ (chat template, tokenizer, prompt encoding); the settings differ and a processor moved a choice;
else the numbers decided: `delta`, the engines' largest difference over the tokens both list at every step up to
the fork (the forked pair left out), and the fork step re-run once in float64 on a copy of the reference model. Gaps
within `tolerance` = 2 × max(delta, the reference's own difference from float64) are a near-tie; wider, a real
difference in the logits.

Runs of two local models with one vocabulary compare token ids, others token texts; an engine that stopped at EOS
counts as the token `END` there (a server returns no EOS token).
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..backends.local import DEFAULT_SYSTEM, LM
from ..errors import DecoderlabError
from ..record import Record
from ..trace import Trace, presenter

__all__ = ["forks", "Forks", "Engine", "ForksError", "COLUMNS", "SIDE_COLUMNS", "END"]

END = "⟨end⟩"
COLUMNS = ["prompt", "forked", "fork_step", "common_prefix", "token_a", "token_b", "logprob_a", "logprob_b",
           "other_logprob_a", "other_logprob_b", "gap_a", "gap_b", "delta", "tolerance", "kind", "why", "scores",
           "float64_token", "float64_gap", "float64_pair_gap", "length_a", "length_b"]
SIDE_COLUMNS = ["token", "rank_a", "logprob_a", "rank_b", "logprob_b", "rank_float64", "logprob_float64", "chosen_a",
                "chosen_b", "float64_pick"]
SET_BY_FORKS = ("seed", "seeds", "max_new_tokens", "record", "progress", "on_token", "stream_row", "stream")
NOT_SETTINGS = {"do_sample", "max_new_tokens", "seed", "chooser", "processors", "eos_token_id", "pad_token_id",
                "server", "base_url", "endpoint", "logprobs", "entropy", "top_logprobs", "request", "token_ids"}
NEUTRAL = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
           "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0}


class ForksError(DecoderlabError, ValueError):
    """Engines or settings `forks` cannot compare: not a decoderlab backend, words that are not greedy decoding
    token by token, a reference that is not a local model, or no prompt."""


@dataclass(frozen=True)
class Engine:
    """One side of a comparison: a backend (`dl.load`/`dl.LM`, or `dl.connect`) and the `generate` words it runs
    with. `Engine(lm, {"compile": True})` is the same model compiled; `{"chat": True}` or `{"system": ...}` set how
    it reads the prompt; `name` labels it (default: the model, its dtype and attention, and the words)."""

    backend: Any
    words: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    @property
    def local(self) -> bool:
        return isinstance(self.backend, LM)

    def label(self) -> str:
        words, m = "".join(f" · {k}={v!r}" for k, v in self.words.items()), getattr(self.backend, "model", None)
        how = f" · {str(m.dtype).replace('torch.', '')} · {m.config._attn_implementation}" if self.local else ""
        return self.name or f"{getattr(self.backend, 'name', type(self.backend).__name__)}{how}{words}"

    def generate_words(self) -> dict[str, Any]:
        """The words for `generate`, less how the prompt is read (chat, system)."""
        return {k: v for k, v in self.words.items() if k not in ("chat", "system")}


def as_engine(x: Any, side: str) -> Engine:
    """An `Engine` from what a user passes (an Engine, a backend, or `(backend, words)`), its words checked."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Mapping):
        x = Engine(x[0], dict(x[1]))
    elif not isinstance(x, Engine):
        x = Engine(x)
    if isinstance(x.backend, type) or not hasattr(x.backend, "generate"):
        raise ForksError(f"engine {side} is a {type(x.backend).__name__}, not a decoderlab model or backend: pass "
                         "dl.load(...), dl.connect(...), (backend, {generate's words}) or Engine(backend, words)")
    words = dict(x.words)
    if taken := sorted(set(words) & set(SET_BY_FORKS)):
        raise ForksError(f"engine {side}: {', '.join(taken)} is set by forks() for both engines "
                         "(max_new_tokens= is an argument of forks itself)")
    if words.get("do_sample"):
        raise ForksError(f"engine {side}: do_sample=True; forks() compares greedy paths (a sampled fork is the "
                         "draw's, not the engines'): drop do_sample")
    rest = {k: v for k, v in words.items() if k not in ("chat", "system", "compile")}
    if x.local:
        resolved = x.backend.strategy(1, max_new_tokens=1, do_sample=False, **rest)  # a bad word: StrategyError
        if resolved.num_beams > 1 or not resolved.rule.by_processors:
            raise ForksError(f"engine {side}: {resolved.rule.name} decoding; forks() compares greedy decoding "
                             "token by token (processors, then the argmax): drop the search words")
    elif hasattr(x.backend, "request_words"):
        x.backend.request_words({**rest, "do_sample": False}, None, 1)  # a word the server lacks: StrategyError
    return Engine(x.backend, words, x.name)


# ---- one prompt -------------------------------------------------------------------------------------------------
def _keys(trace: Trace, engine: Engine, by_id: bool) -> list:
    """The path as compared: ids or texts, the EOS an engine stopped at as END."""
    keys: list = list(trace.token_ids) if by_id else list(trace.tokens)
    if trace.stop_reason == "eos":  # a local run's last token is its EOS; a server returns none
        keys = keys[:-1] + [END] if engine.local else keys + [END]
    return keys


def _scores(trace: Trace, last: int, by_id: bool, final: bool) -> pd.DataFrame:
    """(step, key, token_id, lp): each step's top-k up to `last`, raw or after the processors; one entry per key
    (the likelier), most likely first."""
    c = trace.candidates
    c = c[(c["row"] == 0) & (c["step"] <= last)]
    p = c["final_prob"] if final and c["final_prob"].notna().all() else c["prob"]
    with np.errstate(divide="ignore"):
        lp = np.log(p.to_numpy(np.float64))
    out = pd.DataFrame({"step": c["step"].to_numpy(), "key": (c["token_id"] if by_id else c["token"]).to_numpy(),
                        "token_id": c["token_id"].to_numpy(), "lp": lp})
    out = out.sort_values(["step", "lp"], ascending=[True, False], kind="stable")
    return out.drop_duplicates(["step", "key"]).reset_index(drop=True)


def _delta(sa: pd.DataFrame, sb: pd.DataFrame, fork: int | None = None, pair: tuple = ()) -> float:
    """The largest |lp_a - lp_b| over the tokens both list, at every step (at the fork, the forked pair left out)."""
    m = sa.merge(sb, on=["step", "key"], suffixes=("_a", "_b"))
    if fork is not None:
        m = m[~((m["step"] == fork) & m["key"].isin(list(pair)))]
    d = (m["lp_a"] - m["lp_b"]).abs().to_numpy()
    d = d[np.isfinite(d)]
    return float(d.max()) if len(d) else math.nan


def _settings(trace: Trace) -> dict[str, Any]:
    """The words and processors that act on a greedy choice (those at a neutral value left out)."""
    out = {k: v for k, v in trace.strategy.items()
           if k not in NOT_SETTINGS and v is not None and v is not False and v != [] and NEUTRAL.get(k, object()) != v}
    if trace.processor_names:
        out["processors"] = tuple(trace.processor_names)
    return out


@dataclass
class _Side:
    """One engine at the fork step: the key its token's numbers are under (END where a server stopped), its text
    and logprob, its top-k (logprob by key, most likely first) and each key's id in its own vocabulary."""

    look: Any
    token: str
    logprob: float
    top: pd.Series
    ids: dict


def _side(trace: Trace, step: int, scores: pd.DataFrame, final: bool, by_id: bool) -> _Side:
    at = scores[scores["step"] == step]
    top, ids = pd.Series(at["lp"].to_numpy(), index=at["key"].to_numpy()), dict(zip(at["key"], at["token_id"]))
    if step >= trace.num_steps:  # a server that stopped here says nothing of the step
        return _Side(END, END, math.nan, top, ids)
    ch = trace.choices.iloc[step]
    look = int(ch["token_id"]) if by_id else str(ch["token"])
    ids.setdefault(look, int(ch["token_id"]))
    return _Side(look, str(ch["token"]), float(ch["final_logprob"] if final and not pd.isna(ch["final_logprob"])
                                              else ch["logprob"]), top, ids)


def _rank(trace: Trace, step: int) -> float:
    """The raw rank of the token chosen at `step` (NaN where unknown)."""
    r = trace.choices["rank"].iloc[step] if step < trace.num_steps else None
    return math.nan if r is None or pd.isna(r) else float(r)


def _top2(top: pd.Series) -> float:
    return float(top.iloc[0] - top.iloc[1]) if len(top) > 1 else math.nan  # `top` is most likely first


def _num(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3g}"


def _eos_key(trace: Trace, by_id: bool) -> Any:
    """The key of a run's (first) EOS token: where the other engine's END is looked up."""
    eos = trace.strategy.get("eos_token_id")
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return eos if by_id or eos is None else trace.token_text.get(int(eos), END)


class _Pair:
    """One prompt's two runs: where they part and what made them part (a row of the frame, the fork side by side)."""

    def __init__(self, run: "_Run", prompt: Any, ta: Trace, tb: Trace):
        self.run, self.prompt, self.traces = run, prompt, (ta, tb)
        self.keys = tuple(_keys(t, e, run.by_id) for t, e in zip(self.traces, run.engines))
        n = min(map(len, self.keys))
        self.fork = next((i for i in range(n) if self.keys[0][i] != self.keys[1][i]), None)
        self.row: dict[str, Any] = dict.fromkeys(COLUMNS, math.nan)
        shown = prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
        self.row.update(prompt=shown, forked=self.fork is not None, fork_step=self.fork, token_a=None,
                        token_b=None, float64_token=None, length_a=ta.num_steps, length_b=tb.num_steps,
                        common_prefix=n if self.fork is None else self.fork, scores="raw")
        self.side_by_side = pd.DataFrame(columns=SIDE_COLUMNS)
        if self.fork is None:
            self.row.update(kind="same", why=f"the two runs agree on all {n} steps they both took",
                            delta=_delta(*(_scores(t, n - 1, run.by_id, False) for t in self.traces)))
        else:
            self._classify()

    def _classify(self) -> None:
        run, k, row, (ta, tb) = self.run, self.fork, self.row, self.traces
        sa, sb = _settings(ta), _settings(tb)
        differ = sorted(w for w in set(sa) | set(sb) if sa.get(w) != sb.get(w))
        shown = lambda v: "–" if v is None else " → ".join(v) if isinstance(v, tuple) else repr(v)  # noqa: E731
        listed = "; ".join(f"{w}: {shown(sa.get(w))} vs {shown(sb.get(w))}" for w in differ)
        ranks = [_rank(t, k) for t in self.traces]
        moved = [not math.isnan(r) and r != 0 for r in ranks]
        final = not differ and any(moved)  # the same processors moved a choice: compare what they left
        sc = [_scores(t, k, run.by_id, final) for t in self.traces]
        a, b = self.sides = tuple(_side(t, k, s, final, run.by_id) for t, s in zip(self.traces, sc))
        seen = [s.look if s.look != END else _eos_key(t, run.by_id) for s, t in ((b, ta), (a, tb))]  # b's, a's
        row.update(token_a=a.token, token_b=b.token, logprob_a=a.logprob, logprob_b=b.logprob, gap_a=_top2(a.top),
                   other_logprob_a=float(a.top.get(seen[0], math.nan)), gap_b=_top2(b.top),
                   other_logprob_b=float(b.top.get(seen[1], math.nan)), scores="after processors" if final else "raw",
                   delta=_delta(sc[0], sc[1], k, (a.look, b.look, *seen)))
        f64 = self._float64(final) if run.float64 else None
        prompt = _prompt_difference(self)
        if prompt is not None:
            row.update(kind=f"real difference: {prompt[0]}", why=prompt[1])
        elif differ and any(moved):
            i = 0 if moved[0] else 1
            row.update(kind="real difference: strategy settings",
                       why=f"engine {'ab'[i]}'s processors chose {self.sides[i].token!r} (raw rank {int(ranks[i])}) "
                           f"over the model's top token; the settings differ ({listed})")
        else:
            self._numeric(f64, "" if not differ else f" (the settings differ, {listed}, but did not "
                                                      "move this choice)")
        self.side_by_side = self._side_frame(f64)

    def _numeric(self, f64: dict | None, note: str) -> None:
        """Near-tie or not: each engine's gap between the two tokens, and float64's, against the tolerance."""
        row, (a, b) = self.row, self.sides
        found = [x for x in (row["delta"], f64["eps"] if f64 else math.nan) if not math.isnan(x)]
        tol = row["tolerance"] = 2 * max(found) if found else math.nan
        gaps = {"a": a.logprob - row["other_logprob_a"], "b": b.logprob - row["other_logprob_b"],
                "float64": abs(f64["pair"]) if f64 else math.nan}
        known = {w: g for w, g in gaps.items() if not math.isnan(g)}
        near = bool(known) and all(g <= tol for g in known.values())
        apart = ", ".join(f"{_num(g)} ({w})" for w, g in known.items()) or "an unknown number of"
        why = (f"{a.token!r} and {b.token!r} are {apart} nats apart; the engines differ by up to {_num(row['delta'])} "
               f"nats elsewhere, tolerance {_num(tol)}")
        row.update(kind=("near-tie" if f64 else "near-tie (unconfirmed)") if near else "real difference: logits",
                   why=why + (f"; float64 picks {f64['token']!r}" if f64 else "; not re-run in float64") + note)

    def _ref_id(self, key: Any) -> int | None:
        """A key as an id of the reference model (END, where the other engine stopped: its EOS)."""
        run, r = self.run, self.run.reference
        tr, mine = self.traces[r], self.sides[r]
        if key == mine.look and self.fork < tr.num_steps:
            return int(tr.token_ids[self.fork])
        if key == END or run.by_id:
            return _eos_key(tr, True) if key == END else int(key)
        if key in mine.ids:
            return int(mine.ids[key])
        ids = run.engines[r].backend.tokenizer(key, add_special_tokens=False).input_ids
        return int(ids[0]) if len(ids) == 1 and run.engines[r].backend.token_text(ids[0]) == key else None

    def _float64(self, final: bool) -> dict:
        """The fork step re-run on the reference in float64: its pick and top-2 gap, the pair's gap (a's token minus
        b's), and the reference's own largest difference from it (the pair left out)."""
        run, r = self.run, self.run.reference
        tr, engine, (a, b) = self.traces[r], run.engines[r], self.sides
        strategy = None
        if final:  # the same processors, run over the float64 logits
            words = {k: v for k, v in engine.generate_words().items() if k != "compile"}
            strategy = engine.backend.strategy(len(tr.prompt_ids), max_new_tokens=run.max_new_tokens, do_sample=False,
                                               **words)
        lp = run.logprobs64([int(i) for i in tr.prompt_ids] + tr.token_ids[: self.fork], strategy)
        ia, ib = self._ref_id(a.look), self._ref_id(b.look)
        top = torch.topk(lp, 2)
        mine = self.sides[r]
        listed = [(int(mine.ids[key]), v) for key, v in mine.top.items() if mine.ids.get(key) not in (ia, ib, None)]
        eps = max((abs(v - float(lp[i])) for i, v in listed if math.isfinite(v)), default=math.nan)
        pair = float(lp[ia] - lp[ib]) if ia is not None and ib is not None else math.nan
        token = engine.backend.token_text(int(top.indices[0]))
        self.row.update(float64_token=token, float64_gap=float(top.values[0] - top.values[1]), float64_pair_gap=pair)
        return {"lp": lp, "pick": int(top.indices[0]), "token": token, "pair": pair, "eps": eps}

    def _side_frame(self, f64: dict | None, n: int = 12) -> pd.DataFrame:
        """One row per token worth showing at the fork: the pair, each engine's top n and float64's top n."""
        (a, b), run = self.sides, self.run
        lm = run.engines[run.reference].backend
        top64 = torch.topk(f64["lp"], n).indices.tolist() if f64 else []
        ref = {(i if run.by_id else lm.token_text(i)): i for i in top64}  # key -> the reference's id
        keys = list(dict.fromkeys([a.look, b.look, *a.top.index[:n], *b.top.index[:n], *ref]))
        text = {**{k: lm.token_text(i) for k, i in ref.items()}, a.look: a.token, b.look: b.token}
        for k in keys:
            text.setdefault(k, next((t.token_text[k] for t in self.traces if k in t.token_text), str(k))
                            if run.by_id else k)
            if f64 and k not in ref:
                ref[k] = self._ref_id(k)
        lp64 = {k: float(f64["lp"][ref[k]]) if f64 and ref.get(k) is not None else math.nan for k in keys}
        order = [k for k in sorted(keys, key=lambda k: -lp64[k]) if not math.isnan(lp64[k])]
        ranks = [{k: i for i, k in enumerate(s.top.index)} for s in (a, b)] + [{k: i for i, k in enumerate(order)}]
        rank = lambda i: pd.array([ranks[i].get(k) for k in keys], dtype="Int64")  # noqa: E731
        lp = lambda s: [float(s.top.get(k, math.nan)) for k in keys]  # noqa: E731
        frame = pd.DataFrame({
            "token": [text[k] for k in keys], "rank_a": rank(0), "logprob_a": lp(a), "rank_b": rank(1),
            "logprob_b": lp(b), "rank_float64": rank(2), "logprob_float64": [lp64[k] for k in keys],
            "chosen_a": [k == a.look for k in keys], "chosen_b": [k == b.look for k in keys],
            "float64_pick": [bool(f64) and ref.get(k) == f64["pick"] for k in keys]})
        by = ["logprob_float64", "logprob_a", "logprob_b"] if f64 else ["logprob_a", "logprob_b"]
        return frame.sort_values(by, ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def _reads(engine: Engine, prompt: Any, chat: bool, system: str | None) -> tuple[bool, str | None]:
    """(through the chat template, with which system message) as the engine reads `prompt`."""
    if not isinstance(prompt, str):
        return True, None  # chat messages carry their own
    on = bool(engine.words.get("chat", chat))
    return on, (engine.words.get("system", system) if on else None)


def _prompt_read(engine: Engine, trace: Trace, prompt: Any, on: bool) -> tuple[str | None, list[int] | None]:
    """The prompt text and ids the engine read, where a client can know them (a server's chat template: not)."""
    if engine.local:
        return trace.prompt, [int(i) for i in trace.prompt_ids]
    ids = None if on or getattr(engine.backend, "tokenize", None) is None else engine.backend.tokenize(prompt)
    return (None, None) if ids is None else (prompt, list(engine.backend.special_prefix()) + list(ids))


def _prompt_difference(pair: _Pair) -> tuple[str, str] | None:
    """(what, why) where the engines read different prompts, else None."""
    run = pair.run
    (ca, sa), (cb, sb) = (_reads(e, pair.prompt, run.chat, run.system) for e in run.engines)
    how = lambda on: "through its chat template" if on else "as plain text"  # noqa: E731
    if ca != cb:
        return "chat template", f"engine a reads the prompt {how(ca)}, engine b {how(cb)}"
    if ca and sa != sb:
        return "chat template", f"the system messages differ: {sa!r} vs {sb!r}"
    (xa, ia), (xb, ib) = (_prompt_read(e, t, pair.prompt, ca) for e, t in zip(run.engines, pair.traces))
    if xa is not None and xb is not None and xa != xb:
        return "chat template", (f"the chat templates give different prompt texts ({len(xa)} vs {len(xb)} characters,"
                                 f" first difference at character {_first(xa, xb)})")
    if ia is None or ib is None or ia == ib:
        return None
    special = {i for e in run.engines if e.local for i in e.backend.tokenizer.all_special_ids}
    if [i for i in ia if i not in special] == [i for i in ib if i not in special]:
        return "prompt encoding", (f"the prompt reads as the same tokens with different special tokens ({len(ia)} vs "
                                   f"{len(ib)} ids, starting {ia[:3]} vs {ib[:3]})")
    return "tokenizer", (f"the same prompt text reads as different ids ({len(ia)} vs {len(ib)} tokens, first "
                         f"difference at token {_first(ia, ib)})")


def _first(x: Sequence, y: Sequence) -> int:
    return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))


class _Run:
    """What every prompt's comparison shares: the engines, their names, whether ids compare, how prompts are read,
    and the reference model, cast to float64 on a copy (the user's model stays as it is) at the first fork, with
    eager attention where the model can switch (so that every product is a float64 one)."""

    def __init__(self, engines: tuple[Engine, Engine], chat: bool, system: str | None, max_new_tokens: int,
                 reference: int, float64: bool):
        (ea, eb), (na, nb) = engines, (e.label() for e in engines)
        self.engines, self.names = engines, ((f"{na} (a)", f"{nb} (b)") if na == nb else (na, nb))
        self.by_id = ea.local and eb.local and (ea.backend.tokenizer is eb.backend.tokenizer or
                                                ea.backend.tokenizer.get_vocab() == eb.backend.tokenizer.get_vocab())
        self.chat, self.system, self.max_new_tokens, self.reference = chat, system, max_new_tokens, reference
        self.float64, self._model64 = float64, None

    @torch.inference_mode()
    def logprobs64(self, ids: list[int], strategy: Any = None) -> torch.Tensor:
        """log-softmax [V] (float64, on the CPU) of the token after `ids`, after `strategy`'s processors if given."""
        lm = self.engines[self.reference].backend
        if self._model64 is None:
            self._model64 = copy.deepcopy(lm.model).to(torch.float64)
            try:
                self._model64.set_attn_implementation("eager")
            except Exception:  # noqa: BLE001 - a model that cannot switch keeps its own kernel, in float64
                pass
        x = torch.as_tensor([ids], dtype=torch.long, device=lm.device)
        scores = self._model64(input_ids=x, use_cache=False, logits_to_keep=1).logits[:, -1].to(torch.float64)
        return torch.log_softmax((scores if strategy is None else strategy.processors(x, scores))[0], dim=-1).cpu()


# ---- the result -------------------------------------------------------------------------------------------------
class Forks:
    """Two engines over the same prompts: where their greedy paths part and why (`frame`), both traces of each
    prompt (`traces`), and the fork step side by side (`side_by_side`). `show()` and `to_html()` draw it."""

    def __init__(self, pairs: list[_Pair], run: _Run, interrupted: bool = False):
        self._pairs, self.engines, self.names, self.prompts = pairs, run.engines, run.names, [p.prompt for p in pairs]
        self.reference = "ab"[run.reference] if run.engines[run.reference].local else None  # the float64 re-run's
        self.interrupted = interrupted  # stopped by Ctrl-C: the prompts compared before it
        self.frame = pd.DataFrame([p.row for p in pairs], columns=COLUMNS).astype(
            {"forked": bool, "fork_step": "Int64", "common_prefix": "int64", "length_a": "int64", "length_b": "int64"})

    def __len__(self) -> int:
        return len(self._pairs)

    def index(self, prompt: int | str) -> int:
        """A prompt's row: its position (negative from the end), or its text."""
        shown = list(self.frame["prompt"])
        if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool) and -len(self) <= prompt < len(self):
            return int(prompt) % len(self)
        if isinstance(prompt, str) and prompt in shown:
            return shown.index(prompt)
        raise KeyError(f"prompt {prompt!r}: give a position (0..{len(self) - 1}) or one of the prompts {shown}")

    def traces(self, prompt: int | str = 0) -> tuple[Trace, Trace]:
        """Engine a's and engine b's trace of a prompt (by position or text)."""
        return self._pairs[self.index(prompt)].traces

    def side_by_side(self, prompt: int | str = 0) -> pd.DataFrame:
        """A prompt's fork step, one row per token worth showing (the forked pair, each engine's top 12 and
        float64's), most likely in float64 first: each engine's rank and logprob (the numbers `scores` names),
        float64's, the token each engine chose, and float64's pick. Empty where the runs did not part."""
        return self._pairs[self.index(prompt)].side_by_side

    def show(self, **kwargs: Any):
        """The forks widget (Jupyter): pick a prompt, see its fork step side by side
        (`decoderlab.views.forks_view.ForksView`)."""
        return presenter("forks_show")(self, **kwargs)

    def to_html(self, path: str | Path | None = None) -> str:
        """One self-contained page (no JavaScript): every prompt's fork, its kind and its step side by side."""
        page = presenter("forks_html")(self)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def __repr__(self) -> str:
        kinds = self.frame["kind"].value_counts().to_dict()
        return (f"Forks({self.names[0]!r} vs {self.names[1]!r}, {len(self)} prompts, {kinds}"
                f"{', interrupted' if self.interrupted else ''})")


def forks(a: Any, b: Any, prompts: str | Sequence[Any], *, chat: bool = False, system: str | None = DEFAULT_SYSTEM,
          max_new_tokens: int = 32, top_k: int = 20, float64: bool = True, reference: str | None = None,
          progress: bool | None = None) -> Forks:
    """Run `prompts` greedily on engines `a` and `b`; for each prompt, where the paths part and why.

    `a`, `b`: a model (`dl.load`), a server (`dl.connect`), `(backend, words)` or `Engine(backend, words)`, with
    `generate`'s words (`{"compile": True}`, `{"chat": True}`, `{"repetition_penalty": 1.3}`). `chat` and `system`
    apply to both engines unless an engine's words say otherwise. `top_k` candidates are recorded per step (a
    server's limit applies). `float64=True` re-runs each fork step once on the reference model cast to float64 (a
    copy: eight bytes per parameter); `reference` is "a" or "b" (default: the local engine of the widest dtype).
    A prompt is a string or a list of chat messages. Ctrl-C returns the prompts compared so far.
    """
    ea, eb = as_engine(a, "a"), as_engine(b, "b")
    one = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict))
    prompts = [prompts] if one else list(prompts)
    if not prompts:
        raise ForksError("forks() needs at least one prompt")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ForksError(f"max_new_tokens={max_new_tokens!r}: must be a whole number >= 1")
    local = [i for i, e in enumerate((ea, eb)) if e.local]
    if reference is not None and (reference not in ("a", "b") or "ab".index(reference) not in local):
        raise ForksError(f"reference={reference!r}: must name a local engine ('a' or 'b'; local here: "
                         f"{', '.join('ab'[i] for i in local) or 'none'})")
    if not local and float64:
        raise ForksError("neither engine is a local model, so no fork step can be re-run in float64: pass "
                         "float64=False (near-ties are then unconfirmed)")
    ref = "ab".index(reference) if reference else max(
        local, key=lambda i: ((ea, eb)[i].backend.model.dtype.itemsize, -i), default=0)
    run = _Run((ea, eb), chat, system, max_new_tokens, ref, float64)
    record = Record(top_k=top_k)
    from tqdm.auto import tqdm

    pairs: list[_Pair] = []
    bar = tqdm(prompts, desc="forks", unit="prompt", leave=False, file=sys.stderr, disable=progress is False,
               delay=0 if progress else 1.0)
    try:
        for prompt in bar:
            traces = []
            for engine in (ea, eb):
                on, own = _reads(engine, prompt, chat, system)
                t = engine.backend.generate(prompt, chat=on, system=own if on else system, record=record,
                                            progress=False, max_new_tokens=max_new_tokens, do_sample=False,
                                            **engine.generate_words())
                traces.append(t.row(0) if t.rows > 1 else t)
            pairs.append(_Pair(run, prompt, *traces))
    except KeyboardInterrupt:
        return Forks(pairs, run, interrupted=True)
    finally:
        bar.close()
    return Forks(pairs, run)
