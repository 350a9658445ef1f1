"""The widgets' HTML panels (`decoderlab.panels`), on traces made by hand: what each panel says is
checked against numbers worked out in the test, and every model or user string comes out escaped."""
from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest

import decoderlab as dl
from decoderlab.views import panels
from decoderlab.trace.builder import from_tokens
from decoderlab.views.display import LENS_SCALE, WEIGHT_SCALE, format_prob, token_label
from test_plots import hand_trace

HOSTILE = "<script>alert(1)</script>"
QUOTES = "x' onmouseover='alert(1)"  # breaks out of a single-quoted attribute if not escaped
VOID = {"br", "hr", "img", "input", "meta", "link", "wbr", "col"}


# ---- a small DOM, to read panels the way a browser does -------------------------------------------------------
class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None" = None):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None) -> list["Node"]:
        found = []
        for c in self.children:
            if isinstance(c, Node):
                if (tag is None or c.tag == tag) and (cls is None or cls in c.classes):
                    found.append(c)
                found += c.all(tag, cls)
        return found

    def style(self, prop: str) -> str | None:
        m = re.search(rf"(?:^|;)\s*{prop}\s*:\s*([^;]+)", self.attrs.get("style") or "")
        return m.group(1).strip() if m else None


class Dom(HTMLParser):
    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.root = self.at = Node("#root", {})
        self.tags: list[tuple[str, dict]] = []
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.at)
        self.tags.append((tag, dict(attrs)))
        self.at.children.append(node)
        if tag not in VOID:
            self.at = node

    def handle_endtag(self, tag):
        node = self.at
        while node is not self.root and node.tag != tag:
            node = node.parent
        assert node is not self.root, f"</{tag}> closes nothing"
        self.at = node.parent

    def handle_data(self, data):
        self.at.children.append(data)


def dom(markup: str) -> Node:
    d = Dom(markup)
    assert d.at is d.root, f"unclosed <{d.at.tag}>"
    return d.root


def widths(cell_row: Node) -> list[float]:
    """The bar widths (percent) in a table row."""
    return [float(bar.style("width").rstrip("%")) for bar in cell_row.all("div", "dlp-bar")]


# ---- traces with every number chosen by hand ----------------------------------------------------------------------
ln = math.log


def chosen_trace() -> dl.Trace:
    """Two steps. Step 0 chose ' The' (rank 0), step 1 ' cat' (rank 2 of ' dog', ' cow', ' cat', ' pig');
    three processors with known effects."""
    top = [
        [(" The", ln(0.5), ln(0.625)), (" A", ln(0.25), ln(0.3125)), (" One", ln(0.125), ln(0.0625)),
         (" So", ln(0.0625), -math.inf)],
        [(" dog", ln(0.4), ln(0.5)), (" cow", ln(0.3), ln(0.375)), (" cat", ln(0.1), ln(0.125)),
         (" pig", ln(0.05), -math.inf)],
    ]
    procs = {  # [step, row, processor]: Temperature, TopK, MinP
        "proc_mass_removed": [[[0.0, 0.125, 0.5]], [[0.0, 0.25, 0.0]]],
        "proc_rank_before": [[[3, 3, 1]], [[2, 2, 2]]],
        "proc_rank_after": [[[3, 1, 0]], [[2, 2, 2]]],
        "proc_prob_after": [[[0.1, 0.2, 0.5]], [[0.1, 0.125, 0.125]]],
    }
    return from_tokens([" The", " cat"], [ln(0.5), ln(0.1)], top, final_logprobs=[ln(0.625), ln(0.125)],
                       prompt="Hi,", prompt_tokens=["<s>", "Hi", ","], chooser="sample",
                       processor_names=["TemperatureLogitsWarper", "TopKLogitsWarper", "MinPLogitsWarper"],
                       arrays={k: np.array(v) for k, v in procs.items()})


