"""HTML export: self-contained, script-free, and every piece of model text escaped."""
from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
from html.parser import HTMLParser

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

import decoderlab as dl
from decoderlab.views.display import commit_colour, escape, prob_colour, strategy_summary
from decoderlab.trace.builder import from_tokens
from decoderlab.views.html import coloured_text, trace_html
from decoderlab.trace.trace import Trace
from test_plots import row_length, row_token

NASTY = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", ' "quoted"', " 'single'", " שלום", " مرحبا",
         "\n", " a&b", "</span></div>"]


def text_trace(tokens, probs=None, forced=(), k=4, model_name="hand-made", prompt="Say something:", rows=1) -> Trace:
    """A trace with the given tokens (and raw probabilities), made by the trace builder from text alone;
    candidates are the token plus fillers.

    `rows` > 1 makes a batch: row r >= 1 says `row_token(r, s)` at step s (at probability 0.5) and
    finishes after `row_length(len(tokens), r)` steps."""
    n = len(tokens)
    probs = np.linspace(0.95, 0.05, n) if probs is None else np.asarray(probs, float)
    row_tokens = [list(tokens)] + [[row_token(r, s) for s in range(row_length(n, r))] for r in range(1, rows)]
    row_probs = [list(probs)] + [[0.5] * len(row) for row in row_tokens[1:]]
    logprobs = [[float(np.log(p)) for p in ps] for ps in row_probs]
    top = [[[(t, lp, lp)] + [(f"alt{j}<b>", float(np.log(0.01)), float(np.log(0.01))) for j in range(k - 1)]
            for t, lp in zip(row, lps)] for row, lps in zip(row_tokens, logprobs)]
    one = (lambda v: v[0]) if rows == 1 else (lambda v: v)
    steps = max(len(r) for r in row_tokens)
    return from_tokens(one(row_tokens), one(logprobs), one(top), final_logprobs=one(logprobs), prompt=prompt,
                       prompt_tokens=[prompt], model_name=model_name, chooser="sample", stop_reason="length",
                       strategy={"do_sample": True, "temperature": 0.7, "top_p": 1.0}, forced=forced,
                       arrays={"entropy": np.ones((steps, rows), np.float32),
                               "final_entropy": np.ones((steps, rows), np.float32),
                               "final_rank": np.zeros((steps, rows), np.int64)})


