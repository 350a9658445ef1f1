"""Degeneration and diversity metrics on hand-made token lists, against values computed by hand."""
from __future__ import annotations

import math

import pytest

from decoderlab.analysis.metrics import distinct_n, is_repetitive, ngrams, repeated_ngram_share, repetition, self_bleu


def test_distinct_n_by_hand():
    seq = [1, 2, 3, 1, 2, 3, 4]
    assert distinct_n(seq, 1) == pytest.approx(4 / 7)  # {1,2,3,4} of 7
    assert distinct_n(seq, 2) == pytest.approx(4 / 6)  # (1,2) (2,3) (3,1) (1,2) (2,3) (3,4): 4 unique
    assert distinct_n(seq, 3) == pytest.approx(4 / 5)  # (1,2,3) twice, (2,3,1) (3,1,2) (2,3,4)
    # pooled over runs: n-grams of different runs are counted together, none across a boundary
    assert distinct_n([[1, 2], [1, 2], [2, 1]], 2) == pytest.approx(2 / 3)
    assert math.isnan(distinct_n([5], 2))
    with pytest.raises(ValueError):
        ngrams([1, 2], 0)


def test_repetition_follows_holtzman():
    # ends in "7 8 9" three times back to back: phrase length 3 -> repetitive
    rep = repetition([1, 2, 7, 8, 9, 7, 8, 9, 7, 8, 9])
    assert rep == {"repeated_phrase": [7, 8, 9], "repeated_times": 3, "repeated_phrase_length": 3}
    # a 2-token phrase repeated 10 times is not (n < 3 and not more than 50 repeats) ...
    assert repetition([5] + [1, 2] * 10) is None
    # ... but 51 times is
    rep = repetition([5] + [1, 2] * 51)
    assert rep["repeated_phrase_length"] == 2 and rep["repeated_times"] == 51
    # a single token repeated 60 times: length 1, 60 times
    assert repetition([3] * 60)["repeated_times"] == 60
    # repetition must be at the end, back to back
    assert repetition([7, 8, 9, 7, 8, 9, 1]) is None
    assert not is_repetitive([1, 2, 3, 4, 5])
    # the phrase with most repeats wins: "4" twice (n=1) vs "3 4 5" ... here only n=3 repeats
    assert repetition([3, 4, 5, 3, 4, 5])["repeated_phrase"] == [3, 4, 5]


def test_repeated_ngram_share_by_hand():
    seq = [1, 2, 3, 4, 1, 2, 3, 4, 9]  # 4-grams: 6, of which (1,2,3,4) repeats once -> 5 unique
    assert repeated_ngram_share(seq) == pytest.approx(1 - 5 / 6)
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0.0
    assert math.isnan(repeated_ngram_share([1, 2, 3]))


def test_self_bleu_by_hand():
    # identical runs: every BLEU is 1
    assert self_bleu([[1, 2, 3, 4, 5]] * 3) == pytest.approx(1.0)
    # two runs sharing no token: NLTK's BLEU is 0 when no unigram matches (before any smoothing)
    a, b = [1, 2, 3, 4, 5], [6, 7, 8, 9, 10]
    assert self_bleu([a, b]) == 0.0
    # two unigrams and one bigram shared: p1 = 2/4, p2 = 1/3; no 3- or 4-gram: method 1 gives eps / count
    eps = 0.1  # NLTK's method1 epsilon
    c, d = [1, 2, 3, 4], [1, 2, 9, 8]
    p = [2 / 4, 1 / 3, eps / 2, eps / 1]
    expected = math.exp(sum(0.25 * math.log(x) for x in p))  # equal lengths: no brevity penalty
    assert self_bleu([c, d]) == pytest.approx(expected)
    assert math.isnan(self_bleu([a]))