# attention of step 2 (context '<s>', 'Hi', ',', ' The', ' cat') at layers 3 and 7, heads 0 and 5
ATT2 = np.array([
    [[0.50, 0.00, 0.05, 0.15, 0.30],   # layer 3, head 0
     [0.20, 0.00, 0.40, 0.10, 0.30]],  # layer 3, head 5
    [[0.10, 0.00, 0.10, 0.20, 0.60],   # layer 7, head 0
     [0.30, 0.00, 0.20, 0.40, 0.10]],  # layer 7, head 5
], np.float16)


def attention_trace() -> dl.Trace:
    att = np.zeros((3, 1, 2, 2, 5), np.float16)
    att[0, 0, :, :, :3] = 1 / 3
    att[1, 0, :, :, :4] = 0.25
    att[2, 0] = ATT2
    return from_tokens([" The", " cat", " sat"], [ln(0.5)] * 3, prompt="Hi,", prompt_tokens=["<s>", "Hi", ","],
                       arrays={"attention": att}, attention_layers=[3, 7], attention_heads=[0, 5])


LENS_TOKENS = [[" dog", " the", " a"], [" the", " dog", " cat"], [" cat", " dog", " the"], [" cat", " cow", " dog"]]
LENS_PROBS = [[0.2, 0.1, 0.05], [0.3, 0.2, 0.1], [0.5, 0.2, 0.1], [0.9, 0.05, 0.01]]


def lens_trace() -> dl.Trace:
    """Two steps; step 1 chose ' cat', which is in the lens's top 3 at layers 1 (rank 2), 2 and 3 (rank 0)."""
    vocab = {t: i for i, t in enumerate([" The", " cat", " dog", " the", " a", " cow"])}
    ids = np.array([[[vocab[t] for t in layer] for layer in LENS_TOKENS]] * 2)[:, None]  # [2, 1, 4, 3]
    arrays = {"lens_id": ids, "lens_prob": np.array([[LENS_PROBS]] * 2, np.float32),
              "lens_entropy": np.array([[[3.0, 2.5, 1.25, 0.5]]] * 2, np.float32),
              "lens_chosen_rank": np.array([[[7, 2, 0, 0]]] * 2),
              "lens_chosen_prob": np.array([[[0.01, 0.1, 0.5, 0.9]]] * 2)}
    return from_tokens([" The", " cat"], [ln(0.5), ln(0.5)], vocab=vocab, arrays=arrays)


# ---- candidates ------------------------------------------------------------------------------------------------
def candidate_rows(markup: str) -> list[Node]:
    return [tr for tr in dom(markup).all("tr") if tr.all("td")]


def test_candidates_panel_lists_the_top_k_in_rank_order():
    tr = chosen_trace()
    html = panels.candidates_panel(tr, 1, k=3)
    title = dom(html).all("div", "dlp-title")[0]
    assert "step 1" in [b.text for b in title.all("b")]
    assert "␣cat" in title.text and "raw p=0.100 (rank 2)" in title.text and "final p=0.125" in title.text
    rows = candidate_rows(html)
    cells = [[td.text for td in r.all("td")] for r in rows]
    assert [c[0] for c in cells] == ["0", "1", "2"]
    assert [c[1] for c in cells] == ["␣dog", "␣cow", "␣cat ◀"]
    assert [(c[3], c[5]) for c in cells] == [("0.400", "0.500"), ("0.300", "0.375"), ("0.100", "0.125")]
    assert ["dlp-chosen" in r.classes for r in rows] == [False, False, True]
    assert sum("◀" in r.text for r in rows) == 1
    assert "outside this top" not in html  # the chosen token is shown


def test_candidates_bars_are_proportional_to_p_over_the_largest_p():
    tr = chosen_trace()
    rows = candidate_rows(panels.candidates_panel(tr, 1, k=4))
    # largest p shown (raw or final) is 0.5: raw 0.4, 0.3, 0.1, 0.05 and final 0.5, 0.375, 0.125, 0
    expected = [[80, 100], [60, 75], [20, 25], [10, 0]]
    assert np.allclose([widths(r) for r in rows], expected, atol=0.051)
    rows0 = candidate_rows(panels.candidates_panel(tr, 0, k=4))  # largest is the final 0.625
    assert np.allclose([widths(r) for r in rows0], [[80, 100], [40, 50], [20, 10], [10, 0]], atol=0.051)
    assert [r.all("td")[5].text for r in rows0] == ["0.625", "0.312", "0.062", "0.000"]
    assert [r.all("td")[3].text for r in rows0] == [format_prob(p) for p in (0.5, 0.25, 0.125, 0.0625)]


