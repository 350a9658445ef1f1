"""The trace schema: every array a trace may hold, declared once.

Why a table: the recorder that writes an array, the trace that reads it, the builder that makes a
trace from another source (an HTTP API gives token strings and logprobs, nothing else), and
`Trace.load` that checks a file all need to agree on names, dimensions and dtypes. Written down
here, that agreement is checked instead of assumed. Every array is step-major: its first two
dimensions are (step, row), except the beam tree's, which are (step, candidate). Only `token_id` is required; frames show NA where a source did not
record an array. `attention` may cover only the newest steps (its first dimension shorter than `token_id`'s):
a `Record(memory_budget=...)` dropped the oldest steps' rows.

A row that has finished (EOS) emits no more tokens: at its later steps `finished` is True and every
other array holds its field's `fill` value. Frames leave those (step, row) pairs out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from ..errors import SchemaError  # noqa: F401 (re-exported)

__all__ = ["Field", "SCHEMA", "SchemaError", "check_arrays", "schema_frame"]



@dataclass(frozen=True)
class Field:
    """One array of a trace: its dimensions (step and row first), dtype, and what it means."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    required: bool
    meaning: str
    recorded_by: str  # the Record option or recorder that writes it
    newest: bool = False  # may hold only the newest steps: the oldest dropped under Record(memory_budget=...)

    @property
    def fill(self) -> Any:
        """The value a finished row holds at later steps (and a source's missing entries)."""
        kind = np.dtype(self.dtype).kind
        return {"f": np.nan, "b": False}.get(kind, -1)


def _f(name: str, dims: str, dtype: str, meaning: str, by: str, required: bool = False, newest: bool = False) -> Field:
    return Field(name, tuple(dims.split()), dtype, required, meaning, by, newest)


_FIELDS = [
    _f("token_id", "step row", "int64", "the chosen token (padding after the row finished)", "choice", True),
    _f("forced", "step row", "bool", "chosen by the user (session choose), not the strategy", "choice"),
    _f("finished", "step row", "bool", "the row had already ended (EOS) before this step", "choice"),
    _f("logprob", "step row", "float32", "log p of the chosen token under the raw distribution", "choice"),
    _f("rank", "step row", "int64", "0-based rank of the chosen token by raw logit", "choice"),
    _f("entropy", "step row", "float32", "entropy (nats) of the raw distribution", "choice"),
    _f("final_logprob", "step row", "float32", "log p of the chosen token after every processor", "choice"),
    _f("final_rank", "step row", "int64", "rank of the chosen token after every processor", "choice"),
    _f("final_entropy", "step row", "float32", "entropy (nats) after every processor", "choice"),
    _f("cand_id", "step row cand", "int64", "the top-k tokens by raw logit (Record.top_k)", "candidates"),
    _f("cand_logit", "step row cand", "float32", "their raw logits", "candidates"),
    _f("cand_prob", "step row cand", "float32", "their raw probabilities", "candidates"),
    _f("cand_final_prob", "step row cand", "float32", "their probabilities after every processor", "candidates"),
    _f("proc_mass_removed", "step row processor", "float32", "probability mass each processor set to -inf",
       "processors"),
    _f("proc_rank_before", "step row processor", "int64", "chosen token's rank before each processor", "processors"),
    _f("proc_rank_after", "step row processor", "int64", "chosen token's rank after each processor", "processors"),
    _f("proc_prob_after", "step row processor", "float32", "chosen token's probability after each processor",
       "processors"),
    _f("logits", "step row vocab", "float16", "the full raw logits", "Record(logits=True)"),
    _f("attention", "step row layer head position", "float16",
       "the new token's attention over the context (zero beyond it); the newest steps only, when "
       "Record(memory_budget=...) dropped the oldest", "Record(attention=True)", newest=True),
    _f("residual", "step row layer hidden", "float32", "each layer's residual at the new position",
       "Record(lens=True)"),
    _f("lens_id", "step row layer lens_rank", "int64", "logit lens: each layer's top tokens", "Record(lens=True)"),
    _f("lens_prob", "step row layer lens_rank", "float32", "logit lens: their probabilities", "Record(lens=True)"),
    _f("lens_entropy", "step row layer", "float32", "logit lens: entropy of each layer's distribution",
       "Record(lens=True)"),
    _f("lens_chosen_rank", "step row layer", "int64", "logit lens: the chosen token's rank at each layer",
       "Record(lens=True)"),
    _f("lens_chosen_prob", "step row layer", "float32", "logit lens: the chosen token's probability at each layer",
       "Record(lens=True)"),
    _f("contrastive_id", "step row contrastive_k", "int64", "contrastive search: the top-k candidates of the "
       "processed distribution", "penalty_alpha"),
    _f("contrastive_confidence", "step row contrastive_k", "float32", "contrastive search: each candidate's "
       "probability p(v) (model confidence)", "penalty_alpha"),
    _f("contrastive_penalty", "step row contrastive_k", "float32", "contrastive search: its degeneration penalty, "
       "max cosine similarity with the context's hidden states", "penalty_alpha"),
    _f("contrastive_score", "step row contrastive_k", "float32", "contrastive search: (1 - alpha) p(v) - alpha "
       "penalty; the largest is chosen", "penalty_alpha"),
    _f("dola_layer", "step row", "int64", "DoLa: the premature layer contrasted with the final one (a hidden-states "
       "index: 0 the embeddings), the candidate furthest from it", "dola_layers"),
    _f("dola_divergence", "step row dola_candidate", "float32", "DoLa: each candidate layer's Jensen-Shannon "
       "divergence from the final distribution (transformers' formula), in dola_candidate_layers order",
       "dola_layers"),
    _f("beam_candidate", "step row", "int64", "beam search: which of the step's candidates the row's token was",
       "num_beams > 1"),
    _f("beam_parent", "step cand", "int64", "beam search: each candidate's parent beam (its row in that step's "
       "forward)", "num_beams > 1"),
    _f("beam_origin", "step cand", "int64", "beam search: the candidate of the step before that the parent beam "
       "grew from (-1 at step 0)", "num_beams > 1"),
    _f("beam_token", "step cand", "int64", "beam search: each candidate's token", "num_beams > 1"),
    _f("beam_logprob", "step cand", "float32", "beam search: its logprob after the processors", "num_beams > 1"),
    _f("beam_score", "step cand", "float32", "beam search: the summed logprob of its sequence", "num_beams > 1"),
    _f("beam_fate", "step cand", "int64", "beam search: 0 continues, 1 finished (normalised score kept), 2 pruned",
       "num_beams > 1"),
    _f("beam_group", "step cand", "int64", "group beam search: the beam group each candidate belongs to",
       "num_beam_groups > 1"),
]

