"""The widgets, driven from Python on tiny-model traces: every control changes the view, in place.

Why without a browser: the callbacks are plain Python, so setting a slider's value or calling
`button.click()` runs exactly what a click in Jupyter runs, in milliseconds. test_browser.py checks
that the same widgets render and reach the kernel in a real front end.
"""
from __future__ import annotations

import ipywidgets as W
import numpy as np
import pytest

import decoderlab as dl
from decoderlab.views import panels
from decoderlab.views import trace_view as widgets
from decoderlab.trace.builder import from_tokens
import re

from decoderlab.views.display import (NEVER_COMMITTED, commit_colour, escape, prob_colour, strategy_summary,
                                     token_label)
from decoderlab.views import kit, session_explorer
from decoderlab.views.session_explorer import SessionExplorer
from decoderlab.views.trace_view import TraceView
from test_plots import hand_trace, row_length, row_token

FULL = dl.Record(attention=True, lens=True)
PANELS = ("candidates_panel", "processors_panel", "attention_panel", "lens_panel")


@pytest.fixture(scope="module")
def lm(tiny_lms):
    return tiny_lms["llama"]


@pytest.fixture(scope="module")
def trace(lm):
    return lm.generate("Once upon a time", max_new_tokens=8, do_sample=True, top_k=20, top_p=0.9, seed=0,
                       eos_token_id=[], record=FULL, progress=False)


def classes(widget: W.Widget) -> set[str]:
    return set(widget._dom_classes)


def label_step(view: TraceView) -> int:
    import re

    return int(re.search(r"step (\d+)</b>", view.step_label.value).group(1))


def step_panels(view: TraceView) -> list[W.HTML]:
    """The panels that name the step they show (the processors table does not)."""
    return [view.distribution, view.attention, view.lens]


def names_step(panel: W.HTML, step: int) -> bool:
    return f"<b>step {step}</b>" in panel.value


def all_widgets(widget: W.Widget) -> list[W.Widget]:
    return [widget] + [w for child in getattr(widget, "children", ()) for w in all_widgets(child)]


def count_calls(monkeypatch) -> dict[str, list]:
    """Spy on the panel functions the widgets call: name -> the (step, row) of each call."""
    calls: dict[str, list] = {name: [] for name in PANELS}
    for name in PANELS:
        def spy(trace, step, *a, _name=name, _draw=getattr(panels, name), **kw):
            calls[_name].append((step, kw.get("row")))
            return _draw(trace, step, *a, **kw)
        monkeypatch.setattr(panels, name, spy)
    return calls


def test_show_builds_every_panel_for_a_full_trace(trace):
    view = dl.show(trace)
    assert isinstance(view, TraceView) and isinstance(view, W.VBox)
    assert "dl-trace-view" in classes(view)
    last = trace.num_steps - 1
    assert view.step == last == label_step(view)  # opens on the last step
    for panel in step_panels(view):
        assert isinstance(panel, W.HTML) and names_step(panel, last)
    # no figures: HTML only (the beam tree's image is for beam traces, and hidden here)
    assert not [w for w in all_widgets(view) if isinstance(w, W.Image) and w is not view.beam_tree]
    assert view.beam_panel.layout.display == "none" and not view.beam_tree.value
    assert escape(token_label(trace.steps.token[last], 32)) in view.distribution.value
    assert "dlp-query" in view.attention.value and "what each layer would say" in view.lens.value
    assert panels.PANEL_CSS in view.style.value  # the panels' classes are styled
    assert view.attention_panel.layout.display is None and view.lens_panel.layout.display is None
    assert len([b for b in view.text.children if "dl-token" in classes(b)]) == trace.num_steps
    assert "TopK" in view.processors.value and "TopP" in view.processors.value
    assert view.problems.value == ""
    for widget, css in [(view.slider, "dl-step-slider"), (view.step_label, "dl-step-label"), (view.text, "dl-text"),
                        (view.distribution, "dl-distribution"), (view.attention, "dl-attention"),
                        (view.lens, "dl-lens"), (view.layer, "dl-layer"), (view.head, "dl-head"),
                        (view.processors, "dl-processors")]:
        assert css in classes(widget) and css in widgets.CSS_CLASSES


