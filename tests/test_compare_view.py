"""dl.show(cmp): a comparison's runs side by side, driven from Python on tiny models.

As in test_widgets.py, a click is what the front end sends: a ToggleButtons' new `index` (the button's
index), a Dropdown's new `value`, `button.click()`. Every number the view shows is checked against the
runs' trace frames (and the candidates against the same run made alone).
"""
from __future__ import annotations

import re

import ipywidgets as W
import pytest

import decoderlab as dl
from decoderlab.views import compare_view
from decoderlab.views.compare_view import ComparisonView, RunKey
from decoderlab.views.display import escape, format_prob, token_label
from decoderlab.views.trace_view import TraceView, token_colour

PROMPTS = ["Once upon a time, in a land far away,", "The weather today"]
NO_EOS = {"eos_token_id": []}
STRATEGIES = {"greedy": NO_EOS, "top-k 20": {"do_sample": True, "top_k": 20, **NO_EOS},
              "nucleus 0.9": {"do_sample": True, "top_p": 0.9, "top_k": 0, **NO_EOS}}
SEEDS = [1, 2, 3]
STEPS = 8


@pytest.fixture(scope="module")
def lm(tiny_lms):
    return tiny_lms["llama"]


@pytest.fixture(scope="module")
def cmp(lm):
    return dl.compare(lm, PROMPTS, STRATEGIES, seeds=SEEDS, max_new_tokens=STEPS, progress=False)


def lines(view: ComparisonView) -> list[W.ToggleButtons]:
    """The runs' lines on screen, top to bottom (the step header is not one)."""
    return [w for w in view.grid.children if "dl-cmp-tokens" in w._dom_classes]


def trace_of(cmp, key: RunKey):
    return cmp.trace(key.strategy, seed=key.seed, prompt=key.prompt)


def colours(css: str, view_class: str) -> dict[tuple[int, int], str]:
    """(line, step) -> background, read back from the view's style sheet."""
    out = {}
    for selectors, colour in re.findall(r"([^{}]+)\{background:(#[0-9a-f]{6})\}", css):
        for line, step in re.findall(rf"\.{view_class} \.dl-cmp-r(\d+) button\[value='(\d+)'\]", selectors):
            out[(int(line), int(step))] = colour
    return out


def view_class(view: ComparisonView) -> str:
    return next(c for c in view._dom_classes if re.fullmatch(r"dl-cmp-v\d+", c))


def html_values(widget: W.Widget) -> list[str]:
    found = [widget.value] if isinstance(widget, W.HTML) else []
    return found + [v for child in getattr(widget, "children", ()) for v in html_values(child)]


def test_show_draws_each_run_as_a_line_coloured_by_probability(cmp):
    view = dl.show(cmp)
    assert isinstance(view, ComparisonView) and "dl-cmp-view" in view._dom_classes
    # the first seed: the greedy run (it does not sample, so it has no seed) and each sampled strategy's seed 1
    assert [(k.strategy, k.seed) for k in view.runs_shown] == [("greedy", None), ("top-k 20", 1), ("nucleus 0.9", 1)]
    assert all(k.prompt == PROMPTS[0] for k in view.runs_shown)
    found = colours(view.style.value, view_class(view))
    for i, (line, key) in enumerate(zip(lines(view), view.runs_shown)):
        steps = trace_of(cmp, key).steps
        assert line.description == (key.strategy if key.seed is None else f"{key.strategy} · seed {key.seed}")
        assert [label for label, _ in line.options] == [token_label(t, 8) for t in steps.token]
        assert [step for _, step in line.options] == list(range(STEPS))  # button j is step j: aligned by step
        assert line.index is None  # no button held down: the selection is an outline
        for j, (token, prob) in enumerate(zip(steps.token, steps.prob)):
            assert found[(i, j)] == token_colour(prob)  # the trace view's colour of that probability
            assert line.tooltips[j].startswith(f"step {j}: {token!r} · p={format_prob(prob)}")
        assert "perplexity" in line.tooltip and "stop: max_new_tokens" in line.tooltip
    assert [label for label, _ in view.steps_header.options] == [str(j) for j in range(STEPS)]
    for widget in (view.prompt_picker, view.seed_picker, view.grid, view.steps_header, view.divergence,
                   view.selected, view.candidates, view.processors, view.open_button, view.explorer,
                   *view.strategy_buttons.values(), *lines(view)):
        assert any(c in compare_view.CSS_CLASSES for c in widget._dom_classes)
    assert view.model_picker not in view.children[2].children  # one model: no model picker


