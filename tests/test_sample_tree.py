"""Sample trees (`lm.sample_tree`): n sampled runs of one prompt, one batch sharing the prompt's prefill, merged into
a prefix tree. Every path is its seed's run made alone; counts, probabilities and entropies are checked against
hand computations from the runs and from plain forwards of the model; the views escape what the model says."""
from __future__ import annotations

import math
import re
import statistics
import time
import warnings

import pytest
import torch

import decoderlab as dl
from decoderlab.trace.builder import from_tokens
from decoderlab.trace.sample_tree import SampleTree
from decoderlab.views import tree_view
from decoderlab.views.display import escape, prob_colour
from decoderlab.views.tree_view import CSP, CSS_CLASSES, SampleTreeView, tree_html, tree_svg

PROMPT = "Once upon a time, in a land far away,"
WORDS = dict(top_k=3, temperature=0.8)  # few candidates: runs share prefixes, and part
N, STEPS, SEED = 8, 8, 5


def ending_eos(lm, steps: int = STEPS) -> list[int]:
    """An EOS id drawn from one of the tree's own runs (its token at step 3), so that some runs end early: found,
    not hard-coded."""
    run = lm.generate(PROMPT, seed=SEED + 1, do_sample=True, max_new_tokens=steps, eos_token_id=[], progress=False,
                      **WORDS)
    return [run.token_ids[3]]


def make_tree(lm, eos=None, **extra) -> SampleTree:
    words = dict(WORDS, **extra)
    if eos is not None:
        words["eos_token_id"] = eos
    return lm.sample_tree(PROMPT, n=N, seed=SEED, max_new_tokens=STEPS, progress=False, **words)


@pytest.fixture(scope="module")
def llama(tiny_lms):
    return tiny_lms["llama"]


@pytest.fixture(scope="module")
def tree(llama):
    return make_tree(llama, eos=ending_eos(llama))


def prefix_of(tree: SampleTree, node: int) -> tuple[int, ...]:
    nd = tree.nodes
    return tuple(int(nd["token_id"].iat[v]) for v in tree.path_to(node)[1:])


# ---- every path is its seed's run --------------------------------------------------------------------------
def test_every_path_is_the_run_its_seed_makes_alone(tiny_lm):
    eos = ending_eos(tiny_lm)
    tree = make_tree(tiny_lm, eos=eos)
    assert tree.seeds == list(range(SEED, SEED + N)) and tree.runs.seed.tolist() == tree.seeds
    for seed in tree.seeds:
        alone = tiny_lm.generate(PROMPT, seed=seed, do_sample=True, max_new_tokens=STEPS, eos_token_id=eos,
                                 progress=False, **WORDS)
        path = tree.path(seed)
        assert path.token_id.tolist() == alone.token_ids, (tiny_lm.name, seed)
        run = tree.runs[tree.runs.seed == seed].iloc[0]
        assert list(run.token_ids) == alone.token_ids and run.text == alone.text
        assert run.stop_reason == alone.stop_reason
        assert int(run.leaf) == int(path.node.iat[-1])
        assert run.logprob == pytest.approx(float(alone.steps.logprob.sum()), abs=1e-3)  # a batched forward's rounding
    assert "eos" in tree.runs.stop_reason.tolist(), "the EOS taken from a run should end at least one run"


def test_the_prompt_is_prefilled_once(llama):
    """One forward over the whole prompt, for one row; then one token per running row per step."""
    prompt_len = llama.encode(PROMPT)[0].shape[1]
    shapes = []
    hook = llama.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    try:
        tree = make_tree(llama)
    finally:
        hook.remove()
    assert [s for s in shapes if s[1] == prompt_len] == [(1, prompt_len)]
    assert shapes[0] == (1, prompt_len)
    assert all(s == (N, 1) for s in shapes[1:])  # no EOS here: every row runs to the end
    assert len(shapes) == STEPS  # the last token is never forwarded (as generate)
    assert tree.n == N