def test_sliding_redraws_in_place(trace, monkeypatch):
    calls = count_calls(monkeypatch)
    view = dl.show(trace, step=0)
    assert label_step(view) == 0
    shown = step_panels(view) + [view.processors]
    before = [p.value for p in shown]
    assert all(names_step(p, 0) for p in step_panels(view))
    children = list(view.children)
    view.slider.value = 3
    assert label_step(view) == 3
    token = trace.steps.token[3]
    assert escape(token_label(token, 32)) in view.step_label.value
    assert escape(token_label(token, 32)) in view.distribution.value
    assert all(names_step(p, 3) and not names_step(p, 0) for p in step_panels(view))  # every panel is the new step's
    assert [p.value for p in shown] != before and view.processors.value != before[-1]
    assert list(view.children) == children  # same widgets, new values: nothing appended
    drawn = {name: list(c) for name, c in calls.items()}
    assert drawn == {name: [(0, 0), (3, 0)] for name in PANELS}
    view.slider.value = 0
    assert [p.value for p in shown] == before  # identical strings ...
    assert calls == drawn  # ... from the cache: nothing drawn again


def test_clicking_a_token_selects_its_step(trace):
    view = dl.show(trace, step=0)
    tokens = [b for b in view.text.children if "dl-token" in classes(b)]
    tokens[5].click()
    assert view.step == 5 and label_step(view) == 5
    assert "dl-selected" in classes(tokens[5]) and "dl-selected" not in classes(tokens[0])
    assert sum("dl-selected" in classes(b) for b in tokens) == 1
    assert "step 5" in tokens[5].tooltip


def test_token_buttons_are_coloured_by_probability(trace):
    view = dl.show(trace)
    tokens = [b for b in view.text.children if "dl-token" in classes(b)]
    assert len(tokens) == trace.num_steps
    for b, p in zip(tokens, trace.steps.prob):
        assert b.style.button_color == prob_colour(round(p, 2))  # to 1%: few distinct styles
        assert b.style.font_weight == "normal" and b.style.text_decoration == "none"
        assert b.layout is kit.TOKEN_LAYOUT and not b.layout.border  # selection is a class, not a border
    assert prob_colour(0.0) == "#ef8a62" and prob_colour(1.0) == "#67a9cf"
    assert prob_colour(0.5) == "#f7f7f7" and prob_colour(7) == "#67a9cf"


def test_token_buttons_share_layout_and_styles_and_forced_ones_are_bold():
    tokens = [" The", " cat", " sat", " on", " the", " mat"]
    tr = hand_trace(tokens, forced=(1, 4))
    view = dl.show(tr)
    buttons = [b for b in view.text.children if "dl-token" in classes(b)]
    assert [b.description for b in buttons] == [token_label(t, 24) for t in tokens]
    assert all(b.layout is kit.TOKEN_LAYOUT for b in buttons)  # one layout for every token
    for b, p, forced in zip(buttons, tr.steps.prob, tr.steps.forced):
        assert b.style.button_color == prob_colour(round(p, 2))
        look = ("bold", "underline") if forced else ("normal", "none")
        assert (b.style.font_weight, b.style.text_decoration) == look
        assert ("forced" in b.tooltip) == bool(forced)
    # one style per (colour, forced): buttons that look the same share one ButtonStyle widget
    looks = {(b.style.button_color, b.style.font_weight) for b in buttons}
    assert len({id(b.style) for b in buttons}) == len(looks)
    same = [b for b in buttons if (b.style.button_color, b.style.font_weight) == (buttons[0].style.button_color,
                                                                                   buttons[0].style.font_weight)]
    assert all(b.style is buttons[0].style for b in same)


def test_exactly_one_token_is_selected_whatever_moves_the_selection():
    tr = hand_trace([" a", " b", " c", " d", " e", " f", " g"], rows=2)  # row 1 has five steps

    def selected(view):
        return [i for i, b in enumerate(view._token_buttons) if "dl-selected" in classes(b)]

    view = dl.show(tr, step=6)
    assert selected(view) == [6]
    view.set_trace(tr, step=2)  # a new trace in place, at another step
    assert selected(view) == [2] and view.step == 2
    view.select(5)
    view.select_row(1)  # row 1 is shorter: the last of its steps
    assert view.step == 4 and selected(view) == [4]
    view.select_row(0)
    view.select(1)
    assert selected(view) == [1]
    view.set_trace(tr.row(1))
    assert selected(view) == [4]


