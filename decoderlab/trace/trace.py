"""`Trace`: the arrays a run recorded, and the tidy pandas frames built from them on demand.

Arrays are numpy, step-major: `arrays[name][step, row, ...]`. Frames are long format, one
observation a row, with stable column names (documented in the docs' record page). Token text is kept
exactly as decoded, so a saved trace needs no tokenizer to be read again.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..errors import AttentionDroppedError
from ..formats import escape, format_bytes
from ..record.schema import ATTENTION_COLUMNS, CANDIDATE_COLUMNS, PROCESSOR_COLUMNS, SCHEMA, STEP_COLUMNS
from . import cells
from . import files
from .lens import commit_layers, compute_lens, lens_frame, lens_stats_frame

@dataclass
class Trace:
    """One run: the prompt, the strategy as resolved, and what every step recorded."""

    prompt: str
    prompt_ids: np.ndarray  # [P]
    arrays: dict[str, np.ndarray]  # step-major arrays
    token_text: dict[int, str]  # every id that appears, as the reader should see it
    model_name: str = ""
    strategy: dict[str, Any] = field(default_factory=dict)
    processor_names: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    texts: list[str] = field(default_factory=list)  # the decoded generated text, per row
    chooser: str = "greedy"
    attention_layers: list[int] = field(default_factory=list)
    attention_heads: list[int] = field(default_factory=list)
    prefill_attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> [B, H, N, N]
    branch: int = 0
    parent: int | None = None
    fork_step: int | None = None
    lens_top_k: int = 5
    lens_object: Any = field(default=None, repr=False, compare=False)  # engine.lens.Lens, live runs only

    row_stop_reasons: list = field(default_factory=list)  # per row: "eos", or the run's stop reason
    seeds: list = field(default_factory=list)  # per row: the seed its draws came from (None: unseeded)
    row_scores: list = field(default_factory=list)  # per row: beam search's normalised score (empty otherwise)
    memory_budget: int | None = None  # Record(memory_budget=...) in bytes, as recorded (None: no limit, or unknown)
    # which (step, layer) cells of the lens arrays are computed (`trace.lens.compute_lens`); None before the first
    lens_done: np.ndarray | None = field(default=None, repr=False, compare=False)

    # ---- basic facts ---------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        ids = self.arrays.get("token_id")
        return 0 if ids is None else ids.shape[0]

    def __len__(self) -> int:
        return self.num_steps

    @property
    def rows(self) -> int:
        ids = self.arrays.get("token_id")
        return 1 if ids is None else ids.shape[1]

    @property
    def token_ids(self) -> list[int]:
        """Generated token ids of row 0 (`trace.row(i).token_ids` for another row)."""
        if not self.num_steps:
            return []
        return [int(i) for i in self.arrays["token_id"][self.alive_steps(0), 0]]

    @property
    def tokens(self) -> list[str]:
        """Generated tokens of row 0, as text."""
        return [self.token_text[i] for i in self.token_ids]

    @property
    def text(self) -> str:
        """The generated text of row 0 (special tokens skipped); `trace.texts` has every row's."""
        return self.texts[0] if self.texts else "".join(self.tokens)

    @property
    def prompt_tokens(self) -> list[str]:
        return [self.token_text[int(i)] for i in self.prompt_ids]

    def __repr__(self) -> str:
        rows = f", rows={self.rows}" if self.rows > 1 else ""
        meaning = f", logprobs={self.strategy['logprobs']!r}" if "logprobs" in self.strategy else ""  # a server's
        return (f"Trace(model={self.model_name!r}, steps={self.num_steps}{rows}, stop={self.stop_reason!r}{meaning}, "
                f"text={self.text[:60]!r}{'...' if len(self.text) > 60 else ''})")

    def _tok(self, ids: np.ndarray) -> np.ndarray:
        return cells.texts(self.token_text, ids)

    def array(self, name: str) -> np.ndarray:
        """A recorded array by its schema name (step-major: [step, row, ...]); a clear error when this
        trace's source did not record it. The public way for views to read what frames do not hold."""
        arr = self.arrays.get(name)
        if arr is None:
            raise KeyError(f"this trace has no {name!r} array (recorded: {sorted(self.arrays)})")
        return arr

    def alive_steps(self, row: int = 0) -> np.ndarray:
        """Steps at which `row` was still running (a row that finished emits padding after its EOS)."""
        if not 0 <= row < self.rows:
            raise IndexError(f"row {row} is outside this trace's {self.rows} rows")
        finished = self.arrays.get("finished")
        if finished is None:
            return np.arange(self.num_steps)
        return np.flatnonzero(~finished[:, row].astype(bool))

    def _alive(self) -> np.ndarray:
        """[S, B] bool: (step, row) pairs where the row was still running; frames hold only these."""
        finished = self.arrays.get("finished")
        if finished is None:
            return np.ones(self.arrays["token_id"].shape, dtype=bool)
        return ~finished.astype(bool)

    def _pick(self, name: str, mask: np.ndarray) -> np.ndarray | None:
        """The (step, row) entries of an array where `mask` holds, as [n, ...]; None if not recorded."""
        arr = self.arrays.get(name)
        if arr is None:
            return None
        return arr.reshape(-1, *arr.shape[2:])[mask.reshape(-1)]

    @property
    def runs(self) -> pd.DataFrame:
        """One row per row of the run: its seed, text, length (tokens, EOS included) and why it stopped."""
        n = self.rows
        alive = self._alive() if self.num_steps else np.zeros((0, n), bool)
        frame = pd.DataFrame({
            "row": np.arange(n), "seed": pd.array(cells.pad(self.seeds, n, None), dtype="Int64"),
            "text": cells.pad(self.texts, n, ""), "length": alive.sum(axis=0).astype(np.int64),
            "stop_reason": cells.pad(self.row_stop_reasons, n, self.stop_reason),
        })
        if self.row_scores:  # beam search: each returned sequence's normalised score, best first
            frame["score"] = np.array(cells.pad(self.row_scores, n, np.nan), dtype=np.float64)
        return frame

    @property
    def has_beams(self) -> bool:
        """Whether this trace is a beam search (and `beams` holds its tree)."""
        return "beam_token" in self.arrays

    @property
    def beams(self) -> pd.DataFrame:
        """Beam search's tree: one row per (step, candidate): the parent beam, the candidate it grew from at
        the step before (`origin`), the token, its logprob, the sequence's summed score, the candidate's rank
        among the step's K, its fate (continues, finished, pruned), and the returned rows whose path passes
        through it (`rows`, a tuple); a group beam search adds each candidate's `group`. `generate` keeps none of
        this; a beam tree is drawn from it."""
        if not self.has_beams:
            raise ValueError("this trace is not a beam search: run generate(..., num_beams=B) with B > 1")
        a = self.arrays
        s, k = a["beam_token"].shape
        on_path: dict[tuple[int, int], list[int]] = {}
        alive = self._alive()
        for t, r in zip(*np.nonzero(alive)):  # beam_candidate: each row's candidate at each of its steps
            on_path.setdefault((int(t), int(a["beam_candidate"][t, r])), []).append(int(r))
        fates = np.array(["continues", "finished", "pruned"], dtype=object)
        ids = a["beam_token"].reshape(-1)
        frame = pd.DataFrame({
            "step": np.repeat(np.arange(s), k), "candidate": np.tile(np.arange(k), s),
            "parent": a["beam_parent"].reshape(-1), "origin": a["beam_origin"].reshape(-1),
            "token_id": ids, "token": self._tok(ids), "logprob": a["beam_logprob"].reshape(-1).astype(np.float64),
            "score": a["beam_score"].reshape(-1).astype(np.float64), "fate": fates[a["beam_fate"].reshape(-1)],
            "rows": [tuple(on_path.get((t, c), ())) for t in range(s) for c in range(k)],
        })
        if "beam_group" in a:  # group (diverse) beam search: the group each candidate belongs to
            frame.insert(2, "group", a["beam_group"].reshape(-1))
        return frame

    def row(self, i: int) -> "Trace":
        """Row `i` as a one-row trace (every frame, plot and widget works on it)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < self.rows:
            raise IndexError(f"row {i!r} is outside this trace's {self.rows} rows")
        i = int(i)
        if self.rows == 1:  # itself, with its row's own stop reason (a batch's one-row group may have ended first)
            own = self.row_stop_reasons[0] if self.row_stop_reasons else self.stop_reason
            return self if own == self.stop_reason else replace(self, stop_reason=own)
        length = int(self._alive()[:, i].sum()) if self.num_steps else 0
        lazy_lens = "residual" in self.arrays and self.lens_object is not None
        dropped = self.attention_dropped  # attention holds the newest steps: step t at t - dropped
        arrays = {k: np.ascontiguousarray(v[:length] if _per_step(k) else
                                          v[: max(0, length - dropped), i : i + 1] if k == "attention" else
                                          v[:length, i : i + 1])
                  for k, v in self.arrays.items() if not (lazy_lens and k.startswith("lens_"))}
        strategy = dict(self.strategy)
        if i < len(self.seeds):
            strategy["seed"] = self.seeds[i]
        stop = self.row_stop_reasons[i] if i < len(self.row_stop_reasons) else self.stop_reason
        return replace(
            self, arrays=arrays, token_text=self.token_text, strategy=strategy, stop_reason=stop,
            texts=[self.texts[i]] if i < len(self.texts) else [], row_stop_reasons=[stop],
            seeds=[self.seeds[i]] if i < len(self.seeds) else [],
            row_scores=[self.row_scores[i]] if i < len(self.row_scores) else [],
            prefill_attention={k: v[i : i + 1] for k, v in self.prefill_attention.items()},
        )

    # ---- frames ----------------------------------------------------------------------------
    @cached_property
    def steps(self) -> pd.DataFrame:
        """One row per (step, row) of a running row: the chosen token, how likely it was, and how it was chosen
        (the columns of `choices`), plus `commit_layer` where the logit lens was recorded.

        `commit_layer`: the first layer from which the chosen token is the lens's top-1 and stays so to the last
        layer (NA where it is not the last layer's top-1). Computed when first read, like the lens (every layer of
        every step unembedded once); `choices` is this frame without it, at no lens cost.
        """
        frame = self.choices
        if not self.has_lens:
            return frame
        return frame.assign(commit_layer=self._commit_layer_column())

    def _commit_layer_column(self) -> pd.array:
        """`commit_layer` for each row of `choices` (nullable ints: NA where the token never settled)."""
        if not self.num_steps:
            return pd.array([], dtype="Int64")
        compute_lens(self)
        return cells.ints(commit_layers(self.arrays["lens_chosen_rank"])[self._alive()], 0)

    @cached_property
    def choices(self) -> pd.DataFrame:
        """One row per (step, row) of a running row: the chosen token, how likely it was, and how it was chosen.
        What views and comparisons read (it never computes the lens); `steps` adds the lens's `commit_layer`.

        Values a source did not record (an API gives no final distribution, say) are NA.
        """
        if not self.num_steps:
            return pd.DataFrame(columns=STEP_COLUMNS)
        mask = self._alive()
        step, row = np.nonzero(mask)
        n = len(step)
        token_id = self._pick("token_id", mask)
        forced = self._pick("forced", mask)
        forced = np.zeros(n, bool) if forced is None else forced.astype(bool)
        cols = {name: cells.floats(self._pick(name, mask), n)
                for name in ("logprob", "entropy", "final_logprob", "final_entropy")}
        ranks = {name: cells.ints(self._pick(name, mask), n) for name in ("rank", "final_rank")}
        prob, final_prob = np.exp(cols["logprob"]), np.exp(cols["final_logprob"])
        choice = np.where(forced, "forced", self.chooser)
        why = [cells.why(c, p, fp, r, fr) for c, p, fp, r, fr in
               zip(choice, prob, final_prob, ranks["rank"], ranks["final_rank"])]
        return pd.DataFrame({
            "step": step.astype(np.int64), "row": row.astype(np.int64), "branch": self.branch,
            "token_id": token_id.astype(np.int64), "token": self._tok(token_id),
            "prob": prob, "logprob": cols["logprob"], "rank": ranks["rank"], "entropy": cols["entropy"],
            "final_prob": final_prob, "final_logprob": cols["final_logprob"], "final_rank": ranks["final_rank"],
            "final_entropy": cols["final_entropy"], "forced": forced, "choice": choice, "why": why,
            "has_attention": self.has_attention & (step >= self.attention_dropped),
        })

    @cached_property
    def candidates(self) -> pd.DataFrame:
        """One row per (step, row, rank): the top-k tokens by raw logit, raw and final probabilities."""
        if not self.num_steps or "cand_id" not in self.arrays:
            return pd.DataFrame(columns=CANDIDATE_COLUMNS)
        mask = self._alive()
        step, row = np.nonzero(mask)
        ids = self._pick("cand_id", mask)  # [n, k]
        n, k = ids.shape
        chosen = ids == self._pick("token_id", mask)[:, None]
        frame = pd.DataFrame({
            "step": np.repeat(step, k).astype(np.int64), "row": np.repeat(row, k).astype(np.int64),
            "branch": self.branch, "rank": np.tile(np.arange(k), n),
            "token_id": ids.reshape(-1).astype(np.int64), "token": self._tok(ids.reshape(-1)),
            **{col: cells.floats(self._pick(name, mask), n * k) for col, name in
               (("logit", "cand_logit"), ("prob", "cand_prob"), ("final_prob", "cand_final_prob"))},
            "chosen": chosen.reshape(-1),
        })
        present = ids.reshape(-1) >= 0  # a source may give fewer alternatives at some steps
        return frame if present.all() else frame[present].reset_index(drop=True)

    @cached_property
    def processors(self) -> pd.DataFrame:
        """One row per (step, row, processor): the mass it removed and what it did to the chosen token."""
        a = self.arrays
        if not self.num_steps or "proc_mass_removed" not in a or a["proc_mass_removed"].shape[-1] == 0:
            return pd.DataFrame(columns=PROCESSOR_COLUMNS)
        mask = self._alive()
        step, row = np.nonzero(mask)
        mass = self._pick("proc_mass_removed", mask)
        n, p = mass.shape
        before = self._pick("proc_rank_before", mask).reshape(-1).astype(np.int64)
        after = self._pick("proc_rank_after", mask).reshape(-1).astype(np.int64)
        return pd.DataFrame({
            "step": np.repeat(step, p).astype(np.int64), "row": np.repeat(row, p).astype(np.int64),
            "branch": self.branch, "order": np.tile(np.arange(p), n),
            "processor": np.tile(np.array(self.processor_names, dtype=object), n),
            "mass_removed": mass.reshape(-1).astype(np.float64),
            "rank_before": before, "rank_after": after, "rank_changed": before != after,
            "prob_after": self._pick("proc_prob_after", mask).reshape(-1).astype(np.float64),
        })

    # ---- attention -------------------------------------------------------------------------
    @property
    def has_attention(self) -> bool:
        """Whether attention was recorded (`attention_dropped` says how many of the first steps lack it)."""
        return "attention" in self.arrays

    @property
    def attention_dropped(self) -> int:
        """How many of the oldest steps have no attention rows: dropped to keep the recording within
        `Record(memory_budget=...)` (the rows kept are those of the newest steps; `steps.has_attention`)."""
        att = self.arrays.get("attention")
        return 0 if att is None else self.num_steps - att.shape[0]

    def _attention_at(self, step: int) -> np.ndarray:
        """[rows, layers, heads, positions] of a step that has attention rows; a clear error for one whose rows
        were dropped."""
        dropped = self.attention_dropped
        if step < dropped:
            budget = "" if self.memory_budget is None else f"={format_bytes(self.memory_budget)}"
            raise AttentionDroppedError(
                f"step {step} has no attention rows: the rows of steps 0-{dropped - 1} were dropped to keep the "
                f"recording within Record(memory_budget{budget}); steps {dropped}-{self.num_steps - 1} have theirs "
                "(trace.steps.has_attention). Record again with a larger memory_budget (or None) to keep them all.")
        return self.arrays["attention"][step - dropped]

    def context_length(self, step: int) -> int:
        """How many positions step `step`'s query attended over (prompt + earlier tokens)."""
        return len(self.prompt_ids) + step

    def context_tokens(self, step: int, row: int = 0) -> list[str]:
        ids = list(self.prompt_ids) + [int(i) for i in self.arrays["token_id"][:step, row]]
        return [self.token_text[int(i)] for i in ids]

    def attention_weights(self, step: int, row: int = 0) -> np.ndarray:
        """[layers, heads, context] float32 for one step (layers/heads as recorded)."""
        if not self.has_attention:
            raise ValueError("this trace has no attention: record it with Record(attention=True)")
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} is outside this trace's {self.num_steps} steps")
        return self._attention_at(step)[row, :, :, : self.context_length(step)].astype(np.float32)

    def attention_frame(self, steps: Sequence[int] | None = None, layers: Sequence[int] | None = None,
                        heads: Sequence[int] | None = None, mean_over: Sequence[str] = ()) -> pd.DataFrame:
        """Attention rows as a long frame, narrowed first and optionally averaged over 'head' and/or 'layer'.

        Narrowing before building keeps memory small; the full frame is `trace.attention`. Steps whose rows
        were dropped under `Record(memory_budget=...)` are left out (asking for one by name is an
        `AttentionDroppedError`).
        """
        if not self.has_attention:
            raise ValueError("this trace has no attention: record it with Record(attention=True)")
        bad = set(mean_over) - {"head", "layer"}
        if bad:
            raise ValueError(f"mean_over takes 'head' and/or 'layer', not {sorted(bad)}")
        layer_ids = np.array(self.attention_layers)
        head_ids = np.array(self.attention_heads)
        for asked, have, what in ((layers, self.attention_layers, "layers"), (heads, self.attention_heads, "heads")):
            missing = [x for x in (asked or []) if x not in have]
            if missing:
                raise ValueError(f"{what} {missing} were not recorded; this trace has {what} {list(have)}")
        li = np.arange(len(layer_ids)) if layers is None else np.array([self.attention_layers.index(x) for x in layers])
        hi = np.arange(len(head_ids)) if heads is None else np.array([self.attention_heads.index(x) for x in heads])
        step_list = range(self.attention_dropped, self.num_steps) if steps is None else steps
        alive = self._alive()
        frames = []
        for s in step_list:
            k = self.context_length(s)
            att = self._attention_at(s)  # [B, L', H', K]
            for r in np.flatnonzero(alive[s]):
                w = att[r][li][:, hi][..., :k].astype(np.float32)  # [l, h, k]
                lv, hv = layer_ids[li], head_ids[hi]
                if "head" in mean_over:
                    w = w.mean(axis=1, keepdims=True)
                    hv = np.array([-1])
                if "layer" in mean_over:
                    w = w.mean(axis=0, keepdims=True)
                    lv = np.array([-1])
                nl, nh, _ = w.shape
                idx = pd.MultiIndex.from_product([[int(r)], lv, hv, range(k)],
                                                 names=["row", "layer", "head", "position"]).to_frame(index=False)
                idx.insert(0, "step", s)
                idx["source_token"] = np.tile(np.array(self.context_tokens(s, int(r)), dtype=object), nl * nh)
                idx["weight"] = w.reshape(-1)
                frames.append(idx)
        if not frames:
            return pd.DataFrame(columns=ATTENTION_COLUMNS)
        out = pd.concat(frames, ignore_index=True)
        out.insert(1, "branch", self.branch)
        for name in mean_over:
            out = out.drop(columns=name)
        return out

    @property
    def attention(self) -> pd.DataFrame:
        """One row per (step, row, layer, head, position): the new token's attention weight on that position."""
        return self.attention_frame()

    # ---- logit lens ------------------------------------------------------------------------
    @property
    def has_lens(self) -> bool:
        return "lens_id" in self.arrays or ("residual" in self.arrays and self.lens_object is not None)

    @property
    def lens_computed(self) -> bool:
        """Whether the lens of every step and layer is at hand (reading `lens` or `commit_layer` unembeds nothing)."""
        if "lens_id" in self.arrays and ("residual" not in self.arrays or self.lens_object is None):
            return True
        return self.lens_done is not None and bool(self.lens_done.all())

    @property
    def lens_layers(self) -> int:
        """How many layers the logit lens has (0 without a lens)."""
        for name in ("lens_id", "residual"):
            if name in self.arrays:
                return int(self.arrays[name].shape[2])
        return 0

    def lens_for(self, steps: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> pd.DataFrame:
        """The logit lens frame for some steps (and layers) only, computing just those: what `trace.lens`
        holds for them."""
        return lens_frame(self, self._alive(), steps, layers)

    def lens_stats_for(self, steps: Sequence[int] | None = None, layers: Sequence[int] | None = None) -> pd.DataFrame:
        """Per (step, row, layer): the lens entropy and the chosen token's rank and prob, for some steps (and layers)."""
        return lens_stats_frame(self, self._alive(), steps, layers)

    def with_lens(self, lens: Any) -> "Trace":
        """This run read through another lens (a tuned lens, `dl.tuned_lens`): the same residuals, every lens frame,
        plot, view and `commit_layer` computed anew through `lens`. Needs the residuals (a live trace)."""
        if "residual" not in self.arrays:
            raise ValueError("this trace keeps no residuals (a saved trace keeps the lens it computed): record it "
                             "with Record(lens=True) and read it through another lens before saving")
        return replace(self, lens_object=lens, lens_done=None,
                       arrays={k: v for k, v in self.arrays.items() if not k.startswith("lens_")})

    @cached_property
    def lens_frame(self) -> pd.DataFrame:
        """The logit lens frame (`trace.lens`)."""
        return self.lens_for(None)

    @property
    def lens(self) -> pd.DataFrame:
        """One row per (step, row, layer, rank): what that layer's residual, unembedded, would say."""
        return self.lens_frame

    @cached_property
    def lens_stats(self) -> pd.DataFrame:
        """One row per (step, row, layer): the lens distribution's entropy, and the chosen token's rank and prob."""
        return self.lens_stats_for(None)

    # ---- save / load (trace.files) -------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the whole trace to one parquet file (a row per step; metadata in the schema)."""
        return files.save(self, path)

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a trace written by `save`."""
        return files.load(path, cls)

    # ---- what rooms above this one show of a trace ----------------------------------------------
    def knobs(self, step: int, token: int | str, *, row: int = 0, lm: Any = None, grids: Any = None):
        """Which sampler knob decided: a frame of the token's chance, survival and rank at step `step` over grids of
        sampler settings, run by a run's processors over the step's raw logits (`decoderlab.analysis.knobs`)."""
        return presenter("knobs")(self, step, token, row=row, lm=lm, grids=grids)

    def what_if(self, step: int, strategies: dict[str, Any], *, row: int = 0, lm: Any = None, top: int = 20):
        """What each strategy (name -> `generate`'s words) would have done at step `step` of `row`, with no new
        generation, from the recorded logits (`Record(logits=True)`) or one forward of `lm` over the step's prefix:
        a `decoderlab.analysis.whatif.WhatIf` (`.tokens`, `.summary`, `.processors`; the docs list the columns)."""
        return presenter("what_if")(self, step, strategies, row=row, lm=lm, top=top)

    def to_html(self, path: str | Path | None = None, **options: Any) -> str:
        """One self-contained HTML page: the text coloured by probability, hover details per token; `options` as
        `decoderlab.views.html.trace_html` takes them (`knobs=[(step, token)]`, `figure=False`, ...)."""
        page = presenter("html")(self, **options)
        if path is not None:
            Path(path).write_text(page, encoding="utf-8")
        return page

    def _repr_html_(self) -> str:
        return (f"<div><b>{escape(self.model_name)}</b> · {self.num_steps} steps · stop: {escape(self.stop_reason)}"
                f"</div>" + presenter("coloured_text")(self))


# What the rooms above this one (views, analysis) provide for the methods of a trace (and of a sample tree or forks):
# the HTML pages, a notebook's repr, what-if answers, the widgets. decoderlab's front door (`decoderlab/__init__`)
# plugs them in, so that this room never imports a view; `presenter(name)` looks one up.
PRESENTERS: dict[str, Callable[..., Any]] = {}


def presenter(name: str) -> Callable[..., Any]:
    try:
        return PRESENTERS[name]
    except KeyError:
        raise RuntimeError(f"Trace: nothing provides {name!r}; import decoderlab (its front door plugs in the views)") \
            from None


def _per_step(name: str) -> bool:
    """Arrays indexed by step alone, not (step, row): the beam tree's."""
    field = SCHEMA.get(name)
    return field is not None and field.dims[1] != "row"