def test_a_chosen_token_outside_the_top_k_gets_a_note():
    html = panels.candidates_panel(chosen_trace(), 1, k=2)  # ' cat' is rank 2
    rows = candidate_rows(html)
    assert [r.all("td")[1].text for r in rows] == ["␣dog", "␣cow"]
    assert not any("dlp-chosen" in r.classes for r in rows)
    note = dom(html).all("div", "dlp-note")
    assert len(note) == 1 and note[0].text == "the chosen token ␣cat is raw rank 2, outside this top-2"

    far = hand_trace([" a", " b", " c"], k=5, chosen_rank=[0, 7, 0])  # rank 7: not among the 5 candidates
    html = panels.candidates_panel(far, 1, k=4)
    assert len(candidate_rows(html)) == 4
    assert dom(html).all("div", "dlp-note")[0].text == "the chosen token ␣b is raw rank 7, outside this top-4"
    assert "no candidates" not in html


def test_candidates_of_another_step_or_row():
    tr = hand_trace([" a", " b", " c", " d"], rows=2)
    row0, row1 = panels.candidates_panel(tr, 1, row=0), panels.candidates_panel(tr, 1, row=1)
    assert row0 != row1
    assert "alt1_1r1" in row1 and "alt1_1r1" not in row0  # hand_trace's fillers name their row
    assert "<b>step 1</b>" in row1 and "<b>step 2</b>" in panels.candidates_panel(tr, 2, row=0)
    with pytest.raises(IndexError):
        panels.candidates_panel(tr, 3, row=1)  # row 1 ended after two steps


# ---- processors ----------------------------------------------------------------------------------------------
def test_processors_panel_lists_each_processor_in_order():
    tr = chosen_trace()
    rows = [[td.text for td in r.all("td")] for r in dom(panels.processors_panel(tr, 0)).all("tr")[1:]]
    assert rows == [["Temperature", "0.00%", "3 → 3", "0.100"],
                    ["TopK", "12.50%", "3 → 1", "0.200"],
                    ["MinP", "50.00%", "1 → 0", "0.500"]]
    rows1 = [[td.text for td in r.all("td")] for r in dom(panels.processors_panel(tr, 1)).all("tr")[1:]]
    assert [r[1] for r in rows1] == ["0.00%", "25.00%", "0.00%"]
    small = hand_trace([" a", " b"])  # mass removed 0 and 0.12 at every step
    assert [r.all("td")[1].text for r in dom(panels.processors_panel(small, 1)).all("tr")[1:]] == ["0.00%", "12.00%"]


def test_processors_panel_without_processors_says_so():
    tr = from_tokens([" a", " b"], [ln(0.5), ln(0.5)])
    assert "no logits processors ran" in panels.processors_panel(tr, 0)
    assert not dom(panels.processors_panel(tr, 0)).all("table")


