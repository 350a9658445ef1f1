"""Figures from `decoderlab.plots`: built from hand-made traces (no model), checked for what they show."""
from __future__ import annotations

import logging
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.legend
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

import decoderlab as dl
from decoderlab import plots
from decoderlab.views.display import token_label
from decoderlab.views.plots import MAX_LABELS
from decoderlab.trace.builder import from_tokens
from decoderlab.trace.trace import Trace

PROCESSORS = ["TemperatureLogitsWarper", "TopKLogitsWarper"]


def hand_trace(tokens, k=5, prompt=("<s>", "Hello", ",", " world"), layers=3, heads=2, lens_k=3,
               chosen_rank=None, forced=(), seed=0, rows=1) -> Trace:
    """A trace made by hand through the trace builder: `tokens` generated; the chosen token at raw rank
    `chosen_rank[s]` (0 default, >= k puts it outside the candidates), attention and logit lens over
    `layers` x `heads`.

    `rows` > 1 makes a batch: row r >= 1 says `row_token(r, s)` at step s and finishes after
    `row_length(len(tokens), r)` steps."""
    rng = np.random.default_rng(seed)
    vocab: dict[str, int] = {}

    def tid(text: str) -> int:
        return vocab.setdefault(text, len(vocab))

    n, p, b = len(tokens), len(prompt), rows
    chosen_rank = chosen_rank or [0] * n
    row_tokens = [list(tokens)] + [[row_token(r, s) for s in range(row_length(n, r))] for r in range(1, b)]
    for row in row_tokens:
        for t in row:
            tid(t)
    logprobs, final_logprobs, top = [], [], []
    for r, row in enumerate(row_tokens):
        lp, flp, alts_row = [], [], []
        for s, text in enumerate(row):
            probs = np.sort(rng.dirichlet(np.full(k + 1, 0.5)))[::-1][:k]
            final = probs.copy()
            final[3:] = 0
            final /= final.sum()
            fillers = [f"alt{s}_{j}" if r == 0 else f"alt{s}_{j}r{r}" for j in range(k)]
            c = chosen_rank[s]
            if c < k:
                fillers[c] = text
            with np.errstate(divide="ignore"):
                alts_row.append([(f, float(np.log(pr)), float(np.log(fp))) for f, pr, fp in zip(fillers, probs, final)])
            lp.append(float(np.log(probs[c])) if c < k else float(np.log(1e-4)))
            flp.append(float(np.log(max(final[c], 1e-12))) if c < k else float(np.log(1e-12)))
        logprobs.append(lp)
        final_logprobs.append(flp)
        top.append(alts_row)
    rank = np.tile(np.array(chosen_rank)[:, None], (1, b))
    cand_logit = np.full((n, b, k), np.nan, np.float32)  # raw logits: ranked as the raw probabilities
    for r, alts_row in enumerate(top):
        for s, alts in enumerate(alts_row):
            cand_logit[s, r] = [a[1] for a in alts]
    att = np.zeros((n, b, layers, heads, p + n - 1), np.float16)
    for s in range(n):
        for r in range(b):
            w = rng.random((layers, heads, p + s))
            att[s, r, :, :, : p + s] = w / w.sum(-1, keepdims=True)
    lens_id = np.array([[[[tid(f"lens{l}_{j}") for j in range(lens_k)] for l in range(layers)]] * b for _ in range(n)])
    for r, row in enumerate(row_tokens):  # the last layer agrees with the final choice
        lens_id[: len(row), r, -1, 0] = [vocab[t] for t in row]
    arrays = {
        "rank": rank, "final_rank": rank, "cand_logit": cand_logit,
        "entropy": rng.random((n, b)).astype(np.float32) * 3, "final_entropy": rng.random((n, b)).astype(np.float32),
        "proc_mass_removed": np.tile(np.array([0.0, 0.12], np.float32), (n, b, 1)),
        "proc_rank_before": np.zeros((n, b, 2), np.int64), "proc_rank_after": np.zeros((n, b, 2), np.int64),
        "proc_prob_after": np.exp(np.tile(np.array([r + [0] * (n - len(r)) for r in final_logprobs]).T[:, :, None],
                                          (1, 1, 2))),
        "attention": att, "lens_id": lens_id,
        "lens_prob": (np.sort(rng.random((n, b, layers, lens_k)), -1)[..., ::-1] / lens_k),
        "lens_entropy": rng.random((n, b, layers)), "lens_chosen_rank": np.tile(np.arange(layers)[::-1], (n, b, 1)),
        "lens_chosen_prob": rng.random((n, b, layers)),
    }
    return from_tokens(row_tokens if b > 1 else row_tokens[0], logprobs if b > 1 else logprobs[0],
                        top if b > 1 else top[0], final_logprobs=final_logprobs if b > 1 else final_logprobs[0],
                        prompt="".join(prompt), prompt_tokens=prompt, model_name="hand-made", chooser="sample",
                        stop_reason="length", forced=forced, vocab=vocab, arrays=arrays,
                        processor_names=PROCESSORS, attention_layers=range(layers), attention_heads=range(heads),
                        lens_top_k=lens_k)


