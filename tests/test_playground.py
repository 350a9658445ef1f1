"""The sampler playground (`dl.playground`), driven from Python: every slider reshapes the step's distribution as
computed by hand, the panels say what the numbers are, and the model-forward source equals the recorded one.

Why without a browser: setting a slider's value runs exactly what a move in Jupyter runs (see test_widgets.py).
"""
from __future__ import annotations

import dataclasses

import ipywidgets as W
import numpy as np
import pytest

import decoderlab as dl
from decoderlab.views import playground as pv
from decoderlab.analysis import whatif
from decoderlab.analysis.whatif import WhatIfError
from test_panels import dom, widths
from test_whatif import VOCAB, hand_made, keep_min_p, keep_top_k, keep_top_p, keep_typical, logits_at, softmax


def all_widgets(widget: W.Widget) -> list[W.Widget]:
    return [widget] + [w for child in getattr(widget, "children", ()) for w in all_widgets(child)]


def final(view) -> np.ndarray:
    return view.what_if.final_probs[view.NAME].astype(np.float64)


@pytest.fixture(scope="module")
def sampled(tiny_lms):
    return tiny_lms["llama"].generate("Once upon a time", max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20,
                                      top_p=0.9, seed=0, eos_token_id=[], record=dl.Record(logits=True),
                                      progress=False)