def test_layer_and_head_pickers_change_the_attention_panel(trace):
    view = dl.show(trace, step=2)
    layers = [v for _, v in view.layer.options]
    assert layers == ["every", *[str(x) for x in trace.attention_layers]]
    heads = [v for _, v in view.head.options]
    assert heads == ["mean", *[str(h) for h in trace.attention_heads]]  # no "every head" without a layer
    assert "<b>every layer, mean of heads</b>" in view.attention.value
    seen = {view.attention.value}
    view.layer.value = "1"
    assert "all" in [v for _, v in view.head.options]
    assert "<b>layer 1, mean of heads</b>" in view.attention.value
    seen.add(view.attention.value)
    view.head.value = "all"
    assert all(f"<th>head {h}</th>" in view.attention.value for h in trace.attention_heads)  # a row per head
    seen.add(view.attention.value)
    view.head.value = "2"
    assert "<b>layer 1, head 2</b>" in view.attention.value
    seen.add(view.attention.value)
    assert len(seen) == 4 and all("<b>step 2</b>" in v for v in seen)
    view.layer.value = "every"
    assert "<b>every layer, head 2</b>" in view.attention.value
    assert view.head.value == "2" and "all" not in [v for _, v in view.head.options]  # the head stayed
    assert view.problems.value == ""


def test_panels_only_where_the_trace_has_data(lm):
    tr = lm.generate("Once upon a time", max_new_tokens=4, do_sample=False, eos_token_id=[], progress=False)
    view = dl.show(tr)
    assert view.attention_panel.layout.display == "none"
    assert view.lens_panel.layout.display == "none"
    assert view.attention.value == "" and view.lens.value == ""  # never drawn
    assert names_step(view.distribution, 3) and escape(token_label(tr.steps.token[3], 32)) in view.distribution.value
    assert "no logits processors ran" in view.processors.value and view.problems.value == ""


def test_show_a_saved_trace(trace, tmp_path):
    loaded = dl.Trace.load(trace.save(tmp_path / "t.parquet"))
    view = dl.show(loaded, step=1)
    assert view.lens_panel.layout.display is None and view.problems.value == ""
    assert view.lens.value == panels.lens_panel(trace, 1)  # the loaded trace says what the recorded one says
    assert view.attention.value == panels.attention_panel(trace, 1)
    assert view.distribution.value == panels.candidates_panel(trace, 1, k=12)


@pytest.mark.parametrize("broken, name, panel", [("candidates_panel", "candidates", "distribution"),
                                                  ("processors_panel", "processors", "processors"),
                                                  ("attention_panel", "attention", "attention"),
                                                  ("lens_panel", "lens", "lens")])
def test_a_broken_panel_is_reported_not_fatal(trace, monkeypatch, broken, name, panel):
    def fails(*a, **k):
        raise RuntimeError("not today")

    monkeypatch.setattr(panels, broken, fails)
    view = dl.show(trace, step=1)
    assert view.problems.value == panels.message(f"{name}: RuntimeError: not today", "error")
    assert label_step(view) == 1
    others = [p for p in step_panels(view) if p is not getattr(view, panel)]
    assert others and all(names_step(p, 1) for p in others)  # the others still show step 1
    assert getattr(view, panel).value == ""  # nothing half-drawn where it broke
    view.slider.value = 2  # still broken at the next step, still reported once
    assert view.problems.value.count("not today") == 1 and all(names_step(p, 2) for p in others)


def test_missing_numbers_read_as_dashes_and_the_chooser_is_escaped():
    tr = from_tokens([" a", " b", " c"], [-0.1, -0.5, -2.0], chooser="<script>x</script>")  # no ranks, entropy
    view = dl.show(tr, step=1)
    label = view.step_label.value
    assert "<b>step 1</b>" in label and "(rank –)" in label and "final p=–" in label and "entropy –" in label
    assert "nan" not in label.lower() and "<script>" not in label and escape("<script>x</script>") in label
    assert "no candidates were recorded" in view.distribution.value and view.problems.value == ""
    bare = dl.show(from_tokens([" a", " b"]))  # not even logprobs
    assert "p=– (rank –)" in bare.step_label.value and bare.problems.value == ""