def test_clicking_a_token_highlights_that_step_in_every_run(cmp):
    view = dl.show(cmp)
    v = view_class(view)
    clicked = lines(view)[1]
    clicked.index = 5  # what the front end sends when button 5 of the second run is clicked
    assert view.step == 5 and view.run == view.runs_shown[1]
    assert clicked.index is None  # let go: the outline, not a held button, marks the selection
    css = view.selection_style.value
    assert f"{v} .dl-cmp-tokens button[value='5']" in css  # every run's button 5 ...
    assert f"{v} .dl-cmp-steps button[value='5']" in css  # ... the step number above them ...
    assert f"{v} .dl-cmp-r1 button[value='5']{{outline:3px" in css  # ... and the clicked token more
    for line, key in zip(lines(view), view.runs_shown):  # button 5 of every line is that run's step 5
        assert line.options[5] == (token_label(trace_of(cmp, key).tokens[5], 8), 5)
    token = trace_of(cmp, view.run).tokens[5]
    assert f"step 5: <code>{escape(token_label(token, 32))}</code>" in view.selected.value
    assert "<b>step 5</b>" in view.candidates.value
    # a step number selects that step of the selected run; clicking another line moves to that run
    view.steps_header.index = 2
    assert (view.step, view.run) == (2, view.runs_shown[1]) and view.steps_header.index is None
    assert f"{v} .dl-cmp-tokens button[value='2']" in view.selection_style.value
    assert "button[value='5']" not in view.selection_style.value
    lines(view)[0].index = 7
    assert (view.step, view.run) == (7, view.runs_shown[0])
    assert f"{v} .dl-cmp-r0 button[value='7']" in view.selection_style.value


def test_candidates_are_the_runs_own_at_that_step(cmp, lm):
    view = dl.show(cmp)
    lines(view)[2].index = 3  # nucleus 0.9, seed 1, step 3
    key = view.run
    cand = trace_of(cmp, key).candidates
    at = cand[cand.step == 3].sort_values("rank").head(view.k)
    # the same run made alone records the same candidates: the panel shows what the model offered
    alone = lm.generate(PROMPTS[0], seed=1, max_new_tokens=STEPS, progress=False, **STRATEGIES["nucleus 0.9"])
    ref = alone.candidates[alone.candidates.step == 3].sort_values("rank").head(view.k)
    assert ref.token_id.tolist() == at.token_id.tolist()
    assert ref.prob.to_numpy() == pytest.approx(at.prob.to_numpy(), abs=1e-5)
    rows = re.findall(r"<tr[^>]*title='[^']*'>(.*?)</tr>", view.candidates.value)
    assert len(rows) == len(at)
    for row, (_, c) in zip(rows, at.iterrows()):
        assert f"<code>{escape(token_label(c.token, 20))}</code>" in row
        nums = re.findall(r"<td class='num'>([^<]*)</td>", row)
        assert nums == [str(int(c["rank"])), format_prob(c.prob), format_prob(c.final_prob)]
        assert ("◀" in row) == bool(c.chosen)
    assert "TopP" in view.processors.value


def test_pickers_change_the_runs_shown(cmp):
    view = dl.show(cmp)
    pool = list(lines(view))
    view.seed_picker.value = 2
    assert [(k.strategy, k.seed) for k in view.runs_shown] == [("greedy", None), ("top-k 20", 2), ("nucleus 0.9", 2)]
    assert lines(view) == pool  # the same line widgets, showing other runs
    for line, key in zip(lines(view), view.runs_shown):
        assert [label for label, _ in line.options] == [token_label(t, 8) for t in trace_of(cmp, key).tokens]
    view.seed_picker.value = "all"
    assert [(k.strategy, k.seed) for k in view.runs_shown] == (
        [("greedy", None)] + [("top-k 20", s) for s in SEEDS] + [("nucleus 0.9", s) for s in SEEDS])
    assert len(lines(view)) == 7 and lines(view)[:3] == pool
    view.strategy_buttons["top-k 20"].value = False
    assert [k.strategy for k in view.runs_shown] == ["greedy"] + ["nucleus 0.9"] * 3
    lines(view)[3].index = 4
    selected = view.run
    view.prompt_picker.value = 1
    assert all(k.prompt == PROMPTS[1] for k in view.runs_shown)
    assert (view.run.strategy, view.run.seed, view.run.prompt) == (selected.strategy, selected.seed, PROMPTS[1])
    assert view.step == 4
    for line, key in zip(lines(view), view.runs_shown):
        assert [label for label, _ in line.options] == [token_label(t, 8) for t in trace_of(cmp, key).tokens]
    found = colours(view.style.value, view_class(view))
    assert {line for line, _ in found} == set(range(len(view.runs_shown)))  # the colours of the lines shown only
    view.seed_picker.value = 3  # back to one seed: the selected run (seed 3 hidden) moves to its strategy's run
    assert view.run.strategy == "nucleus 0.9" and view.run.seed == 3
    for button in view.strategy_buttons.values():  # nothing shown, then one strategy again
        button.value = False
    assert view.runs_shown == [] and lines(view) == [] and "no run shown" in view.selected.value
    assert view.open_button.disabled and "fewer than two runs" in view.divergence.value
    view.strategy_buttons["greedy"].value = True
    assert [k.strategy for k in view.runs_shown] == ["greedy"] and not view.open_button.disabled
    first = dl.show(cmp, seed=2, strategies=["greedy"], prompt=PROMPTS[1])  # the first view, from the call
    assert [(k.strategy, k.prompt) for k in first.runs_shown] == [("greedy", PROMPTS[1])]


