"""How a frame's cells are written: NaN or NA where a source recorded nothing (a server gives no final
probabilities, a beam has no rank), and in words why each token was chosen.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..formats import format_prob, format_rank


def floats(values: np.ndarray | None, n: int) -> np.ndarray:
    """float64 values, or NaN where a source did not record them."""
    return np.full(n, np.nan) if values is None else values.reshape(-1).astype(np.float64)


def ints(values: np.ndarray | None, n: int):
    """int64 values; a nullable Int64 array when some (or all) were not recorded (stored as -1)."""
    if values is None:
        return pd.array([pd.NA] * n, dtype="Int64")
    values = values.reshape(-1).astype(np.int64)
    if (values < 0).any():
        return pd.arrays.IntegerArray(values, values < 0)
    return values


def texts(lookup: dict[int, str], ids: np.ndarray) -> np.ndarray:
    """Token ids as their text (object array of the same shape); an id the trace has no text for as '<id>'."""
    flat = [lookup.get(int(i), f"<{int(i)}>") for i in np.asarray(ids).ravel()]
    return np.array(flat, dtype=object).reshape(np.shape(ids))


def pad(values: Sequence, n: int, fill: Any) -> list:
    return list(values)[:n] + [fill] * (n - len(values))


def why(choice: str, prob: float, final_prob: float, rank: Any, final_rank: Any) -> str:
    """How the token was chosen, in words (a number a source did not record shows as '–')."""
    prob, final_prob, rank, final_rank = format_prob(prob), format_prob(final_prob), format_rank(rank), format_rank(final_rank)
    if choice == "forced":
        return f"forced by the user; the model gave it p={prob} (rank {rank})"
    if choice == "greedy":
        return f"highest final score (p={final_prob}; raw rank {rank})"
    if choice == "given":
        return f"the given text's token; the model gave it p={prob} (rank {rank})"
    if choice == "sample":
        return f"drawn at p={final_prob} from the final distribution (final rank {final_rank})"
    return f"chosen by {choice} (p={final_prob if final_prob != '–' else prob}, rank {rank})"