# ---- explore ------------------------------------------------------------------------------------------------
def make_session(lm, **kw):
    words = dict(do_sample=True, top_k=20, seed=1, eos_token_id=[], max_new_tokens=40, record=FULL)
    words.update(kw)
    return lm.session("Once upon a time", **words)


def test_explore_starts_empty_then_steps(lm):
    s = make_session(lm)
    ex = dl.explore(s)
    assert isinstance(ex, SessionExplorer) and "dl-explorer" in classes(ex)
    assert "nothing decoded yet" in ex.view.step_label.value
    assert ex.view.panels.layout.display == "none"
    cands = [b for b in ex.candidates.children if "dl-candidate" in classes(b)]
    assert len(cands) == 8
    ex.next_button.click()
    assert s.steps == 1 and label_step(ex.view) == 0
    assert ex.view.panels.layout.display is None and all(names_step(p, 0) for p in step_panels(ex.view))
    assert escape(token_label(s.trace.steps.token[0], 32)) in ex.view.distribution.value
    assert "decoded" in ex.status.value
    ex.next10_button.click()
    assert s.steps == 11 and label_step(ex.view) == 10 and ex.view.slider.max == 10
    assert all(names_step(p, 10) for p in step_panels(ex.view))
    tokens = [b for b in ex.view.text.children if "dl-token" in classes(b)]
    assert [i for i, b in enumerate(tokens) if "dl-selected" in classes(b)] == [10]  # the old last is let go


def test_explore_next_writes_only_the_new_token_button(lm):
    s = make_session(lm)
    s.step(5)
    ex = dl.explore(s)
    old = [b for b in ex.view.text.children if "dl-token" in classes(b)]
    writes = []
    for b in old:
        b.observe(lambda change: writes.append(change["name"]), names=["description", "tooltip", "style", "layout"])
    ex.next_button.click()
    new = [b for b in ex.view.text.children if "dl-token" in classes(b)]
    assert len(new) == 6 and new[:5] == old and all(a is b for a, b in zip(new, old))  # the same widgets, reused
    assert writes == []  # numbers unchanged: not one old button written again
    assert new[5].description == token_label(s.trace.steps.token[5], 24)


def test_explore_candidate_click_forces_that_token(lm):
    s = make_session(lm)
    s.step(3)
    ex = dl.explore(s)
    cands = [b for b in ex.candidates.children if "dl-candidate" in classes(b)]
    expected = s.candidates(k=8)
    pick = cands[4]
    assert pick._dl_token_id == int(expected.token_id[4])
    pick.click()
    assert s.steps == 4
    row = s.trace.steps.iloc[3]
    assert bool(row.forced) and row.choice == "forced" and int(row.token_id) == int(expected.token_id[4])
    assert "forced" in ex.view.step_label.value and label_step(ex.view) == 3
    assert "forced" in ex.status.value
    last = [b for b in ex.view.text.children if "dl-token" in classes(b)][-1]
    assert last.style.font_weight == "bold" and "forced" in last.tooltip
    new = [b for b in ex.candidates.children if "dl-candidate" in classes(b)]
    assert new and all(b is not old for b in new for old in cands)  # the next step's candidates


def test_explore_rewind_fork_and_branches(lm):
    s = make_session(lm)
    ex = dl.explore(s)
    ex.next10_button.click()
    text10 = s.trace.token_ids
    ex.rewind_to.value = 4
    ex.rewind_button.click()
    assert s.steps == 4 and ex.view.slider.max == 3 and "rewound" in ex.status.value
    assert s.trace.token_ids == text10[:4]
    ex.fork_button.click()
    assert len(s.branches) == 2 and ex.session is s.branches[1] and ex.session.fork_step == 4
    assert [v for _, v in ex.branches.options] == [0, 1] and ex.branches.value == 1
    ex.candidates.children[1].click()  # the new branch goes its own way
    ex.next_button.click()
    assert ex.session.steps == 6 and s.steps == 4
    assert ex.session.trace.token_ids[:4] == s.trace.token_ids
    ex.branches.value = 0
    assert ex.session is s and ex.view.trace.num_steps == 4 and label_step(ex.view) == 3
    assert len(s.tree) == 2 and list(s.tree.steps) == [4, 6]
    ex.branches.value = 1
    assert ex.session.branch == 1 and ex.view.trace.num_steps == 6