def test_where_runs_part_is_marked(cmp):
    view = dl.show(cmp, seed="all")
    v = view_class(view)
    ids = {k: trace_of(cmp, k).token_ids for k in view.runs_shown}

    def first(a, b):  # by hand
        return next((i for i, (x, y) in enumerate(zip(ids[a], ids[b])) if x != y), None)

    pairs = [first(a, b) for a in ids for b in ids if a != b]
    assert any(p is not None for p in pairs)
    common = min(p for p in pairs if p is not None)
    assert f"{v} .dl-cmp-steps button[value='{common}']{{background:{compare_view.PART_COLOUR}" in view.style.value
    assert f"part ways at <b style='color:{compare_view.PART_COLOUR}'>step {common}</b>" in view.divergence.value
    for i, a in enumerate(view.runs_shown):
        own = [first(a, b) for b in ids if b != a]
        mark = re.search(rf"{v} \.dl-cmp-r{i} button\[value='(\d+)'\]\{{box-shadow", view.style.value)
        if any(o is None for o in own):  # another run has the same tokens: no step of its own
            assert mark is None and "no step of its own" in lines(view)[i].tooltip
        else:
            assert int(mark.group(1)) == max(own) and f"its own from step {max(own)}" in lines(view)[i].tooltip
    # the tokens each run chose where they part are listed
    for a in view.runs_shown:
        assert escape(token_label(trace_of(cmp, a).tokens[common], 16)) in view.divergence.value


def test_open_a_run_in_the_trace_view(cmp):
    view = dl.show(cmp, seed=2)
    lines(view)[1].index = 6
    view.open_button.click()
    shown = view.explorer.children[-1]
    assert isinstance(shown, TraceView) and shown.step == 6
    assert shown.trace.token_ids == cmp.trace("top-k 20", seed=2).token_ids
    assert escape("top-k 20 · seed 2") in view.explorer.children[0].value
    old = shown
    lines(view)[0].index = 1
    view.open_button.click()
    assert view.explorer.children[-1] is not old and view.explorer.children[-1].trace.token_ids == \
        cmp.trace("greedy").token_ids
    assert old.comm is None and old.slider.comm is None  # the old view and its widgets were closed


def test_runs_of_different_lengths(lm):
    """A run that ends at EOS has fewer buttons; selecting a step past its end says so."""
    probe = lm.generate(PROMPTS[0], seed=1, do_sample=True, top_k=20, max_new_tokens=STEPS, progress=False, **NO_EOS)
    eos = {"eos_token_id": [probe.token_ids[2]]}  # seed 1 of top-k ends at step 2
    cmp = dl.compare(lm, PROMPTS[0], {"greedy": NO_EOS, "top-k 20": {"do_sample": True, "top_k": 20, **eos}},
                     seeds=[1], max_new_tokens=STEPS, progress=False)
    view = dl.show(cmp)
    short, long_ = lines(view)[1], lines(view)[0]
    assert len(short.options) == 3 and len(long_.options) == STEPS
    assert len(view.steps_header.options) == STEPS
    short.index = 2
    view.steps_header.index = 6
    assert "ended after 3 tokens (stop: eos)" in view.selected.value and view.candidates.value == ""


def test_hostile_text_is_escaped(lm):
    hostile = "<img src=x onerror=alert(1)>"
    prompt = "</style><script>alert(2)</script>"
    cmp = dl.compare(lm, prompt, {hostile: NO_EOS, "top-k": {"do_sample": True, "top_k": 20, **NO_EOS}},
                     seeds=[1], max_new_tokens=4, progress=False)
    tr = cmp.trace(hostile)
    tr.token_text[tr.token_ids[1]] = "<b>bold</b>&'\"</style>"  # a tokenizer's piece of markup, before any frame
    view = dl.show(cmp)
    lines(view)[0].index = 1
    view.open_button.click()
    markup = html_values(view)
    for raw in ("<img", "<script", "<b>bold", "</style><"):
        assert not any(raw in value for value in markup), raw
    assert escape(token_label("<b>bold</b>&'\"</style>", 32)) in view.selected.value
    assert escape(token_label("<b>bold</b>&'\"</style>", 20)) in view.candidates.value
    assert escape(hostile) in view.selected.value
    for sheet in (view.style.value, view.selection_style.value):  # no text from the model or the user in CSS
        assert "alert" not in sheet and "bold" not in sheet and sheet.count("<style>") == 1
    # text widgets get the raw text: the front end writes labels, descriptions and titles as text
    assert lines(view)[0].description == hostile and view.prompt_picker.options[0][0] == prompt