def test_forward_time_records_prefill_every_row_and_keep_the_runs(llama):
    """Attention rows and lens residuals are captured inside the forwards, one per row: there the prompt is
    forwarded for every row, and the runs are the same."""
    shared = make_tree(llama)
    shapes = []
    hook = llama.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                                 with_kwargs=True)
    try:
        recorded = make_tree(llama, record=dl.Record(attention=True, lens=True))
    finally:
        hook.remove()
    assert shapes[0][0] == N
    assert recorded.runs.token_ids.tolist() == shared.runs.token_ids.tolist()
    assert recorded.trace.has_attention and recorded.trace.attention_weights(0, row=N - 1).shape[0] == 2


# ---- counts, probabilities, entropies ----------------------------------------------------------------------
def test_counts_are_the_runs_through_each_node(tree):
    runs = [tuple(t) for t in tree.runs.token_ids]
    nd = tree.nodes
    assert nd.node.tolist() == list(range(len(nd))) and int(nd["count"].iat[0]) == N
    assert len({prefix_of(tree, v) for v in range(len(nd))}) == len(nd)  # one node per distinct prefix
    for v in range(len(nd)):
        prefix = prefix_of(tree, v)
        through = [r for r, toks in enumerate(runs) if toks[: len(prefix)] == prefix]
        assert int(nd["count"].iat[v]) == len(through), v
        assert list(nd["rows"].iat[v]) == through
        assert int(nd["ends"].iat[v]) == sum(toks == prefix for toks in runs)
        assert int(nd["depth"].iat[v]) == len(prefix)
        kids = tree.children(v)
        assert int(nd["count"].iat[v]) == sum(int(nd["count"].iat[k]) for k in kids) + int(nd["ends"].iat[v])
        assert [int(nd["count"].iat[k]) for k in kids] == sorted((int(nd["count"].iat[k]) for k in kids), reverse=True)
    assert (nd["count"] > 1).sum() > 1 and (nd["children"] > 1).any(), "runs should share prefixes and part"
    assert sorted(tree.runs.leaf.tolist()) == sorted(v for v in range(len(nd)) for _ in range(int(nd["ends"].iat[v])))


def test_node_probabilities_are_the_models(llama, tree):
    """Each node's numbers from a plain forward of the model on its prefix: softmax of the last logits (raw), and
    of the logits / temperature with all but the top k set to -inf (final)."""
    assert tree.trace.processor_names == ["TemperatureLogitsWarper", "TopKLogitsWarper"]
    ids = llama.encode(PROMPT)[0][0].tolist()
    nd = tree.nodes

    def distributions(prefix):
        with torch.no_grad():
            logits = llama.model(input_ids=torch.tensor([ids + list(prefix)])).logits[0, -1].double()
        scaled = logits / WORDS["temperature"]
        kth = torch.topk(scaled, WORDS["top_k"]).values[-1]
        final = torch.softmax(torch.where(scaled < kth, torch.tensor(-math.inf, dtype=torch.float64), scaled), -1)
        return torch.softmax(logits, -1), final

    def entropy(p):
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    for v in range(1, len(nd)):
        raw, final = distributions(prefix_of(tree, int(nd["parent"].iat[v])))
        t = int(nd["token_id"].iat[v])
        assert nd["prob"].iat[v] == pytest.approx(float(raw[t]), rel=1e-4, abs=1e-7), v
        assert nd["final_prob"].iat[v] == pytest.approx(float(final[t]), rel=1e-4, abs=1e-7), v
        assert nd["logprob"].iat[v] == pytest.approx(math.log(float(raw[t])), abs=1e-4)
        path = tree.path_to(v)[1:]
        assert nd["cum_logprob"].iat[v] == pytest.approx(sum(float(nd["logprob"].iat[u]) for u in path), abs=1e-9)
    for v in range(len(nd)):
        if tree.children(v):
            raw, final = distributions(prefix_of(tree, v))
            assert nd["entropy"].iat[v] == pytest.approx(entropy(raw), rel=1e-4), v
            assert nd["final_entropy"].iat[v] == pytest.approx(entropy(final), rel=1e-4, abs=1e-6), v
            mass = sum(float(final[int(nd["token_id"].iat[k])]) for k in tree.children(v))
            assert nd["branch_mass"].iat[v] == pytest.approx(mass, rel=1e-4)
        else:
            assert math.isnan(nd["entropy"].iat[v]) and math.isnan(nd["split_entropy"].iat[v])