def test_explore_end_of_sequence_and_errors(lm):
    s = make_session(lm, eos_token_id=[2])
    ex = dl.explore(s)
    ex.force(2)  # EOS
    assert s.done and ex.next_button.disabled and ex.next10_button.disabled
    assert "ended at EOS" in ex.candidates.children[0].value
    ex._act(lambda: ex.session.choose(rank=0))  # what a stale candidate button would do
    assert "dl-error" in classes(ex.status) and "SessionError" in ex.status.value
    ex.rewind_to.value = 0
    ex.rewind_button.click()
    assert not s.done and not ex.next_button.disabled and "dl-error" not in classes(ex.status)


def test_explore_forwarded_from_the_package(lm):
    ex = dl.explore(make_session(lm), k=3)
    assert len(ex.candidates.children) == 3
    assert set(widgets.__all__) >= {"show", "TraceView"}
    assert set(session_explorer.__all__) >= {"explore", "SessionExplorer"} and isinstance(ex, SessionExplorer)
    cands = ex.session.candidates(k=3)
    for b, (_, c) in zip(ex.candidates.children, cands.iterrows()):
        assert b.description.startswith(token_label(c.token, 16))
        assert np.isclose(float(b.description.split()[-1]), c.final_prob, atol=0.006)


# ---- rows of a batch (hand-made traces, no model) -------------------------------------------------------------
def find(widget: W.Widget, css: str) -> list[W.Widget]:
    """Every widget under `widget` (itself included) that carries the CSS class `css`."""
    found = [widget] if css in classes(widget) else []
    for child in getattr(widget, "children", ()):
        found += find(child, css)
    return found


def token_texts(view: TraceView) -> list[str]:
    return [b.description for b in view.text.children if "dl-token" in classes(b)]


def test_row_picker_only_for_a_trace_of_several_rows():
    one = dl.show(hand_trace([" a", " b", " c"]))
    assert find(one, "dl-row") == [] and one.row == 0
    tr = hand_trace([" a", " b", " c", " d", " e"], rows=2)
    view = dl.show(tr)
    pickers = find(view, "dl-row")
    assert pickers == [view.row_picker] and isinstance(view.row_picker, W.Dropdown)
    assert "dl-row" in widgets.CSS_CLASSES
    assert [v for _, v in view.row_picker.options] == [0, 1]
    assert [label for label, _ in view.row_picker.options] == ["row 0 · 5 steps", f"row 1 · {row_length(5, 1)} steps"]
    view.set_trace(hand_trace([" a"]))  # a one-row trace in place: the picker leaves the controls
    assert find(view, "dl-row") == [] and view.row == 0


def test_picking_a_row_shows_that_rows_text_step_and_panels(monkeypatch):
    tokens = [" The", " cat", " sat", " on", " the", " mat"]
    tr = hand_trace(tokens, rows=2)
    n1 = row_length(len(tokens), 1)
    view = dl.show(tr, step=n1 - 1)
    assert token_texts(view) == [token_label(t, 24) for t in tokens]
    row0_dist = view.distribution.value
    assert escape(token_label(tokens[n1 - 1], 32)) in row0_dist

    calls = count_calls(monkeypatch)
    view.row_picker.value = 1
    assert view.row == 1 and view.step == n1 - 1 == label_step(view)
    assert token_texts(view) == [token_label(row_token(1, s), 24) for s in range(n1)]  # no padding steps
    assert "row 1 · " in view.step_label.value
    assert escape(token_label(row_token(1, n1 - 1), 32)) in view.step_label.value
    assert calls == {name: [(n1 - 1, 1)] for name in PANELS}  # every panel is row 1's ...
    assert view.distribution.value != row0_dist  # ... and not row 0's cached one
    assert escape(token_label(row_token(1, n1 - 1), 32)) in view.distribution.value
    assert "alt3_1r1" in view.distribution.value and "alt3_1r1" not in row0_dist  # row 1's candidates
    assert "␣r1s3" in view.lens.value and "␣r1s2" in view.attention.value  # row 1's lens and context
    assert view.slider.max == n1 - 1
    with pytest.raises(IndexError):
        view.select(n1)  # a padding step of row 1

    tokens_1 = [b for b in view.text.children if "dl-token" in classes(b)]
    tokens_1[0].click()
    assert view.step == 0 and view.row == 1 and "row 1 · <b>step 0</b>" in view.step_label.value
    view.select_row(0)
    assert view.row == 0 and view.step == 0 and token_texts(view)[:2] == ["␣The", "␣cat"]
    assert view.distribution.value != dl.show(tr, row=1, step=0).distribution.value
    assert escape(token_label(" The", 32)) in view.distribution.value