class Collect(HTMLParser):
    """Every tag and attribute of a page, and its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> Collect:
    c = Collect()
    c.feed(page)
    c.close()
    return c


def test_page_escapes_hostile_tokens_and_runs_nothing():
    tr = text_trace(NASTY, model_name="<script>evil()</script>", prompt='<b onclick="x()">hi</b>')
    page = trace_html(tr)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert "http://" not in page and "https://" not in page
    assert "<img src=x" not in page and "<b onclick" not in page
    for raw in ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "</span></div>", "<b onclick=", "alt0<b>"]:
        assert html.escape(raw, quote=True) in page
    assert "&lt;script&gt;evil()&lt;/script&gt;" in page  # the model name, escaped too
    assert "&quot;quoted&quot;" in page and "&#x27;single&#x27;" in page
    assert "שלום" in page and "مرحبا" in page  # right-to-left text kept as text
    assert " a&amp;b" in page

    doc = parse(page)
    tags = {t for t, _ in doc.tags}
    assert not tags & {"script", "iframe", "object", "embed", "link", "base", "form", "input", "svg", "math"}
    for tag, attrs in doc.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,")
    csp = [a["content"] for t, a in doc.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]
    text = "".join(doc.text)  # what a reader sees: the hostile strings, as text
    assert "<script>alert(1)</script>" in text and "<img src=x onerror=alert(1)>" in text


def test_page_has_no_unescaped_token_markup():
    tr = text_trace(NASTY)
    body = coloured_text(tr, style=False, legend=False)
    doc = parse(body)
    # one token span per step, and only our own tags inside
    assert [a["data-step"] for t, a in doc.tags if t == "span" and "dlh-tok" in a.get("class", "")] == \
        [str(s) for s in range(len(NASTY))]
    assert {t for t, _ in doc.tags} <= {"div", "span", "br", "bdi", "b"}


def test_coloured_text_colours_by_probability_and_marks_forced():
    tr = text_trace([" low", " high", " mid"], probs=[0.02, 0.99, 0.5], forced=(2,))
    frag = coloured_text(tr)
    assert frag.startswith("<style>")
    spans = [a for t, a in parse(frag).tags if t == "span" and "dlh-tok" in a.get("class", "")]
    colours = [re.search(r"background:(#[0-9a-f]{6})", a["style"]).group(1) for a in spans]
    assert colours == [prob_colour(0.02), prob_colour(0.99), prob_colour(0.5)]
    assert prob_colour(0.0) == "#ef8a62" and prob_colour(0.5) == "#f7f7f7" and prob_colour(1.0) == "#67a9cf"
    assert ["dlh-forced" in a["class"] for a in spans] == [False, False, True]
    # hover details: hidden inline, with the numbers and the top alternatives
    assert frag.count('class="dlh-tip" dir="ltr" style="display:none"') == 3
    assert "p = 0.020 (rank 0)" in frag and "p = 0.990" in frag
    assert frag.count('class="dlh-row dlh-chosen"') == 3
    assert "alt0&lt;b&gt;" in frag and "<b>forced</b>" in frag
    assert "final_prob" not in frag
    with pytest.raises(ValueError):
        coloured_text(tr, value="logit")
    marked = [a["data-step"] for t, a in parse(coloured_text(tr, selected=1)).tags if "dlh-selected" in a.get("class", "")]
    assert marked == ["1"]


def test_fragment_css_only_styles_its_own_classes():
    # a <style> in a notebook output is global: it must not touch the widgets' dl- classes or bare tags
    from decoderlab.views.html import CSS

    selectors = [sel.strip() for rule in re.findall(r"([^{}]+)\{", CSS) for sel in rule.split(",")]
    assert selectors and all(sel.startswith(".dlh-") for sel in selectors), selectors


def test_whitespace_and_newlines_are_visible():
    tr = text_trace(["Hi", "\n", "\tthere", "\x1b", ""])
    frag = coloured_text(tr, style=False, legend=False)
    assert '<span class="dlh-mark">↵</span><br>' in frag
    assert '<span class="dlh-mark">⇥</span>\tthere' in frag
    assert '<span class="dlh-mark">\\x1b</span>' in frag
    assert '<span class="dlh-mark">∅</span>' in frag  # an empty token still has a box to hover
    assert "<bdi>↵</bdi>" in frag and "<bdi>⇥there</bdi>" in frag  # the tip shows the token as a label


def test_page_header_prompt_and_embedded_figure():
    tr = text_trace([" a", " b", " c"])
    page = trace_html(tr)
    assert "hand-made" in page and "stop reason" in page and "length" in page
    assert "temperature=0.7" in page and "top_p" not in page  # neutral settings left out
    assert "Say something:" in page
    png = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page).group(1)
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<img" not in trace_html(tr, figure=False)


def test_repr_html_and_empty_trace():
    tr = text_trace(["<script>x</script>"])
    rep = tr._repr_html_()
    assert "<script" not in rep.lower() and "&lt;script&gt;x&lt;/script&gt;" in rep
    empty = Trace(prompt="p", prompt_ids=np.array([0]), arrays={}, token_text={0: "p"}, model_name="m")
    page = trace_html(empty)
    assert "(no tokens generated)" in page and "<img" not in page


def test_tiny_model_page(tiny_lms, tmp_path):
    lm = tiny_lms["qwen2"]
    tr = lm.generate("Write <b>bold</b> & more", max_new_tokens=8, do_sample=True, seed=3, progress=False)
    path = tmp_path / "trace.html"
    page = tr.to_html(path)
    assert path.read_text(encoding="utf-8") == page
    doc = parse(page)
    assert len([a for t, a in doc.tags if t == "span" and "dlh-tok" in a.get("class", "")]) == tr.num_steps
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "Write &lt;b&gt;bold&lt;/b&gt; &amp; more" in page
    printable = [t for t in tr.tokens if t.isprintable()]
    assert printable
    for token in printable:
        assert html.escape(token, quote=True) in page


def test_importing_html_loads_no_matplotlib():
    # the page's text needs no figure: plots (and matplotlib) is imported only where the PNG is drawn
    code = "import decoderlab.html, sys; assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def tok_steps(fragment: str) -> list[int]:
    return [int(a["data-step"]) for t, a in parse(fragment).tags if t == "span" and "dlh-tok" in a.get("class", "")]


def test_coloured_text_of_one_row_of_a_batch():
    tokens = [" alpha", " bravo", " charlie", " delta", " echo"]
    tr = text_trace(tokens, rows=2)
    n1 = row_length(len(tokens), 1)
    assert tr.rows == 2 and 1 <= n1 < len(tokens)  # row 1 finished early: padding after its last step
    row1 = coloured_text(tr, 1, style=False, legend=False)
    assert tok_steps(row1) == list(range(n1))  # padding steps are not text
    text = "".join(parse(row1).text)
    for s in range(n1):
        assert row_token(1, s) in text
    assert not [t for t in tokens if t in row1]  # none of row 0's tokens, not even in the hover boxes
    assert row1.count(f"background:{prob_colour(0.5)}") == n1  # row 1's own probabilities
    row0 = coloured_text(tr, 0, style=False, legend=False)
    assert tok_steps(row0) == list(range(len(tokens))) and row_token(1, 0) not in row0
    with pytest.raises(IndexError):
        coloured_text(tr, 2)


def test_page_shows_every_row_with_its_figure():
    tr = text_trace([" a", " b", " c", " d"], rows=2)
    page = trace_html(tr)
    assert "<h2>Generated text · row 0</h2>" in page and "<h2>Generated text · row 1</h2>" in page
    assert "4 × 2 rows" in page
    assert page.count("<img") == 2 and "Row 1. Probability" in page
    assert row_token(1, 0) in page and row_token(1, 1) in page


def test_page_names_the_strategy_in_the_shared_wording():
    tr = text_trace([" a", " b"])
    page = trace_html(tr, figure=False)
    assert escape(strategy_summary(tr)) in page
    assert "chooser: sample · do_sample=True · temperature=0.7" in page


def test_page_of_a_lens_trace_has_the_commit_strip(tiny_lms):
    tr = tiny_lms["llama"].generate("A page with a lens", max_new_tokens=5, eos_token_id=[], progress=False,
                                    record=dl.Record(lens=True))
    page = trace_html(tr)
    cells = re.findall(r"class='dlp-commit[^']*' data-step='(\d+)' style='background:(#[0-9a-f]{6})'", page)
    assert [int(s) for s, _ in cells] == list(range(tr.num_steps))
    assert [c for _, c in cells] == [commit_colour(x, tr.lens_layers) for x in tr.steps.commit_layer]
    assert "Where the model made up its mind" in page and ".dlp-commit{" in page
    assert "dlp-commit" not in trace_html(text_trace([" a", " b"]))  # no lens: no strip, no panel CSS


def test_page_with_knobs_draws_the_heatmaps_of_trace_knobs(tiny_lms):
    from decoderlab.views.panels import knobs_heatmaps

    tr = tiny_lms["llama"].generate("A page with knobs", max_new_tokens=4, do_sample=True, seed=2, eos_token_id=[],
                                    progress=False, record=dl.Record(logits=True))
    chosen = int(tr.choices.token_id[1])
    page = trace_html(tr, knobs=[(1, chosen)])
    assert knobs_heatmaps(tr.knobs(1, chosen), tr.token_text[chosen]) in page
    assert ".dlk-cell{" in page and "Which knob decided · step 1" in page
    assert "dlk-cell" not in trace_html(tr)  # asked for, not by default
