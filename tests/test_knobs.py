"""trace.knobs: a recorded step's token over grids of sampler settings, equal to the processors run one by one
(`what_if`) and to hand computations from the recorded logits."""
from __future__ import annotations

import numpy as np
import pytest

import decoderlab as dl
from decoderlab.analysis.knobs import GRIDS, OFF


@pytest.fixture(scope="module")
def traced(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("Once upon a time", max_new_tokens=6, do_sample=True, top_k=20, seed=4, progress=False,
                        record=dl.Record(logits=True))
    return lm, trace


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_every_grid_point_is_what_the_processors_give(traced):
    _, trace = traced
    step, token = 3, int(trace.steps["token_id"][3])
    frame = trace.knobs(step, token)
    assert len(frame) == sum(len(v1) * max(1, len(v2)) for _, v1, _, v2 in GRIDS.values())
    for r in frame.sample(12, random_state=0).itertuples():
        words = {**OFF, r.knob_1: r.value_1, **({r.knob_2: r.value_2} if r.knob_2 else {})}
        wi = trace.what_if(step, {"x": words})
        assert r.prob == pytest.approx(float(wi.final_probs["x"][token]), abs=1e-9)
        assert r.kept == bool(wi.final_probs["x"][token] > 0)


def test_temperature_and_top_k_against_hand_computation(traced):
    _, trace = traced
    step, token = 2, int(trace.steps["token_id"][2])
    logits = trace.array("logits")[step, 0].astype(np.float32)
    frame = trace.knobs(step, token)
    tk = frame[frame["grid"] == "temperature × top_k"]
    for r in tk.itertuples():
        scaled = logits / np.float32(r.value_1)
        if r.value_2:
            cut = np.sort(scaled)[-r.value_2]
            scaled = np.where(scaled >= cut, scaled, -np.inf)
        want = _softmax(scaled.astype(np.float64))[token]
        assert r.prob == pytest.approx(want, rel=1e-4, abs=1e-7), (r.value_1, r.value_2)
        assert r.kept == bool(np.isfinite(scaled[token]))
    plain = frame[(frame["grid"] == "repetition_penalty") & (frame["value_1"] == 1.0)].iloc[0]
    assert plain["greedy"] == (int(np.argmax(logits)) == token)
    assert plain["rank"] == int((logits > logits[token]).sum())


def test_token_by_text_and_clear_errors(traced, tiny_lms):
    lm, trace = traced
    step = 1
    tid = int(trace.steps["token_id"][step])
    text = trace.steps["token"][step]
    if sum(1 for t in trace.token_text.values() if t == text) == 1:
        assert trace.knobs(step, text)["prob"].tolist() == trace.knobs(step, tid)["prob"].tolist()
    with pytest.raises(dl.analysis.WhatIfError, match="no token of this trace"):
        trace.knobs(step, "\x00never a token\x00")
    with pytest.raises(dl.analysis.WhatIfError, match="outside the vocabulary"):
        trace.knobs(step, 10**9)
    bare = lm.generate("Once upon a time", max_new_tokens=3, progress=False)
    with pytest.raises(dl.analysis.WhatIfError, match="did not record its logits"):
        bare.knobs(0, 5)
    assert len(bare.knobs(0, 5, lm=lm, grids={"t": ("temperature", (0.5, 1.0), None, ())})) == 2