def test_show_opens_on_the_row_asked_for():
    tr = hand_trace([" a", " b", " c", " d"], rows=2)
    view = dl.show(tr, row=1)
    n1 = row_length(4, 1)
    assert view.row == 1 and view.row_picker.value == 1 and label_step(view) == n1 - 1
    assert token_texts(view) == [token_label(row_token(1, s), 24) for s in range(n1)]
    assert "TopK" in view.processors.value and view.problems.value == ""
    assert "4 steps × 2 rows" in view.header.value
    assert escape(strategy_summary(tr)) in view.header.value  # the page's wording of the strategy
    with pytest.raises(IndexError):
        dl.show(tr, row=2)


def test_show_draws_the_beam_tree_for_beam_traces_only(tiny_lms):
    lm = tiny_lms["llama"]
    beams = lm.generate("Once upon a time", num_beams=2, num_return_sequences=2, max_new_tokens=4, progress=False)
    view = dl.show(beams)
    assert view.beam_panel.layout.display is None and bytes(view.beam_tree.value).startswith(b"\x89PNG")
    assert "dl-beams" in view.beam_tree._dom_classes
    assert [v for _, v in view.row_picker.options] == [0, 1]
    plain = dl.show(lm.generate("Once upon a time", max_new_tokens=4, progress=False))
    assert plain.beam_panel.layout.display == "none"


# ---- the commit strip ----------------------------------------------------------------------------------------
def test_commit_strip_computes_after_the_view_is_up_and_follows_the_selection(lm):
    tr = lm.generate("Where it settled", max_new_tokens=6, eos_token_id=[], record=dl.Record(lens=True),
                     progress=False)
    view = dl.show(tr)
    assert view.pending and "computing commit layers" in view.commit_panel.progress.value  # no event loop: not yet
    assert view.commit_panel.strip.value == "" and not tr.lens_computed
    assert view.wait() is view and not view.pending and view.commit_panel.progress.value == ""
    want = tr.steps.commit_layer
    cells = re.findall(r"class='dlp-commit( dlp-at)?' data-step='(\d+)' style='background:(#[0-9a-f]{6})'",
                       view.commit_panel.strip.value)
    assert [int(s) for _, s, _ in cells] == list(range(tr.num_steps))
    assert [c for _, _, c in cells] == [commit_colour(x, tr.lens_layers) for x in want]
    assert [s for at, s, _ in cells if at] == [str(tr.num_steps - 1)]  # the selected step outlined
    view.select(2)
    assert re.findall(r"dlp-commit dlp-at' data-step='(\d+)'", view.commit_panel.strip.value) == ["2"]
    for css, widget in [("dl-commit", view.commit_panel.strip), ("dl-commit-progress", view.commit_panel.progress)]:
        assert css in classes(widget) and css in widgets.CSS_CLASSES


def test_commit_strip_at_once_for_a_computed_lens_and_absent_without_one(lm, trace, tmp_path):
    loaded = dl.Trace.load(trace.save(tmp_path / "t.parquet"))
    view = dl.show(loaded)
    assert not view.pending and view.commit_panel.strip.value.count("data-step=") == loaded.num_steps
    plain = dl.show(lm.generate("No lens here", max_new_tokens=3, progress=False))
    assert not plain.pending and plain.commit_panel.layout.display == "none"
    off = dl.show(loaded, commitment=False)
    assert off.commit_panel.layout.display == "none" and off.commit_panel.strip.value == ""