def test_split_entropy_by_hand(tree):
    """How the runs through a node spread over their next tokens, counted from the runs."""
    runs = [tuple(t) for t in tree.runs.token_ids]
    nd = tree.nodes
    parts = []
    for v in range(len(nd)):
        prefix = prefix_of(tree, v)
        nxt: dict[int, int] = {}
        for toks in runs:
            if toks[: len(prefix)] == prefix and len(toks) > len(prefix):
                nxt[toks[len(prefix)]] = nxt.get(toks[len(prefix)], 0) + 1
        total = sum(nxt.values())
        if not total:
            continue
        hand = -sum(c / total * math.log(c / total) for c in nxt.values())
        assert nd["split_entropy"].iat[v] == pytest.approx(hand, abs=1e-12), v
        if len(nxt) > 1:
            parts.append((v, len(prefix), sorted(nxt.values(), reverse=True)))
    wp = tree.where_they_part
    assert [(int(r.node), int(r.depth), list(r.counts)) for r in wp.itertuples()] == \
        sorted(parts, key=lambda p: (p[1], p[0]))
    assert (wp.parts == wp.counts.map(len)).all()


def test_a_tree_from_token_rows():
    """A tree from any trace of rows (here made from token texts), with counts and split entropy by hand."""
    rows = [["A", "B", "x"], ["A", "B", "y"], ["A", "C"], ["D"], ["A", "B", "x"]]
    lp = [[-0.1, -0.2, -0.3], [-0.1, -0.2, -0.4], [-0.1, -1.5], [-2.0], [-0.1, -0.2, -0.3]]
    tree = SampleTree(from_tokens(rows, lp, prompt="p"))
    nd = tree.nodes.set_index(tree.nodes.token.map(str) + "@" + tree.nodes.depth.map(str))
    assert nd.loc["A@1", "count"] == 4 and nd.loc["D@1", "count"] == 1 and nd.loc["B@2", "count"] == 3
    assert nd.loc["x@3", "ends"] == 2 and nd.loc["x@3", "count"] == 2
    assert tree.nodes.split_entropy.iat[0] == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2)))
    assert nd.loc["B@2", "split_entropy"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert nd.loc["x@3", "cum_logprob"] == pytest.approx(-0.6)
    assert [tree.nodes.token.iat[k] for k in tree.children(0)] == ["A", "D"]  # the busiest first
    segs = tree.segments
    assert segs.text.tolist() == ["A", "B", "x", "y", "C", "D"]  # no chain longer than a node here


def test_chains_collapse_into_segments(tree):
    nd, segs = tree.nodes, tree.segments
    covered = sorted(v for chain in segs.nodes for v in chain)
    assert covered == list(range(1, len(nd)))  # every node but the root, once
    for s in segs.itertuples():
        chain = list(s.nodes)
        assert chain[0] == s.first and chain[-1] == s.segment and int(nd["parent"].iat[s.first]) == s.parent
        assert [int(nd["parent"].iat[v]) for v in chain[1:]] == chain[:-1]
        assert all(int(nd["children"].iat[v]) == 1 and int(nd["ends"].iat[v]) == 0 for v in chain[:-1])
        last = int(s.segment)
        assert int(nd["children"].iat[last]) != 1 or int(nd["ends"].iat[last]) > 0
        assert {int(nd["count"].iat[v]) for v in chain} == {s.count}
        assert s.text == "".join(nd["token"].iat[v] for v in chain)
    assert len(segs) < len(nd) - 1, "some chains should collapse"


# ---- bad input -------------------------------------------------------------------------------------------------
def test_bad_requests_are_clear(llama, tree):
    for n in (0, -3, 2.5, "4", True, None):
        with pytest.raises(dl.StrategyError, match="n="):
            llama.sample_tree(PROMPT, n=n, max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="seed="):
        llama.sample_tree(PROMPT, n=2, seed="a", max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="not seeds="):
        llama.sample_tree(PROMPT, n=2, seeds=[1, 2], max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="beam"):
        llama.sample_tree(PROMPT, n=2, num_beams=2, max_new_tokens=2, progress=False)
    with pytest.raises(dl.StrategyError, match="one sequence at a time"):
        llama.sample_tree(PROMPT, n=2, penalty_alpha=0.6, top_k=4, do_sample=False, max_new_tokens=2, progress=False)
    with pytest.raises(dl.PromptError):
        llama.sample_tree("  ", n=2, max_new_tokens=2, progress=False)
    with pytest.raises(KeyError, match="seeds are 5..12"):
        tree.path(99)
    with pytest.raises(IndexError):
        tree.path_to(len(tree))
    with pytest.raises(ValueError, match="beam"):
        SampleTree(llama.generate(PROMPT, num_beams=2, max_new_tokens=2, progress=False))


def test_greedy_trees_warn_and_are_one_path(llama):
    with pytest.warns(UserWarning, match="same greedy run"):
        tree = llama.sample_tree(PROMPT, n=3, do_sample=False, max_new_tokens=4, progress=False)
    assert tree.where_they_part.empty and int(tree.nodes["count"].min()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = llama.sample_tree(PROMPT, n=1, do_sample=False, max_new_tokens=4, progress=False)
    assert one.path(0).token_id.tolist() == tree.path(0).token_id.tolist()


# ---- the views ------------------------------------------------------------------------------------------------
EVIL = '<script>alert("x")</script>'


def evil_tree(tree: SampleTree) -> SampleTree:
    """The tree's trace with one of its tokens, a run's text and the prompt made markup."""
    from dataclasses import replace

    token = int(tree.nodes["token_id"].iat[1])
    trace = replace(tree.trace, token_text={**tree.trace.token_text, token: EVIL},
                    texts=[EVIL] + list(tree.trace.texts[1:]), prompt=EVIL)
    return SampleTree(trace)


def test_the_page_escapes_what_the_model_says(tree):
    page = tree_html(evil_tree(tree))
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert f'http-equiv="Content-Security-Policy" content="{escape(CSP)}"' in page and "script-src" not in CSP
    assert page.count('class="dlh-tree-seg"') == len(tree.segments)


def test_the_drawing_is_the_tree(tree):
    """Branch width grows with the runs; each token's piece has its probability's colour."""
    svg = tree_svg(tree)
    nd = tree.nodes
    widths = {int(s): float(w) for s, w in re.findall(r'data-seg="(\d+)"><title>.*?</title><path class="dl-tree-case" '
                                                      r'd="[^"]*" stroke-width="([\d.]+)"', svg, re.S)}
    assert set(widths) == set(tree.segments.segment.tolist())
    by_count = sorted((int(nd["count"].iat[s]), w) for s, w in widths.items())
    assert [w for _, w in by_count] == sorted(w for _, w in by_count) and by_count[0][1] < by_count[-1][1]
    for node, colour in re.findall(r'class="dl-tree-tok" data-node="(\d+)" d="[^"]*" stroke="(#[0-9a-f]{6})"', svg):
        assert colour == prob_colour(float(nd["prob"].iat[int(node)]))
    assert len(re.findall(r'class="dl-tree-tok"', svg)) == len(nd) - 1
    assert "<script" not in tree_svg(evil_tree(tree)).lower()


def all_widgets(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from all_widgets(child)


def test_the_widget_selects_nodes_and_splits(tree, timing):
    view = SampleTreeView(tree)
    found = {c for w in all_widgets(view) for c in w._dom_classes}
    assert set(CSS_CLASSES) <= found  # every listed part is in the view
    assert view.node == 0 and "the prompt" in view.panel.value and f"{N} of {N} runs" in view.panel.value
    split = int(tree.where_they_part.node.iat[-1])  # the deepest split
    assert tree.nodes.depth.iat[split] > 0
    t0 = time.perf_counter()
    view.part_picker.value = split  # what choosing a split in the dropdown does
    took = [time.perf_counter() - t0]
    assert view.node == split and view.node_picker.value == split
    row = tree.nodes.iloc[split]
    assert f"{int(row['count'])} of {N} runs" in view.panel.value and "split entropy" in view.panel.value
    for r in tree.runs_through(split).itertuples():
        assert f"<td class='dl-tree-num dl-tree-seed'>{int(r.seed)}</td>" in view.panel.value
    path, below = view.style.value.split("{stroke:#111}")[:2]
    on_path = {int(s.segment) for s in tree.segments.itertuples() if set(s.nodes) & set(tree.path_to(split))}
    under = {int(s.segment) for s in tree.segments.itertuples() if split in tree.path_to(s.parent)}
    assert set(map(int, re.findall(r'data-seg="(\d+)"', path))) == on_path
    assert set(map(int, re.findall(r'data-seg="(\d+)"\] \.dl-tree-case', below))) == under and under
    leaf = int(tree.segments.segment.iat[-1])
    t0 = time.perf_counter()
    view.node_picker.value = leaf
    took.append(time.perf_counter() - t0)
    assert view.node == leaf and view.part_picker.value == -1
    runs = list(tree.runs.itertuples())
    shown = [f"<td class='dl-tree-num dl-tree-seed'>{int(r.seed)}</td>" in view.panel.value for r in runs]
    assert shown == [leaf in tree.path_to(int(r.leaf)) for r in runs]  # the runs through it, and only those
    mid = int(tree.segments[tree.segments.nodes.map(len) > 1].nodes.iat[0][0])  # a node inside a chain
    view.select(mid)
    assert view.node == int(tree.segments[tree.segments.nodes.map(lambda c: mid in c)].segment.iat[0])
    timing("sample tree view: choose a node (tiny model, 8 runs)", statistics.median(took))


def test_a_tree_with_markup_draws_escaped_in_the_widget(tree):
    view = SampleTreeView(evil_tree(tree), node=1)
    texts = [view.drawing.value, view.panel.value, view.header.value] + [str(o) for o in view.node_picker.options]
    assert not any("<script" in t.lower() for t in texts[:3])
    assert "&lt;script&gt;" in view.drawing.value and "&lt;script&gt;" in view.panel.value


def test_the_front_door_serves_the_views(tree, tmp_path):
    """`tree.to_html()` and `tree.show()` are the views, plugged in by `decoderlab/__init__` (PRESENTERS)."""
    page = tree.to_html(tmp_path / "tree.html")
    assert page == tree_html(tree) == (tmp_path / "tree.html").read_text(encoding="utf-8")
    assert isinstance(tree.show(), tree_view.SampleTreeView)


# ---- the default model ----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_sample_tree_on_smollm2(smol, timing):
    prompt = "Write one sentence about the sea."
    tree = smol.sample_tree(prompt, chat=True, n=6, max_new_tokens=12, progress=False)
    for seed in (0, 3, 5):
        alone = smol.generate(prompt, chat=True, seed=seed, do_sample=True, max_new_tokens=12, progress=False)
        assert tree.path(seed).token_id.tolist() == alone.token_ids
    view = SampleTreeView(tree)
    took = []
    for node in list(tree.segments.segment)[:12]:
        t0 = time.perf_counter()
        view.node_picker.value = int(node)
        took.append(time.perf_counter() - t0)
    timing("sample tree view: choose a node (SmolLM2, 6 runs x 12 tokens), median", statistics.median(took))