def test_bad_arguments_are_clear(cmp):
    with pytest.raises(ValueError, match=r"seed=99 .*allowed: \[1, 2, 3, 'all'\]"):
        dl.show(cmp, seed=99)
    with pytest.raises(ValueError, match="strategies=.*nope"):
        dl.show(cmp, strategies=["nope"])
    with pytest.raises(ValueError, match="prompt='nope'"):
        dl.show(cmp, prompt="nope")
    view = dl.show(cmp)
    with pytest.raises(IndexError, match="step 99"):
        view.select(99)


def test_a_model_picker_when_the_comparison_has_several_models(tiny_lms):
    models = {"llama": tiny_lms["llama"], "qwen2": tiny_lms["qwen2"]}
    strategies = {"greedy": NO_EOS, "top-k 20": STRATEGIES["top-k 20"]}
    cmp = dl.compare(models, PROMPTS[0], strategies, seeds=[1, 2], max_new_tokens=6, progress=False)
    view = dl.show(cmp)
    assert view.model_picker in view.children[2].children  # shown: there is a model to pick
    assert [v for _, v in view.model_picker.options] == [compare_view.ALL, "llama", "qwen2"]
    # every model, strategy by strategy: the two models' runs of a strategy one under the other
    assert [(k.model, k.strategy, k.seed) for k in view.runs_shown] == [
        ("llama", "greedy", None), ("qwen2", "greedy", None), ("llama", "top-k 20", 1), ("qwen2", "top-k 20", 1)]
    assert [line.description for line in lines(view)] == [
        "llama · greedy", "qwen2 · greedy", "llama · top-k 20 · seed 1", "qwen2 · top-k 20 · seed 1"]
    for line, key in zip(lines(view), view.runs_shown):
        tokens = cmp.trace(key.strategy, seed=key.seed, model=key.model).tokens
        assert [label for label, _ in line.options] == [token_label(t, 8) for t in tokens]
    lines(view)[1].index = 2
    assert view.run == RunKey("qwen2", PROMPTS[0], "greedy", None)
    tr = cmp.trace("greedy", model="qwen2")
    assert f"<b>step 2</b> · greedy <code>{escape(token_label(tr.tokens[2], 32))}</code>" in view.candidates.value
    view.open_button.click()
    assert view.explorer.children[-1].trace.token_ids == tr.token_ids
    view.model_picker.value = "llama"
    assert [(k.model, k.strategy) for k in view.runs_shown] == [("llama", "greedy"), ("llama", "top-k 20")]
    assert view.run == RunKey("llama", PROMPTS[0], "greedy", None)  # the selected run's strategy, on this model
    with pytest.raises(ValueError, match="model='nope'"):
        dl.show(cmp, model="nope")


def test_a_broken_panel_is_reported_not_fatal(cmp, monkeypatch):
    from decoderlab.views import panels

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(panels, "candidates_panel", broken)
    view = dl.show(cmp)
    lines(view)[1].index = 3
    assert "candidates: RuntimeError: boom" in view.problems.value and "dl-cmp-problems" in view.problems._dom_classes
    assert view.candidates.value == "" and "TopK" in view.processors.value  # the other panel is drawn
    monkeypatch.undo()
    lines(view)[1].index = 4
    assert view.problems.value == "" and "<b>step 4</b>" in view.candidates.value


def test_a_strategy_without_a_run_at_the_seed_picked_is_left_out(cmp):
    """An interrupted comparison can lack runs (Ctrl-C keeps the runs made so far)."""
    partial = dl.Comparison([r for r in cmp.run_list if not (r.strategy == "nucleus 0.9" and r.seed == 3)],
                            cmp.prompts, cmp.strategies, cmp.models, interrupted=True)
    view = dl.show(partial, seed=3)
    assert [(k.strategy, k.seed) for k in view.runs_shown] == [("greedy", None), ("top-k 20", 3)]
    view.seed_picker.value = 2
    assert [(k.strategy, k.seed) for k in view.runs_shown] == [("greedy", None), ("top-k 20", 2), ("nucleus 0.9", 2)]