def test_commit_colour_scale():
    assert commit_colour(0, 30) == prob_colour(1.0) and commit_colour(29, 30) == prob_colour(0.0)
    assert commit_colour(None, 30) == commit_colour(float("nan"), 30) == NEVER_COMMITTED


# ---- which knob decided ---------------------------------------------------------------------------------------
def _hand_knobs_frame():
    """A knobs frame made by hand: a 2 x 3 grid and a one-knob grid, with a cut point and greedy points."""
    rows = []
    for t in (0.5, 1.0):
        for k in (1, 5, 0):
            kept = not (k == 1 and t == 1.0)
            rows.append({"grid": "temperature × top_k", "knob_1": "temperature", "value_1": t, "knob_2": "top_k",
                         "value_2": k, "prob": (0.9 if t == 0.5 else 0.4) if kept else 0.0, "kept": kept,
                         "rank": 0 if t == 0.5 else (1 if kept else -1), "greedy": t == 0.5, "top_token": " x"})
    for r in (1.0, 1.5):
        rows.append({"grid": "repetition_penalty", "knob_1": "repetition_penalty", "value_1": r, "knob_2": None,
                     "value_2": None, "prob": 0.3, "kept": True, "rank": 2, "greedy": False, "top_token": "<b>"})
    import pandas as pd

    frame = pd.DataFrame(rows)
    for col in ("value_1", "value_2"):
        frame[col] = pd.Series([r[col] for r in rows], dtype=object)
    return frame


def test_knobs_heatmaps_cells_from_a_hand_made_frame():
    frame = _hand_knobs_frame()
    page = panels.knobs_heatmaps(frame, "<tok>")
    cells = re.findall(r"<td class='dlk-cell([^']*)' style='background:(#[0-9a-f]{6})[^']*' title='([^']*)'>([^<]*)</td>",
                       page)
    assert len(cells) == 8  # 2 x 3 + 2, in the frame's order (rows of the first knob, columns of the second)
    for (cls, colour, title, text), point in zip(cells, frame.itertuples()):
        if not point.kept:
            assert "dlk-cut" in cls and text == "cut" and colour == NEVER_COMMITTED
        else:
            assert colour == prob_colour(point.prob) and ("dlk-greedy" in cls) == point.greedy
            assert text == ("★ " if point.greedy else "") + f"{point.prob:.3f}"
    assert "<th>off</th>" in page and "<th>5</th>" in page and "<th>1.5</th>" in page  # top_k 0 is off
    assert "&lt;tok&gt;" in page and "<tok>" not in page and "&lt;b&gt;" in page  # every string escaped
    assert "greedy at 3 of 6" in page and "greedy at 0 of 2" in page


def test_knobs_panel_in_the_trace_view(lm):
    tr = lm.generate("Knobs in the view", max_new_tokens=5, do_sample=True, top_k=20, seed=1, eos_token_id=[],
                     record=dl.Record(logits=True), progress=False)
    view = dl.show(tr, step=2)
    kp = view.knobs_panel
    assert kp.body.value == "" and not kp.pending  # off until asked: clicks pay nothing
    kp.toggle.value = True
    assert kp.pending and "computing" in kp.body.value
    kp.wait()
    chosen = int(tr.choices.token_id[2])
    assert kp.token.value == chosen
    assert kp.body.value == panels.knobs_heatmaps(tr.knobs(2, chosen), tr.token_text[chosen])
    other = kp.token.options[1][1]
    kp.token.value = other
    kp.wait()
    assert kp.body.value == panels.knobs_heatmaps(tr.knobs(2, other), tr.token_text[other])
    view.select(4)
    kp.wait()
    assert kp.token.value == int(tr.choices.token_id[4])
    for css in ("dl-knobs-toggle", "dl-knobs-token", "dl-knobs"):
        assert css in widgets.CSS_CLASSES
    no_logits = dl.show(lm.generate("No logits", max_new_tokens=3, progress=False))
    no_logits.knobs_panel.toggle.value = True
    no_logits.knobs_panel.wait()  # shown in the panel, not raised
    assert "dl-problems" not in no_logits.knobs_panel.body.value and "Record(logits=True)" in no_logits.knobs_panel.body.value