def test_it_opens_on_the_runs_own_strategy(sampled):
    view = dl.playground(sampled, step=3)
    values = {w: s.value for w, s in view.sliders.items()}
    assert values == pytest.approx({"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.0, "typical_p": 1.0})
    assert view.what_if.strategies[view.NAME].processor_names == sampled.processor_names
    s = view.what_if.summary.iloc[0]
    assert s["run_token_kept"]
    assert s["run_token_prob"] == pytest.approx(sampled.steps["final_prob"][3], rel=5e-3)
    assert f"<b>step 3</b>" in view.header.value and view.problems.value == ""
    again = dl.playground(sampled, step=-1)  # twice: dl.playground stays the function, not its module
    assert again.step == sampled.num_steps - 1


def test_a_greedy_run_opens_on_pure_sampling():
    view = dl.playground(hand_made(), step=0)
    assert {w: s.value for w, s in view.sliders.items()} == {w: v[4] for w, v in pv.SLIDER_WORDS.items()}
    assert view.what_if.strategies[view.NAME].processor_names == []  # nothing acts: the model's distribution
    np.testing.assert_allclose(final(view), softmax(logits_at(hand_made(), 0)), atol=1e-6)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_each_slider_reshapes_the_step_as_computed_by_hand(step):
    trace = hand_made()
    view = dl.playground(trace, step=step, k=len(VOCAB))
    x = logits_at(trace, step)
    p = softmax(x)

    def check(kept, scaled=x):
        np.testing.assert_allclose(final(view), softmax(np.where(kept, scaled, -np.inf)), atol=1e-6)
        s = view.what_if.summary.iloc[0]
        assert s["kept"] == kept.sum() and s["mass_removed"] == pytest.approx(p[~kept].sum(), abs=1e-6)

    view.sliders["top_k"].value = 3
    check(keep_top_k(x, 3))
    view.set(top_k=0, top_p=0.7)
    check(keep_top_p(p, 0.7)[0])
    view.set(top_p=1.0, min_p=0.35)
    check(keep_min_p(p, 0.35)[0])
    view.set(min_p=0.0, typical_p=0.6)
    check(keep_typical(p, 0.6)[0])
    view.set(typical_p=1.0, temperature=0.5)
    check(np.ones(len(VOCAB), bool), x / 0.5)
    view.set(temperature=2.0, top_p=0.55)
    check(keep_top_p(softmax(x / 2.0), 0.55)[0], x / 2.0)


def test_the_bars_show_raw_and_final_kept_and_removed():
    trace = hand_made()
    view = dl.playground(trace, step=2, k=len(VOCAB))
    view.set(top_k=3)
    x = logits_at(trace, 2)
    kept = keep_top_k(x, 3)
    p, f = softmax(x), softmax(np.where(kept, x, -np.inf))
    rows = dom(view.bars.value).all("tr")[1:]
    order = np.argsort(-x, kind="stable")
    assert len(rows) == len(VOCAB)
    top = max(p.max(), f.max())
    for tr, i in zip(rows, order):
        assert ("dlp-removed" in tr.classes) == (not kept[i])
        assert tr.all("td")[-1].text == ("kept" if kept[i] else "removed")
        np.testing.assert_allclose(widths(tr), [100 * p[i] / top, 100 * f[i] / top], atol=0.06)
        assert ("◀ run" in tr.text) == (VOCAB[i] == " c")  # the run chose ' c' at step 2
    assert "<i>x</i>" not in view.bars.value and "&lt;i&gt;x&lt;/i&gt;" in view.bars.value  # escaped
    summary = dom(view.summary.value)
    bar = summary.all("div", "dlp-massbar")[0].all("div")[0]
    assert float(bar.style("width").rstrip("%")) == pytest.approx(100 * p[kept].sum(), abs=0.01)
    assert f"kept</b> 3 of {len(VOCAB)} tokens" in view.summary.value
    procs = dom(view.processors.value).all("tr")[1:]
    assert [r.all("td")[0].text for r in procs] == ["TopK"] and procs[0].all("td")[2].text == "3"


def test_fewer_bars_than_kept_tokens_say_how_much_is_not_shown():
    trace = hand_made()
    view = dl.playground(trace, step=0, k=2)
    shown = view.what_if.tokens
    assert len(shown) == 2  # the model's top 2 (the run's ' b' among them)
    rest = 1 - final(view)[shown["token_id"]].sum()
    assert f"2 of the {len(VOCAB)} kept tokens shown; the others hold {100 * rest:.2f}%" in view.bars.value


def test_set_redraws_once_and_reset_returns_to_the_run(sampled, monkeypatch):
    view = dl.playground(sampled, step=2)
    calls = []
    real = whatif.what_if_at
    monkeypatch.setattr(whatif, "what_if_at", lambda *a, **k: calls.append(1) or real(*a, **k))
    view.set(temperature=1.5, top_k=5, top_p=1.0)
    assert len(calls) == 1 and view.what_if.summary.iloc[0]["kept"] == 5
    view.reset_button.click()
    assert len(calls) == 2 and view.sliders["top_k"].value == 20
    assert view.what_if.summary.iloc[0]["run_token_prob"] == pytest.approx(sampled.steps["final_prob"][2], rel=5e-3)
    with pytest.raises(ValueError, match="top_q"):
        view.set(top_q=0.5)


def test_the_step_slider_moves_the_step_and_keeps_the_knobs(sampled):
    view = dl.playground(sampled, step=0)
    view.set(top_k=4)
    for step in (1, 5):
        view.step_slider.value = step
        assert view.what_if.step == step and f"<b>step {step}</b>" in view.header.value
        assert view.what_if.run_token_id == sampled.token_ids[step]
        assert view.what_if.summary.iloc[0]["kept"] == 4
        np.testing.assert_allclose(view.what_if.raw_probs, softmax(logits_at(sampled, step)), atol=1e-6)


def without_logits(trace) -> dl.Trace:
    return dataclasses.replace(trace, arrays={k: v for k, v in trace.arrays.items() if k != "logits"})


def test_without_recorded_logits_one_forward_of_the_row_gives_them(tiny_lms, sampled):
    lm = tiny_lms["llama"]
    bare = without_logits(sampled)
    every = whatif.row_logits(lm, bare)
    assert every.shape == (sampled.num_steps, sampled.array("logits").shape[-1])
    for step in range(sampled.num_steps):  # the same as one forward of each step's prefix
        one = whatif.forward_prefix(lm, whatif.step_prefix(bare, step))
        np.testing.assert_allclose(every[step].numpy(), one.numpy(), atol=1e-4)
    recorded, forward = dl.playground(sampled, step=2), dl.playground(bare, step=2, lm=lm)
    assert "model forward" in forward.header.value and "recorded logits" in recorded.header.value
    for view in (recorded, forward):
        view.set(top_k=0, top_p=0.8, temperature=0.7)
    np.testing.assert_allclose(final(forward), final(recorded), atol=5e-3)  # recorded logits are float16
    assert forward.what_if.summary.iloc[0]["top_id"] == recorded.what_if.summary.iloc[0]["top_id"]


def test_without_logits_it_opens_at_once_and_fills_in_with_the_recorded_numbers(tiny_lms, sampled, monkeypatch):
    """The row's forward is not run by the constructor: the playground shows "computing logits…" with its controls
    greyed, and the forward runs after (on the kernel's event loop; here, with none running, when asked). Then it
    gives the numbers of the trace recorded with logits=True."""
    lm = tiny_lms["llama"]
    forwards = []
    real = whatif.row_logits
    monkeypatch.setattr(whatif, "row_logits", lambda *a, **k: forwards.append(1) or real(*a, **k))
    view = dl.playground(without_logits(sampled), step=2, lm=lm)
    assert forwards == [] and view.pending  # constructed without waiting for the forward
    assert "computing logits" in view.progress.value and "dlp-spinner" in view.progress.value
    assert "<b>step 2</b>" in view.header.value and "computing" in view.header.value
    assert all(w.disabled for w in [view.step_slider, view.reset_button, *view.sliders.values()])
    assert view.summary.value == view.bars.value == view.processors.value == ""
    view.set(top_k=0, top_p=0.8)  # a move made meanwhile is kept, and answered when the logits are in
    assert forwards == [] and view.pending
    assert view.wait() is view and forwards == [1] and not view.pending
    assert view.progress.value == "" and view.problems.value == ""
    assert not any(w.disabled for w in [view.step_slider, view.reset_button, *view.sliders.values()])
    assert "model forward" in view.header.value and "computing" not in view.header.value
    recorded = dl.playground(sampled, step=2)
    recorded.set(top_k=0, top_p=0.8)
    # the same probabilities as the trace recorded with logits=True (float16 there), token for token
    np.testing.assert_allclose(view.what_if.raw_probs, recorded.what_if.raw_probs, atol=2e-3)
    np.testing.assert_allclose(final(view), final(recorded), atol=5e-3)
    mine, theirs = view.what_if.summary.iloc[0], recorded.what_if.summary.iloc[0]
    assert mine["kept"] == theirs["kept"] and mine["top_id"] == theirs["top_id"]
    assert mine["run_token_prob"] == pytest.approx(theirs["run_token_prob"], abs=5e-3)
    view.wait()
    assert forwards == [1]  # once


def test_without_logits_what_if_waits_for_the_forward(tiny_lms, sampled):
    view = dl.playground(without_logits(sampled), step=1, lm=tiny_lms["llama"])
    assert view.pending
    assert view.what_if.step == 1 and not view.pending  # code reading the numbers gets them
    assert view.summary.value != ""


def test_without_logits_the_forward_runs_on_the_event_loop_after_the_cell(tiny_lms, sampled, monkeypatch):
    """In a kernel the forward is scheduled on the running event loop: the cell returns first, the panels fill in
    when the loop gets to it (not in another thread: the model is shared with the next cell)."""
    import asyncio
    import threading

    lm = tiny_lms["llama"]
    where = []
    real = whatif.row_logits

    async def cell():
        view = dl.playground(without_logits(sampled), step=3, lm=lm)
        assert view.pending and view.summary.value == ""  # the cell is over before any forward
        for _ in range(200):
            if not view.pending:
                break
            await asyncio.sleep(0.01)
        return view

    monkeypatch.setattr(whatif, "row_logits", lambda *a, **k: where.append(threading.current_thread()) or real(*a, **k))
    view = asyncio.run(cell())
    assert where == [threading.current_thread()]
    assert not view.pending and view.progress.value == "" and "kept" in view.summary.value
    assert view.what_if.step == 3


def test_without_logits_a_failed_forward_is_shown(tiny_lms, sampled, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(whatif, "row_logits", broken)
    view = dl.playground(without_logits(sampled), step=2, lm=tiny_lms["llama"])
    with pytest.raises(RuntimeError, match="out of memory"):
        view.wait()
    assert "out of memory" in view.problems.value and view.progress.value == ""
    assert "forward failed" in view.header.value and "computing" not in view.header.value
    assert not view.pending and view.what_if is None
    assert all(w.disabled for w in [view.step_slider, *view.sliders.values()])  # nothing to answer with


def test_every_part_carries_its_css_class(sampled):
    view = dl.playground(sampled, step=1)
    classes = {c for w in all_widgets(view) for c in w._dom_classes}
    assert set(pv.CSS_CLASSES) <= classes


def test_bad_input_is_named(tiny_lms, sampled):
    with pytest.raises(WhatIfError, match=r"lm=.*Record\(logits=True\)"):
        dl.playground(without_logits(sampled))
    with pytest.raises(WhatIfError, match="step=99"):
        dl.playground(sampled, step=99)
    with pytest.raises(WhatIfError, match="row=2"):
        dl.playground(sampled, row=2)
    with pytest.raises(WhatIfError, match="k=0"):
        dl.playground(sampled, k=0)
