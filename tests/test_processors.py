"""The processors transformers builds for decoderlab, property-tested on random distributions (hypothesis): each
keeps what its definition says, what is kept is a distribution, greedy picks the argmax, and the recorded
`mass_removed` is the mass of the tokens the processor set to -inf."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decoderlab.engine.rules import sampling as strategy_mod
from decoderlab.engine.loop import StepContext, process
from decoderlab.record import Record, record_processors

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def logits(draw, vocab=st.integers(2, 300)):
    """Random logits [1, V], sometimes with ties (values rounded to a coarse grid) and a peaked head."""
    v = draw(vocab)
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.floats(0.1, 8.0))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, v, generator=g) * scale
    if draw(st.booleans()):  # ties
        x = torch.round(x * 2) / 2
    return x


def processors_of(lm, **words):
    return lm.strategy(4, do_sample=True, **words)


def kept(scores: torch.Tensor) -> torch.Tensor:
    return ~torch.isneginf(scores[0])


def check_distribution(scores: torch.Tensor) -> None:
    p = torch.softmax(scores, -1)[0]
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
    assert bool((p[~kept(scores)] == 0).all())


@SETTINGS
@given(x=logits(), k=st.integers(1, 50))
def test_top_k_keeps_the_k_best_and_their_ties(tiny_lms, x, k):
    strat = processors_of(tiny_lms["llama"], top_k=k, temperature=1.0, top_p=1.0)
    scores, _ = process(strat, torch.zeros(1, 4, dtype=torch.long), x, False)
    k = min(k, x.shape[-1])
    kth = torch.topk(x[0], k).values[-1]
    # transformers keeps every token scoring at least the k-th best: exactly k without a tie at the boundary
    assert torch.equal(kept(scores), x[0] >= kth)
    assert int(kept(scores).sum()) >= k
    if int((x[0] == kth).sum()) == 1:
        assert int(kept(scores).sum()) == k
    check_distribution(scores)


@SETTINGS
@given(x=logits(), p=st.floats(0.05, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(tiny_lms, x, p):
    strat = processors_of(tiny_lms["llama"], top_p=p, top_k=0, temperature=1.0)
    scores, _ = process(strat, torch.zeros(1, 4, dtype=torch.long), x, False)
    probs = torch.softmax(x[0].double(), -1)
    mask = kept(scores)
    mass = float(probs[mask].sum())
    assert mass >= p - 1e-5  # the kept set reaches p ...
    smallest = float(probs[mask].min())
    if int(mask.sum()) > 1:  # ... and is the smallest that does: without its least likely token it falls short
        assert mass - smallest < p + 1e-5
    # and it is a head of the distribution: nothing removed is likelier than something kept
    if not bool(mask.all()):
        assert float(probs[~mask].max()) <= smallest + 1e-12
    check_distribution(scores)


@SETTINGS
@given(x=logits(), m=st.floats(0.01, 1.0))
def test_min_p_keeps_exactly_the_tokens_at_or_above_min_p_times_the_max(tiny_lms, x, m):
    strat = processors_of(tiny_lms["llama"], min_p=m, top_k=0, top_p=1.0, temperature=1.0)
    scores, _ = process(strat, torch.zeros(1, 4, dtype=torch.long), x, False)
    probs = torch.softmax(x[0], -1)
    assert torch.equal(kept(scores), probs >= m * probs.max())
    check_distribution(scores)


@SETTINGS
@given(x=logits())
def test_greedy_picks_the_argmax(x):
    assert int(strategy_mod.greedy(x)[0]) == int(torch.argmax(x[0]))


@SETTINGS
@given(x=logits(), k=st.integers(1, 40), p=st.floats(0.1, 0.99), t=st.floats(0.3, 2.0))
def test_recorded_mass_removed_is_the_mass_set_to_minus_inf(tiny_lms, x, k, p, t):
    strat = processors_of(tiny_lms["llama"], top_k=k, top_p=p, temperature=t)
    ids = torch.zeros(1, 4, dtype=torch.long)
    scores, stages = process(strat, ids, x, True)
    token = torch.argmax(scores, -1)
    no = torch.zeros(1, dtype=torch.bool)
    ctx = StepContext(0, ids, x, scores, stages, token, no, no)
    got = record_processors(ctx, Record(processors=True))["proc_mass_removed"][0]
    before = [x, *stages[:-1]]
    for i, (prev, cur) in enumerate(zip(before, stages)):
        removed = torch.isneginf(cur[0]) & ~torch.isneginf(prev[0])
        by_hand = float(torch.softmax(prev[0].double(), -1)[removed].sum())
        assert float(got[i]) == pytest.approx(by_hand, abs=1e-5)
        check_distribution(cur)
    assert math.isclose(float(torch.softmax(scores, -1).sum()), 1.0, abs_tol=1e-5)