SCHEMA: dict[str, Field] = {f.name: f for f in _FIELDS}


# The frames' columns, in order (`trace.steps`, `trace.candidates`, `trace.processors`, `trace.attention`).
STEP_COLUMNS = ["step", "row", "branch", "token_id", "token", "prob", "logprob", "rank", "entropy", "final_prob",
                "final_logprob", "final_rank", "final_entropy", "forced", "choice", "why", "has_attention"]
CANDIDATE_COLUMNS = ["step", "row", "branch", "rank", "token_id", "token", "logit", "prob", "final_prob", "chosen"]
PROCESSOR_COLUMNS = ["step", "row", "branch", "order", "processor", "mass_removed", "rank_before", "rank_after",
                     "rank_changed", "prob_after"]
ATTENTION_COLUMNS = ["step", "branch", "row", "layer", "head", "position", "source_token", "weight"]


def schema_frame():
    """The schema as a pandas frame (name, dims, dtype, required, recorded_by, meaning): the docs' schema table."""
    import pandas as pd

    return pd.DataFrame([{"name": f.name, "dims": ", ".join(f.dims), "dtype": f.dtype, "required": f.required,
                          "recorded_by": f.recorded_by, "meaning": f.meaning} for f in _FIELDS])


def check_arrays(arrays: Mapping[str, np.ndarray], where: str = "trace") -> None:
    """Raise `SchemaError` naming the first array that contradicts the schema.

    Arrays not in the schema (a user's own recorders) only need the shared (step, row) leading dimensions;
    a field that may hold only the newest steps (`attention`) may have fewer steps.
    """
    if "token_id" not in arrays:
        raise SchemaError(f"{where}: the required array 'token_id' is missing")
    lead = np.shape(arrays["token_id"])
    if len(lead) != 2:
        raise SchemaError(f"{where}: 'token_id' must have dimensions (step, row), got shape {lead}")
    for name, arr in arrays.items():
        shape = np.shape(arr)
        field = SCHEMA.get(name)
        if field is not None and field.dims[1] != "row":  # per step, not per row (the beam tree)
            if len(shape) != len(field.dims) or shape[0] != lead[0]:
                raise SchemaError(f"{where}: array {name!r} has shape {shape}, the schema says "
                                  f"({', '.join(field.dims)}) with {lead[0]} steps")
            if np.dtype(arr.dtype) != np.dtype(field.dtype):
                raise SchemaError(f"{where}: array {name!r} is {arr.dtype}, the schema says {field.dtype}")
            continue
        newest = field is not None and field.newest and len(shape) >= 2 and shape[1] == lead[1] and shape[0] <= lead[0]
        if tuple(shape[:2]) != tuple(lead) and not newest:
            raise SchemaError(f"{where}: array {name!r} has shape {shape}, but its (step, row) must be {lead} "
                              "like token_id's" + (" (or fewer steps: the newest)" if field and field.newest else ""))
        if field is None:
            continue
        if len(shape) != len(field.dims):
            raise SchemaError(f"{where}: array {name!r} has {len(shape)} dimensions {shape}, the schema says "
                              f"{len(field.dims)} ({', '.join(field.dims)})")
        if np.dtype(arr.dtype) != np.dtype(field.dtype):
            raise SchemaError(f"{where}: array {name!r} is {arr.dtype}, the schema says {field.dtype}")
    for group in (("cand_id", "cand_logit", "cand_prob", "cand_final_prob"),
                  ("proc_mass_removed", "proc_rank_before", "proc_rank_after", "proc_prob_after"),
                  ("lens_id", "lens_prob")):
        shapes = {n: np.shape(arrays[n]) for n in group if n in arrays}
        if len(set(shapes.values())) > 1:
            raise SchemaError(f"{where}: arrays {sorted(shapes)} must have one shape, got {shapes}")


def conform(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The arrays as numpy, each schema array in its declared dtype (a builder's inputs may be lists)."""
    out = {}
    for name, value in arrays.items():
        arr = np.asarray(value)
        field = SCHEMA.get(name)
        if field is not None and arr.dtype != np.dtype(field.dtype):
            arr = arr.astype(field.dtype)
        out[name] = arr
    return out