# ---- attention -----------------------------------------------------------------------------------------------
def test_attention_weights_for_averages_what_is_asked():
    tr = attention_trace()
    w = tr.attention_weights(2)  # [layers 3, 7][heads 0, 5][5 positions]
    assert w.shape == (2, 2, 5) and np.array_equal(w, ATT2.astype(np.float32))

    got, labels = panels.attention_weights_for(tr, 2, 0, None, None)
    assert labels == ["every layer, mean of heads"] and got.shape == (1, 5)
    np.testing.assert_allclose(got[0], w.mean(axis=(0, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[0], [0.275, 0, 0.1875, 0.2125, 0.325], atol=2e-4)  # by hand

    got, labels = panels.attention_weights_for(tr, 2, 0, 7, None)  # layer number 7 is the second recorded
    assert labels == ["layer 7, mean of heads"]
    np.testing.assert_allclose(got[0], w[1].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(got[0], [0.2, 0, 0.15, 0.3, 0.35], atol=2e-4)

    got, labels = panels.attention_weights_for(tr, 2, 0, None, 5)
    assert labels == ["every layer, head 5"]
    np.testing.assert_allclose(got[0], w[:, 1].mean(axis=0), rtol=1e-6)

    got, labels = panels.attention_weights_for(tr, 2, 0, 3, 0)
    assert labels == ["layer 3, head 0"]
    np.testing.assert_array_equal(got[0], w[0, 0])

    got, labels = panels.attention_weights_for(tr, 2, 0, 7, "all")
    assert labels == ["head 0", "head 5"] and got.shape == (2, 5)
    np.testing.assert_array_equal(got, w[1])


@pytest.mark.parametrize("layer, head, words", [(0, None, "layer 0 was not recorded"),
                                                 (None, 1, "head 1 was not recorded"),
                                                 (3, 2, "head 2 was not recorded"),
                                                 (None, "all", "needs one layer")])
def test_attention_weights_for_refuses_what_was_not_recorded(layer, head, words):
    with pytest.raises(ValueError, match=words):
        panels.attention_weights_for(attention_trace(), 2, 0, layer, head)


def context_spans(html: str) -> list[Node]:
    return dom(html).all("span", "dlp-tok")


def test_attention_panel_shades_the_context_and_marks_the_query():
    html = panels.attention_panel(attention_trace(), 2)
    spans = context_spans(html)
    assert [s.text for s in spans] == ["<s>", "Hi", ",", "␣The", "␣cat"]
    assert [s for s in spans if "dlp-query" in s.classes] == [spans[-1]]  # the query: the last token so far
    assert "the query is ␣cat (position 4)" in dom(html).all("div", "dlp-title")[0].text
    # the separator between prompt and generated tokens sits after the prompt's 3 tokens
    ctx = dom(html).all("div", "dlp-ctx")[0]
    kinds = ["sep" if "dlp-sep" in c.classes else c.text for c in ctx.children]
    assert kinds == ["<s>", "Hi", ",", "sep", "␣The", "␣cat"]
    # mean weights [0.275, 0, 0.1875, 0.2125, 0.325]: the largest darkest, a zero weight the lightest
    shades = [s.style("background") for s in spans]
    assert shades[4] == WEIGHT_SCALE[-1] and shades[1] == WEIGHT_SCALE[0]
    assert len(set(shades)) == 5
    assert [s.attrs["title"].split(" · ")[-1] for s in spans] == [
        "weight 0.2750", "weight 0.0000", "weight 0.1875", "weight 0.2125", "weight 0.3250"]


def most_attended(note: Node) -> list[tuple[int, float]]:
    """The (position, weight) pairs a note lists, in its order."""
    return [(int(p), float(w)) for w, p in re.findall(r"([\d.]+) \(pos (\d+)\)", note.text)]


def test_attention_panel_lists_the_most_attended_positions_in_descending_weight():
    tr = attention_trace()
    note = dom(panels.attention_panel(tr, 2)).all("div", "dlp-note")[0]
    assert note.text.startswith("every layer, mean of heads")
    got = most_attended(note)
    assert [p for p, _ in got] == [4, 0, 3, 2, 1]  # weights 0.325, 0.275, 0.2125, 0.1875, 0
    assert np.allclose([w for _, w in got], [0.325, 0.275, 0.2125, 0.1875, 0], atol=1.5e-3)
    note = dom(panels.attention_panel(tr, 2, layer=7, top=3)).all("div", "dlp-note")[0]
    assert note.text.startswith("layer 7, mean of heads")
    got = most_attended(note)
    assert [p for p, _ in got] == [4, 3, 0] and np.allclose([w for _, w in got], [0.35, 0.3, 0.2], atol=1.5e-3)
    # at step 1 every position got 0.25: all four listed, none shaded darker than another
    html = panels.attention_panel(tr, 1)
    assert sorted(p for p, _ in most_attended(dom(html).all("div", "dlp-note")[0])) == [0, 1, 2, 3]
    assert {s.style("background") for s in context_spans(html)} == {WEIGHT_SCALE[-1]}


def test_attention_panel_every_head_has_a_row():
    html = panels.attention_panel(attention_trace(), 2, layer=3, head="all")
    table = dom(html).all("table")[0]
    body = table.all("tr")[1:]
    assert [r.all("th")[0].text for r in body] == ["head 0", "head 5"]
    assert all(len(r.all("td")) == 5 for r in body)
    # head 0 of layer 3 attends most to position 0 (0.5), head 5 to position 2 (0.4)
    assert [[td.style("background") == WEIGHT_SCALE[-1] for td in r.all("td")] for r in body] == [
        [True, False, False, False, False], [False, False, True, False, False]]
    notes = [n.text for n in dom(html).all("div", "dlp-note")]
    assert notes[0].startswith("head 0") and notes[1].startswith("head 5")
    assert most_attended(dom(html).all("div", "dlp-note")[1])[0] == (2, 0.4)


def test_attention_panel_of_a_hand_trace_follows_its_weights():
    tr = hand_trace([" a", " b", " c", " d"], layers=3, heads=2)
    w = tr.attention_weights(3).mean(axis=(0, 1))
    order = [int(i) for i in np.argsort(-w, kind="stable")[:5]]
    note = dom(panels.attention_panel(tr, 3)).all("div", "dlp-note")[0]
    assert [p for p, _ in most_attended(note)] == order
    assert np.allclose([x for _, x in most_attended(note)], sorted(w, reverse=True)[:5], atol=5e-4)


# ---- logit lens ----------------------------------------------------------------------------------------------
def lens_rows(html: str) -> list[Node]:
    return [r for r in dom(html).all("tr") if r.all("td")]


def test_lens_panel_shows_each_layer_last_on_top_and_outlines_the_chosen_token():
    html = panels.lens_panel(lens_trace(), 1)
    rows = lens_rows(html)
    assert [r.all("th")[0].text for r in rows] == ["3", "2", "1", "0"]
    cells = [[td.text for td in r.all("td", "dlp-cell")] for r in rows]
    assert cells == [[token_label(t, 10) for t in LENS_TOKENS[layer]] for layer in (3, 2, 1, 0)]
    hits = [[("dlp-hit" in td.classes) for td in r.all("td", "dlp-cell")] for r in rows]
    assert hits == [[True, False, False], [True, False, False], [False, False, True], [False, False, False]]
    stats = [[td.text for td in r.all("td") if "num" in td.classes] for r in rows]
    assert stats == [["#0", "0.900", "0.50"], ["#0", "0.500", "1.25"], ["#2", "0.100", "2.50"], ["#7", "0.010", "3.00"]]
    # shaded by probability on LENS_SCALE: p = 0.5 is the scale's middle colour
    assert rows[1].all("td", "dlp-cell")[0].style("background") == LENS_SCALE[1]
    assert "finally chosen ␣cat" in dom(html).all("div", "dlp-title")[0].text
    assert "layers shown" not in html  # all four are


def test_lens_panel_at_step_0_outlines_nothing_where_the_chosen_token_is_absent():
    html = panels.lens_panel(lens_trace(), 0)  # ' The' is in no layer's top 3
    assert not dom(html).all("td", "dlp-hit") and "finally chosen ␣The" in dom(html).text


@pytest.mark.parametrize("max_layers, shown", [(6, [19, 15, 11, 8, 4, 0]), (2, [19, 0]), (1, [19]),
                                               (20, list(range(19, -1, -1))), (50, list(range(19, -1, -1)))])
def test_lens_panel_shows_at_most_max_layers_evenly_spread_the_last_always(max_layers, shown):
    tr = hand_trace([" a", " b", " c"], layers=20)
    html = panels.lens_panel(tr, 1, max_layers=max_layers)
    assert [int(r.all("th")[0].text) for r in lens_rows(html)] == shown
    note = f"{len(shown)} of 20 layers shown"
    assert (note in html) == (len(shown) < 20)
    # hand_trace's last layer says the chosen token first, and no other layer has it
    hits = [[("dlp-hit" in td.classes) for td in r.all("td", "dlp-cell")] for r in lens_rows(html)]
    assert hits[0] == [True, False, False] and not any(any(h) for h in hits[1:])


def test_lens_panel_of_a_row_that_has_ended():
    tr = hand_trace([" a", " b", " c", " d"], rows=2)  # row 1 has two steps
    assert "row 1 has no logit lens at step 3" in panels.lens_panel(tr, 3, row=1)
    assert "finally chosen ␣r1s1" in dom(panels.lens_panel(tr, 1, row=1)).text


@pytest.fixture(scope="module")
def lens_lm(tiny_lms):
    return tiny_lms["llama"]


def test_lens_for_some_layers_is_those_rows_of_the_whole_lens(lens_lm):
    def make():
        return lens_lm.generate("Once upon a time", max_new_tokens=4, do_sample=False, eos_token_id=[],
                                record=dl.Record(lens=True), progress=False)

    tr = make()
    assert tr.lens_layers == 2
    part = tr.lens_for([2], layers=[1])  # unembeds only step 2's layer 1 (first use)
    stats = tr.lens_stats_for([2], layers=[1])
    assert set(part["layer"]) == {1} and set(part["step"]) == {2} and len(part) == 5  # lens_top_k rows
    whole = make().lens  # a fresh trace of the same run, every step and layer unembedded at once
    same = whole[(whole["step"] == 2) & (whole["layer"] == 1)].reset_index(drop=True)
    cols = ["step", "row", "layer", "rank", "token_id", "token", "chosen"]
    assert part[cols].reset_index(drop=True).equals(same[cols])
    np.testing.assert_allclose(part["prob"].to_numpy(), same["prob"].to_numpy(), rtol=1e-5)
    whole_stats = make().lens_stats
    row = whole_stats[(whole_stats["step"] == 2) & (whole_stats["layer"] == 1)]
    assert int(stats["chosen_rank"].iloc[0]) == int(row["chosen_rank"].iloc[0])
    np.testing.assert_allclose(stats[["entropy", "chosen_prob"]].to_numpy(), row[["entropy", "chosen_prob"]].to_numpy(),
                               rtol=1e-5)
    # and the whole lens of the trace that unembedded one layer first is the same as the fresh one's
    lens = tr.lens
    assert lens[cols].equals(whole[cols]) and np.allclose(lens["prob"], whole["prob"], rtol=1e-5)


def test_lens_panel_of_a_model_trace_outlines_exactly_the_chosen_token(lens_lm):
    tr = lens_lm.generate("Once upon a time", max_new_tokens=4, do_sample=True, top_k=20, seed=3, eos_token_id=[],
                          record=dl.Record(lens=True, lens_top_k=8), progress=False)
    for step in range(tr.num_steps):
        html = panels.lens_panel(tr, step)
        lens = tr.lens_for([step])
        chosen = tr.steps["token"][step]
        rows = lens_rows(html)
        assert [int(r.all("th")[0].text) for r in rows] == [1, 0]
        for r in rows:
            layer = int(r.all("th")[0].text)
            expected = lens[lens["layer"] == layer].sort_values("rank")["token"].tolist()
            cells = r.all("td", "dlp-cell")
            assert [td.attrs["title"].split(" · ")[1] for td in cells] == [repr(t) for t in expected]
            assert [("dlp-hit" in td.classes) for td in cells] == [t == chosen for t in expected]


# ---- escaping, missing numbers, messages ----------------------------------------------------------------------
def assert_safe(markup: str, *needles: str) -> None:
    """No tag or event attribute came from data; each needle is there, escaped, as text or in an attribute."""
    d = Dom(markup)
    assert {t for t, _ in d.tags} <= {"div", "span", "b", "code", "table", "tr", "td", "th"}, markup
    assert not [a for _, attrs in d.tags for a in attrs if a.startswith("on")], markup
    seen = d.root.text + " ".join(v or "" for _, attrs in d.tags for v in attrs.values())
    for needle in needles:
        assert needle in seen, needle


def test_hostile_tokens_are_escaped_in_every_panel():
    tr = hand_trace([" a", HOSTILE, QUOTES, " b"], prompt=("<s>", HOSTILE, QUOTES))
    for step in range(4):
        assert_safe(panels.candidates_panel(tr, step))
        assert_safe(panels.processors_panel(tr, step), "TopK")
        assert_safe(panels.attention_panel(tr, step), token_label(HOSTILE, 40), token_label(QUOTES, 40))
        assert_safe(panels.attention_panel(tr, step, layer=1, head="all"), token_label(HOSTILE, 6))
        assert_safe(panels.lens_panel(tr, step))
    assert_safe(panels.candidates_panel(tr, 1), token_label(HOSTILE, 20), token_label(HOSTILE, 32), repr(HOSTILE))
    assert_safe(panels.candidates_panel(tr, 2), token_label(QUOTES, 20), repr(QUOTES))
    assert_safe(panels.lens_panel(tr, 1), token_label(HOSTILE, 10), repr(HOSTILE))
    assert_safe(panels.attention_panel(tr, 3), repr(QUOTES))  # the query's hover title
    assert_safe(panels.message(HOSTILE, "error"), HOSTILE)

    odd = from_tokens([" a"], [ln(0.5)], chooser=HOSTILE, processor_names=[QUOTES + HOSTILE],
                      arrays={"proc_mass_removed": np.zeros((1, 1, 1)), "proc_rank_before": np.zeros((1, 1, 1)),
                              "proc_rank_after": np.zeros((1, 1, 1)), "proc_prob_after": np.ones((1, 1, 1))})
    assert_safe(panels.candidates_panel(odd, 0), HOSTILE)  # the chooser's name
    assert_safe(panels.processors_panel(odd, 0), QUOTES + HOSTILE)


def test_missing_numbers_show_a_dash():
    tr = from_tokens([" a", " b"], [ln(0.25), ln(0.5)])  # tokens and logprobs, nothing else
    html = panels.candidates_panel(tr, 1)
    title = dom(html).all("div", "dlp-title")[0].text
    assert "raw p=0.500 (rank –)" in title and "final p=– (rank –)" in title
    assert "no candidates were recorded" in html

    bare = from_tokens([" a", " b"])  # not even logprobs
    assert "raw p=– (rank –) · final p=– (rank –)" in dom(panels.candidates_panel(bare, 0)).text

    no_final = from_tokens([" a"], [ln(0.5)], [[(" a", ln(0.5)), (" b", ln(0.25))]])  # no final probabilities
    rows = candidate_rows(panels.candidates_panel(no_final, 0))
    assert [[td.text for td in r.all("td")][3:] for r in rows] == [["0.500", "", "–"], ["0.250", "", "–"]]
    assert [widths(r) for r in rows] == [[100.0, 0.0], [50.0, 0.0]]


def test_message_kinds():
    info, error = dom(panels.message("nothing here")), dom(panels.message("broke", "error"))
    assert info.text == "nothing here" and error.text == "broke"
    assert info.all("div")[0].style("color") != error.all("div")[0].style("color")


def test_panel_css_styles_the_classes_the_panels_use():
    used = set()
    for html in (panels.candidates_panel(chosen_trace(), 1, k=2), panels.candidates_panel(chosen_trace(), 1, k=3),
                 panels.attention_panel(attention_trace(), 2),
                 panels.attention_panel(attention_trace(), 2, layer=3, head="all"), panels.lens_panel(lens_trace(), 1)):
        d = Dom(html)
        used |= {c for _, attrs in d.tags for c in (attrs.get("class") or "").split()}
    assert {c for c in used if c.startswith("dlp")} <= set(re.findall(r"\.(dlp[\w-]*)", panels.PANEL_CSS))
    assert {"dlp-chosen", "dlp-query", "dlp-hit", "dlp-note", "dlp-bar"} <= used