def row_token(row: int, step: int) -> str:
    """The token row `row` >= 1 of a hand-made batch says at `step`: never one of row 0's."""
    return f" r{row}s{step}"


def row_length(n: int, row: int) -> int:
    """How many steps row `row` of an n-step hand-made batch runs before it finishes: row 0 all,
    each later row two fewer (at least one)."""
    return n if row == 0 else max(1, n - 2 * row)


@pytest.fixture
def small():
    return hand_trace([" The", " cat", " sat", "\n", " on", " the", " mat", "."], forced=(2,))


@pytest.fixture(scope="module")
def long_trace():
    return hand_trace([f" w{i}" for i in range(500)])


def draw(fig: Figure) -> list[str]:
    """Render the figure with Agg; return the text of every warning raised while drawing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FigureCanvasAgg(fig).draw()
    return [str(w.message) for w in caught]


def tick_texts(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


# ---- token_label --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, label", [
    (" hello", "␣hello"),
    ("hi  ", "hi␣␣"),
    ("a b", "a b"),
    ("   ", "␣␣␣"),
    ("\n", "↵"),
    ("\n\n", "↵↵"),
    ("\tx", "⇥x"),
    ("\x1b[0m", "\\x1b[0m"),
    ("a\u200bb", "a\\u200bb"),
    ("\u00a0", "\\xa0"),
    ("", "∅"),
    ("中文", "中文"),
    ("😀", "😀"),
    ("שלום", "שלום"),
])
def test_token_label_makes_tokens_visible(text, label):
    assert token_label(text) == label


def test_token_label_truncates_long_tokens_without_splitting_escapes():
    assert token_label("x" * 40, max_len=10) == "x" * 9 + "…"
    assert len(token_label("abcdefghijklmnopqrstuvwxyz")) == 16
    assert token_label("ab" + "\x01" * 5, max_len=8) == "ab\\x01…"  # the next escape would not fit whole
    assert token_label("short", max_len=10) == "short"


# ---- distribution ---------------------------------------------------------------------------------------
def test_distribution_bars_and_chosen_token_marked(small):
    fig = plots.distribution(small, 1)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    bars = [bar for container in ax.containers for bar in container]
    assert len(bars) == 2 * 5  # raw and final bar per candidate
    chosen = [bar for bar in bars if bar.get_gid() == "chosen"]
    assert len(chosen) == 2  # the chosen token's raw and final bars, at rank 0
    assert {to_rgba(plots.CHOSEN_RAW_COLOR), to_rgba(plots.CHOSEN_FINAL_COLOR)} == {bar.get_facecolor() for bar in chosen}
    assert all(bar.get_hatch() == plots.CHOSEN_HATCH for bar in chosen)
    assert all(bar.get_facecolor() in (to_rgba(plots.RAW_COLOR), to_rgba(plots.FINAL_COLOR))
               for bar in bars if bar.get_gid() != "chosen")
    notes = [t for t in ax.texts if t.get_gid() == "chosen-annotation"]
    assert len(notes) == 1 and "chosen" in notes[0].get_text()
    assert abs(notes[0].xy[0] - (0 - 0.2)) < 0.5  # points at rank 0
    assert tick_texts(ax.xaxis)[0] == "␣cat"
    box = [leg for leg in ax.findobj(matplotlib.legend.Legend) if leg.get_gid() == "processors"][0]
    assert box.get_title().get_text() == "mass removed"
    assert [t.get_text() for t in box.get_texts()] == ["Temperature   0.00%", "TopK         12.00%"]
    assert not [w for w in draw(fig) if "Glyph" in w]


def test_distribution_k_and_chosen_outside_top_k():
    tr = hand_trace([" a", " b", " c"], k=6, chosen_rank=[0, 4, 9])
    fig = plots.distribution(tr, 1, k=3)
    ax = fig.axes[0]
    assert sum(len(c) for c in ax.containers) == 6
    assert not [b for c in ax.containers for b in c if b.get_gid() == "chosen"]  # rank 4 is not among the 3 shown
    note = [t for t in ax.texts if t.get_gid() == "chosen-annotation"][0].get_text()
    assert "raw rank 4" in note and "outside" in note
    fig = plots.distribution(tr, -1)  # negative steps count from the end; rank 9 is not recorded at all
    assert "raw rank 9" in [t for t in fig.axes[0].texts if t.get_gid() == "chosen-annotation"][0].get_text()
    with pytest.raises(IndexError):
        plots.distribution(tr, 3)


# ---- timeline and heat maps ----------------------------------------------------------------------------
def test_probability_timeline_shows_tokens_and_marks_forced(small):
    fig = plots.probability_timeline(small)
    prob_ax, ent_ax = fig.axes[:2]
    assert tick_texts(ent_ax.xaxis) == ["␣The", "␣cat", "␣sat", "↵", "␣on", "␣the", "␣mat", "."]
    heights = [b.get_height() for b in prob_ax.patches]
    assert np.allclose(heights, small.steps["prob"], atol=1e-6)
    forced = [l for l in prob_ax.get_lines() if l.get_label() == "forced"]
    assert len(forced) == 1 and list(forced[0].get_xdata()) == [2]
    assert len(ent_ax.get_lines()) == 2  # raw and final entropy


def test_probability_timeline_of_one_row_of_a_batch():
    tokens = [" The", " cat", " sat", " on", " the", " mat"]
    tr = hand_trace(tokens, rows=2)
    n1 = row_length(len(tokens), 1)
    assert list(tr.alive_steps(1)) == list(range(n1)) and n1 < len(tokens)  # row 1 finished early
    fig = plots.probability_timeline(tr, row=1)
    prob_ax, ent_ax = fig.axes[:2]
    assert tick_texts(ent_ax.xaxis) == [token_label(row_token(1, s)) for s in range(n1)]  # no padding steps
    row1 = tr.steps[tr.steps["row"] == 1].iloc[:n1]
    assert np.allclose([b.get_x() + b.get_width() / 2 for b in prob_ax.patches], range(n1))  # one bar a step
    assert np.allclose([b.get_height() for b in prob_ax.patches], row1["prob"], atol=1e-6)
    assert not np.allclose(row1["prob"], tr.steps[tr.steps["row"] == 0]["prob"].iloc[:n1])  # row 1's own numbers
    assert "row 1" in fig._suptitle.get_text() and f"{n1} steps" in fig._suptitle.get_text()
    row0 = tick_texts(plots.probability_timeline(tr, row=0).axes[1].xaxis)
    assert row0 == [token_label(t) for t in tokens]
    with pytest.raises(IndexError):
        plots.probability_timeline(tr, row=2)


def test_step_windows_of_one_row_skip_its_padding():
    tokens = [f" w{i}" for i in range(6)]
    tr = hand_trace(tokens, rows=2)
    n1 = row_length(len(tokens), 1)
    fig = plots.candidates_heatmap(tr, k=3, row=1)
    assert fig.axes[0].images[0].get_array().shape == (n1, 3)
    assert tick_texts(fig.axes[0].yaxis) == [f"{s}: {token_label(row_token(1, s))}" for s in range(n1)]
    fig = plots.attention_map(tr, layer=0, row=1)
    m = fig.axes[0].images[0].get_array()
    assert m.shape == (n1, 4 + n1 - 1)
    for s in range(n1):
        assert np.allclose(m[s, : 4 + s], tr.attention_weights(s, 1)[0].mean(0))  # row 1's weights
    assert [t.split(": ")[1] for t in tick_texts(fig.axes[0].yaxis)] == [token_label(row_token(1, s)) for s in range(n1)]


def test_long_trace_is_windowed(long_trace):
    fig = plots.probability_timeline(long_trace)
    labels = tick_texts(fig.axes[1].xaxis)
    assert len(labels) == plots.DEFAULT_WINDOW and labels[-1] == "␣w499"  # the most recent steps
    fig = plots.probability_timeline(long_trace, start=100, window=30)
    assert tick_texts(fig.axes[1].xaxis)[0] == "␣w100" and len(fig.axes[0].patches) == 30
    fig = plots.probability_timeline(long_trace, window=None)  # everything: labels thinned, bars all there
    assert len(fig.axes[0].patches) == 500
    assert 0 < len(tick_texts(fig.axes[1].xaxis)) <= MAX_LABELS
    fig = plots.candidates_heatmap(long_trace)
    assert fig.axes[0].images[0].get_array().shape == (40, 5)
    assert tick_texts(fig.axes[0].yaxis)[-1].startswith("499:")
    fig = plots.attention(long_trace, 499)  # context of 503 positions
    assert len(tick_texts(fig.axes[0].xaxis)) <= MAX_LABELS
    fig = plots.attention_map(long_trace, layer=0)
    assert fig.axes[0].images[0].get_array().shape == (plots.DEFAULT_WINDOW, plots.DEFAULT_WINDOW)
    assert len(tick_texts(fig.axes[0].xaxis)) <= MAX_LABELS and len(tick_texts(fig.axes[0].yaxis)) <= MAX_LABELS


def test_candidates_heatmap_shape_text_and_chosen_outline():
    tr = hand_trace([" a", " b", " c", " d"], k=6, chosen_rank=[0, 2, 1, 7])
    fig = plots.candidates_heatmap(tr, k=4)
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (4, 4)
    assert np.allclose(image, np.clip(tr.arrays["cand_prob"][:, 0, :4], 1e-3, 1))
    assert len(ax.texts) == 16
    outlines = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_gid() == "chosen"]
    assert outlines == [(0, 0), (2, 1), (1, 2)]  # (rank, step); step 3's choice is outside the top 4
    assert tick_texts(ax.yaxis)[3] == "3: ␣d (#7)"
    assert [t.get_text() for t in ax.texts[:2]] == ["␣a", "alt0_1"]


def test_candidates_heatmap_final_linear():
    tr = hand_trace([" a", " b"], k=5)
    fig = plots.candidates_heatmap(tr, final=True, log=False)
    assert np.allclose(fig.axes[0].images[0].get_array(), tr.arrays["cand_final_prob"][:, 0])


# ---- attention -------------------------------------------------------------------------------------------
def test_attention_views(small):
    step = 3  # context: 4 prompt tokens + 3 generated
    w = small.attention_weights(step)
    fig = plots.attention(small, step)  # layers x positions, mean over heads
    ax = fig.axes[0]
    assert np.allclose(ax.images[0].get_array(), w.mean(1))
    assert tick_texts(ax.xaxis) == ["<s>", "Hello", ",", "␣world", "␣The", "␣cat", "␣sat"]
    assert tick_texts(ax.yaxis) == ["0", "1", "2"]
    fig = plots.attention(small, step, layer=1, head="all")  # heads x positions
    assert np.allclose(fig.axes[0].images[0].get_array(), w[1])
    fig = plots.attention(small, step, layer=2)  # bars: the mean over heads
    heights = [b.get_height() for b in fig.axes[0].patches]
    assert np.allclose(heights, w[2].mean(0), atol=1e-6)
    fig = plots.attention(small, step, layer=-1, head=1)
    assert np.allclose([b.get_height() for b in fig.axes[0].patches], w[2, 1], atol=1e-6)
    assert "head 1" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="not recorded"):
        plots.attention(small, step, layer=7)
    with pytest.raises(ValueError, match="not recorded"):
        plots.attention(small, step, layer=0, head=5)


def test_attention_window_positions(small):
    fig = plots.attention(small, 7, layer=0, window=5)
    assert len(fig.axes[0].patches) == 5
    assert tick_texts(fig.axes[0].xaxis) == ["␣sat", "↵", "␣on", "␣the", "␣mat"]  # the most recent five of 11
    assert "earlier hidden" in fig.axes[0].get_xlabel()


def test_attention_map_masks_positions_outside_each_steps_context(small):
    fig = plots.attention_map(small, layer=1, head=0)
    m = fig.axes[0].images[0].get_array()
    assert m.shape == (8, 4 + 7)
    att = small.arrays["attention"][:, 0, 1, 0].astype(np.float32)
    for s in range(8):
        assert np.allclose(m[s, : 4 + s], att[s, : 4 + s])
        assert m.mask[s, 4 + s :].all()


# ---- lens ---------------------------------------------------------------------------------------------
def test_lens_table_highlights_chosen(small):
    fig = plots.lens(small, 4)
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (3, 3)  # layers x lens top-k
    outlines = [(p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if p.get_gid() == "chosen"]
    assert outlines == [(0, 2)]  # the last layer's top token is the chosen one
    assert [t.get_text() for t in ax.texts if t.get_position() == (0, 2)] == ["␣on"]
    assert tick_texts(fig.axes[1].yaxis)[0].startswith("#2")  # the chosen token's rank at layer 0


def test_commitment_plot_ranks_and_commit_layers_from_a_hand_made_lens():
    tr = hand_trace([" a", " b", " c", " d"], layers=4)
    # the chosen token's lens rank per (step, layer): committed at 0, at 2, at 3, and never (not top-1 at the last)
    ranks = np.array([[0, 0, 0, 0], [5, 1, 0, 0], [0, 0, 3, 0], [0, 0, 0, 2]])
    tr.arrays["lens_chosen_rank"] = ranks[:, None, :]
    assert tr.steps.commit_layer.tolist()[:3] == [0, 2, 3] and tr.steps.commit_layer.isna().tolist() == [False] * 3 + [True]
    fig = plots.commitment(tr)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), ranks.T + 1)  # layers x steps, rank + 1
    dots, cross = ax.lines
    assert dots.get_xdata().tolist() == [0, 1, 2] and dots.get_ydata().tolist() == [0, 2, 3]
    assert cross.get_xdata().tolist() == [3]
    assert tick_texts(ax.xaxis)[1].endswith("␣b")
    no_lens = hand_trace([" a"])
    for name in [n for n in no_lens.arrays if n.startswith("lens_")]:
        del no_lens.arrays[name]
    with pytest.raises(ValueError, match="no logit lens"):
        plots.commitment(no_lens)


# ---- fonts, glyphs and odd text ---------------------------------------------------------------------------
def _has_font(*names):
    return any(n in plots.font_families() for n in names)


@pytest.mark.skipif(not _has_font("Noto Sans CJK JP", "Noto Sans CJK SC", "WenQuanYi Zen Hei", "Droid Sans Fallback"),
                    reason="no CJK font installed (Debian: fonts-noto-cjk)")
@pytest.mark.skipif(not _has_font("Symbola", "Noto Emoji", "Segoe UI Emoji"),
                    reason="no monochrome emoji font installed (Debian: fonts-symbola)")
def test_cjk_and_emoji_draw_without_missing_glyphs(caplog):
    caplog.set_level(logging.WARNING, logger="matplotlib.font_manager")
    tr = hand_trace(["中文", " 日本語", "한국어", "😀", "🚀", " 👍", "🤖!", "é"])
    figs = [plots.distribution(tr, 0), plots.probability_timeline(tr), plots.candidates_heatmap(tr),
            plots.attention(tr, 7, layer=0), plots.attention_map(tr, 0), plots.lens(tr, 3)]
    for fig in figs:
        assert not [w for w in draw(fig) if "missing from font" in w]
    labels = tick_texts(figs[1].axes[1].xaxis)
    assert labels == ["中文", "␣日本語", "한국어", "😀", "🚀", "␣👍", "🤖!", "é"]  # drawn as themselves, not escaped
    assert not [r for r in caplog.records if "findfont" in r.getMessage()]  # every listed family resolved


def test_glyphs_no_font_has_are_spelled_out_not_warned():
    # U+E000 is private use (escaped by token_label); U+1FAE0 (melting face, Unicode 14) is in few fonts.
    tr = hand_trace(["\ue000", "\U0001fae0", " ok"])
    fig = plots.probability_timeline(tr)
    assert not [w for w in draw(fig) if "missing from font" in w]
    labels = tick_texts(fig.axes[1].xaxis)
    assert labels[0] == "\\ue000"
    assert labels[1] in ("\U0001fae0", "[U+1FAE0]")


def test_dollar_signs_are_text_not_mathtext():
    tr = hand_trace(["$", "$x$", " \\frac{$", "$$"])
    fig = plots.probability_timeline(tr)
    assert not draw(fig)  # an unescaped '$\frac{$' would fail to parse as mathtext
    renderer = fig.canvas.get_renderer()
    labels = fig.axes[1].xaxis.get_ticklabels()
    assert [lab._preprocess_math(lab.get_text()) for lab in labels] == [
        ("$", False), ("$x$", False), ("␣\\frac{$", False), ("$$", False)]
    assert all(lab.get_window_extent(renderer).width > 0 for lab in labels)


def test_figures_are_not_kept_by_pyplot(small):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = plots.lens(small, 0)
    assert plt.get_fignums() == before  # never shown twice by the inline backend, freed when dropped
    assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # Jupyter shows it without pyplot


# ---- a real (tiny) model ----------------------------------------------------------------------------------
def test_all_figures_on_a_tiny_model_trace(tiny_lms):
    lm = tiny_lms["llama"]
    tr = lm.generate("Hello there, how are", max_new_tokens=6, do_sample=True, top_k=20, temperature=0.9, seed=1,
                     progress=False, record=dl.Record(attention=True, lens=True, top_k=8))
    n = tr.num_steps
    assert n > 0
    figs = {
        "distribution": plots.distribution(tr, 0),
        "timeline": plots.probability_timeline(tr),
        "candidates": plots.candidates_heatmap(tr, k=8),
        "attention": plots.attention(tr, n - 1),
        "heads": plots.attention(tr, n - 1, layer=1, head="all"),
        "map": plots.attention_map(tr, 0),
        "lens": plots.lens(tr, n - 1),
    }
    for name, fig in figs.items():
        assert not [w for w in draw(fig) if "Glyph" in w], name
    assert sum(len(c) for c in figs["distribution"].axes[0].containers) == 16
    assert figs["candidates"].axes[0].images[0].get_array().shape == (n, 8)
    assert figs["heads"].axes[0].images[0].get_array().shape == (4, len(tr.prompt_ids) + n - 1)
    assert figs["lens"].axes[0].images[0].get_array().shape == (2, 5)  # 2 layers x lens_top_k 5


def test_right_to_left_labels_in_visual_order():
    tr = hand_trace(["שלום", " مرحبا", "a שָׁלוֹם!"])
    labels = tick_texts(plots.probability_timeline(tr).axes[1].xaxis)
    assert labels == ["םולש", "␣ابحرم", "a םוֹלשָׁ!"]  # matplotlib draws left to right; marks stay on their letter
    assert token_label("שלום") == "שלום"  # the public label keeps logical order (HTML does its own bidi)


def test_beam_tree_draws_every_candidate_and_the_returned_paths(tiny_lms):
    tr = tiny_lms["llama"].generate("Once upon a time", num_beams=3, num_return_sequences=2, max_new_tokens=5,
                                    eos_token_id=[], progress=False)
    fig = plots.beam_tree(tr)
    ax = fig.axes[0]
    beams = tr.beams
    # one marker per candidate, one bold line per step of each returned row after the first
    assert sum(len(c.get_offsets()) for c in ax.collections) == len(beams)
    for row in range(tr.rows):
        bold = [l for l in ax.lines if l.get_gid() == f"row-{row}"]
        assert len(bold) == tr.runs.length[row] - 1
    scores = [t.get_text() for t in ax.texts if t.get_gid() == "finished-score"]
    assert len(scores) == (beams.fate == "finished").sum()
    assert f"{tr.runs.score[0]:.2f}" in scores
    assert not draw(fig)
    with pytest.raises(ValueError, match="not a beam search"):
        plots.beam_tree(hand_trace([" a", " b"]))


def test_figures_fit_their_canvas():
    """Nothing is cut off: every figure's drawn parts (tick labels, legends, colour bars, titles) lie inside the
    figure, so `fig.savefig(path)` without `bbox_inches="tight"` keeps them all. Checked on a short trace and on
    a SmolLM2-sized one (30 layers, 9 heads, 120 steps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    for tr in (hand_trace([" The", " cat", " sat", "\n", " on"]),
               hand_trace([f" word{i}" for i in range(120)], layers=30, heads=9, lens_k=5)):
        last = tr.num_steps - 1
        figs = {"distribution": plots.distribution(tr, last), "timeline": plots.probability_timeline(tr),
                "candidates": plots.candidates_heatmap(tr), "attention": plots.attention(tr, last),
                "heads": plots.attention(tr, last, layer=1, head="all"), "bars": plots.attention(tr, last, layer=1),
                "map": plots.attention_map(tr, 1), "lens": plots.lens(tr, last)}
        for name, fig in figs.items():
            canvas = FigureCanvasAgg(fig)
            canvas.draw()
            drawn, page = fig.get_tightbbox(canvas.get_renderer()), fig.bbox_inches
            assert drawn.x0 >= page.x0 - 0.01 and drawn.y0 >= page.y0 - 0.01, (name, drawn, page)
            assert drawn.x1 <= page.x1 + 0.01 and drawn.y1 <= page.y1 + 0.01, (name, drawn, page)
