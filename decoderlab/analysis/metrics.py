"""Degeneration and diversity metrics of generated token sequences, as their sources define them.

Why a module of its own: comparing decoding strategies (greedy, beams, top-k, nucleus, ...) is about
how their outputs degenerate and how much they vary, and those numbers are only comparable with the
literature if they are computed the way the papers computed them. Each function takes plain lists of
token ids (no trace, no model) and says whose definition it follows.

- `distinct_n`: unique n-grams / all n-grams (Li et al. 2016), of one sequence or pooled over several.
- `repetition`: Holtzman et al. 2019's test (ari-holtzman/degen, metrics/repetition.py): a generation is
  repetitive if it ends in a phrase of n tokens repeated back to back, with n >= 3, or repeated more
  than 50 times (n < 90).
- `repeated_ngram_share`: the share of a sequence's n-grams (4 by default) that repeat an earlier one.
- `self_bleu`: Zhu et al. 2018's Self-BLEU as degen computes it (metrics/self_bleu.py): each run's
  sentence BLEU against all the others as references, with uniform weights up to n (4) and NLTK's
  smoothing method 1, averaged over the runs.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["ngrams", "distinct_n", "repetition", "is_repetitive", "repeated_ngram_share", "self_bleu"]

MAX_PHRASE = 90  # degen's max_n: the longest repeated phrase looked for


def ngrams(tokens: Sequence[int], n: int) -> list[tuple]:
    """The n-grams of a sequence, in order."""
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    tokens = list(tokens)
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(sequences: Sequence[int] | Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / all n-grams, pooled over `sequences` (or of one sequence); NaN with no n-gram."""
    seqs = [sequences] if not sequences or isinstance(sequences[0], int) else sequences
    grams = [g for s in seqs for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def repetition(tokens: Sequence[int], max_n: int = MAX_PHRASE) -> dict | None:
    """Holtzman et al.'s repetition: the repeated phrase at the end of `tokens`, how often it repeats back to back,
    and its length; None if the generation is not repetitive (degen's metrics/repetition.py, line for line)."""
    rev = list(reversed(list(tokens)))
    last_n_repeats = [0] * max_n
    for n in range(1, max_n + 1):
        n_repeat = 1
        while len(rev[n * n_repeat : n * (n_repeat + 1)]) == n and rev[n * n_repeat : n * (n_repeat + 1)] == rev[:n]:
            n_repeat += 1
        last_n_repeats[n - 1] = n_repeat
    best = max(range(max_n), key=lambda x: last_n_repeats[x])
    if last_n_repeats[best] > 1 and (best + 1 >= 3 or last_n_repeats[best] > 50):
        return {"repeated_phrase": list(reversed(rev[: best + 1])), "repeated_times": last_n_repeats[best],
                "repeated_phrase_length": best + 1}
    return None


def is_repetitive(tokens: Sequence[int]) -> bool:
    """Whether `repetition` finds the generation repetitive."""
    return repetition(tokens) is not None


def repeated_ngram_share(tokens: Sequence[int], n: int = 4) -> float:
    """The share of the sequence's n-grams that repeat an earlier n-gram of it: 1 - distinct-n; NaN if too short."""
    d = distinct_n(list(tokens), n)
    return 1.0 - d if d == d else float("nan")


def self_bleu(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Self-BLEU-n: each sequence's BLEU against all the others (uniform weights up to n, NLTK smoothing method 1),
    averaged; NaN with fewer than two sequences. Higher means the runs resemble each other more."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    seqs = [list(s) for s in sequences]
    if len(seqs) < 2:
        return float("nan")
    weights = tuple([1.0 / n] * n)
    smooth = SmoothingFunction().method1
    scores = [sentence_bleu(references=seqs[:i] + seqs[i + 1 :], hypothesis=seqs[i], weights=weights,
                            smoothing_function=smooth) for i in range(len(seqs))]
    return sum(scores) / len(scores)
