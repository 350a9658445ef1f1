"""dl.compare: all runs of a prompt as rows of one batch, each run token for token what it draws alone."""
from __future__ import annotations

import pandas as pd
import pytest

import decoderlab as dl

PROMPT = "Once upon a time, in a land far away,"
STRATEGIES = {
    "greedy": {},
    "top-k 20": {"do_sample": True, "top_k": 20},
    "nucleus 0.9": {"do_sample": True, "top_p": 0.9, "top_k": 0},
    "temperature 0.7": {"do_sample": True, "temperature": 0.7},
    "min-p 0.1": {"do_sample": True, "min_p": 0.1, "top_k": 0},
    "typical 0.9": {"do_sample": True, "typical_p": 0.9},
    "repetition 1.3": {"do_sample": True, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    "beam 3": {"num_beams": 3},
}
SEEDS = [1, 2, 3]


def eos_from(lm, n):
    """EOS ids taken from sampled runs' own tokens, so that rows end at different steps."""
    a = lm.generate(PROMPT, seed=1, do_sample=True, top_k=20, max_new_tokens=n, eos_token_id=[], progress=False)
    b = lm.generate(PROMPT, seed=2, do_sample=True, top_p=0.9, top_k=0, max_new_tokens=n, eos_token_id=[],
                    progress=False)
    return sorted({a.token_ids[2], b.token_ids[n // 2]})


def check(lm, strategies, n):
    eos = eos_from(lm, n)
    strategies = {name: {**words, "eos_token_id": eos} for name, words in strategies.items()}
    cmp = dl.compare(lm, PROMPT, strategies, seeds=SEEDS, max_new_tokens=n, progress=False)
    runs = cmp.runs
    for name, words in strategies.items():
        sampling = words.get("do_sample", False)
        for seed in SEEDS if sampling else [SEEDS[0]]:
            alone = lm.generate(PROMPT, seed=seed if sampling else None, max_new_tokens=n, progress=False, **words)
            got = cmp.trace(name, seed=seed if sampling else None)
            assert got.token_ids == alone.token_ids, (name, seed)
            assert got.text == alone.text
    # strategies that do not sample ran once
    assert (runs.strategy == "greedy").sum() == 1 and (runs.strategy == "top-k 20").sum() == len(SEEDS)
    assert "eos" in runs.stop_reason.tolist()
    return cmp


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_every_run_equals_the_run_made_alone(tiny_lms, arch):
    check(tiny_lms[arch], STRATEGIES, 12)


@pytest.mark.integration
def test_every_run_equals_the_run_made_alone_on_smollm2(smol):
    check(smol, STRATEGIES, 16)


def test_runs_and_summary_hold_the_metrics(tiny_lms):
    from decoderlab import metrics

    lm = tiny_lms["llama"]
    cmp = dl.compare(lm, [PROMPT, "The weather today"], {"greedy": {}, "top-k 20": {"do_sample": True, "top_k": 20}},
                     seeds=[1, 2], max_new_tokens=8, progress=False)
    runs = cmp.runs
    assert len(runs) == 2 * (1 + 2)
    one = runs[(runs.strategy == "top-k 20") & (runs.seed == 2) & (runs.prompt == "The weather today")].iloc[0]
    tr = cmp.trace("top-k 20", seed=2, prompt="The weather today")
    assert one.mean_logprob == pytest.approx(tr.steps.logprob.mean())
    assert one.distinct_2 == pytest.approx(metrics.distinct_n(tr.token_ids, 2))
    summary = cmp.summary.set_index("strategy")
    seqs = [cmp.trace("top-k 20", seed=s, prompt=p).token_ids for p in cmp.prompts for s in (1, 2)]
    assert summary.loc["top-k 20", "self_bleu_4"] == pytest.approx(metrics.self_bleu(seqs))
    assert summary.loc["top-k 20", "runs"] == 4 and summary.loc["greedy", "runs"] == 2


def test_bad_comparisons_are_clear(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="seed="):
        dl.compare(lm, PROMPT, {"x": {"seed": 1}})
    with pytest.raises(dl.StrategyError, match="attention"):
        dl.compare(lm, PROMPT, {"x": {}}, record=dl.Record(attention=True))
    with pytest.raises(dl.StrategyError, match="top_p"):
        dl.compare(lm, PROMPT, {"x": {"do_sample": True, "top_p": 2.0}})
    cmp = dl.compare(lm, PROMPT, {"g": {}}, max_new_tokens=2, progress=False)
    with pytest.raises(KeyError, match="strategies"):
        cmp.trace("nope")


def test_by_step_and_divergence(tiny_lms):
    lm = tiny_lms["qwen2"]
    no_eos = {"eos_token_id": []}
    cmp = dl.compare(lm, PROMPT, {"greedy": no_eos, "top-k 20": {"do_sample": True, "top_k": 20, **no_eos}},
                     seeds=[1, 2], max_new_tokens=6, progress=False)
    by = cmp.by_step
    assert len(by) == 3 * 6
    g = by[by.strategy == "greedy"].sort_values("step")
    assert g.token_id.tolist() == cmp.trace("greedy").token_ids
    div = cmp.divergence
    assert len(div) == 3  # three runs: three pairs
    for r in div.itertuples():
        a = cmp.trace(r.strategy_a, seed=None if r.strategy_a == "greedy" else r.seed_a).token_ids
        b = cmp.trace(r.strategy_b, seed=None if r.strategy_b == "greedy" else r.seed_b).token_ids
        k = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)  # by hand
        assert r.first_divergence == k and a[:k] == b[:k]


def test_comparison_plots(tiny_lms):
    from decoderlab import plots

    lm = tiny_lms["llama"]
    cmp = dl.compare(lm, PROMPT, {"greedy": {"eos_token_id": []},
                                  "top-k 20": {"do_sample": True, "top_k": 20, "eos_token_id": []}},
                     seeds=[1, 2], max_new_tokens=5, progress=False)
    fig = plots.compare(cmp, metrics=("perplexity", "distinct_2"))
    runs = cmp.runs
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    expected = [runs[runs.strategy == n].perplexity.mean() for n in ("greedy", "top-k 20")]
    assert heights == pytest.approx(expected)
    fig = plots.divergence(cmp)
    steps = sorted(int(t.get_text()) for t in fig.axes[0].texts if t.get_gid() == "step")
    assert steps == sorted(2 * [int(s) for s in cmp.divergence.first_divergence.dropna()])  # both halves


def test_comparing_models_aligns_their_runs(tiny_lms):
    """Two models on the same prompts: each model's runs equal its own runs made alone, frames carry the model, and
    runs of different models are compared by token text (their ids need not agree)."""
    no_eos = {"eos_token_id": []}
    strategies = {"greedy": no_eos, "top-k 20": {"do_sample": True, "top_k": 20, **no_eos}}
    models = {"a": tiny_lms["llama"], "b": tiny_lms["qwen2"]}
    cmp = dl.compare(models, PROMPT, strategies, seeds=[1, 2], max_new_tokens=6, progress=False)
    assert cmp.models == ["a", "b"] and "2 models" in repr(cmp)
    for name, lm in models.items():
        alone = lm.generate(PROMPT, max_new_tokens=6, progress=False, **no_eos)
        assert cmp.trace("greedy", model=name).token_ids == alone.token_ids
        alone = lm.generate(PROMPT, seed=2, max_new_tokens=6, progress=False, **strategies["top-k 20"])
        assert cmp.trace("top-k 20", seed=2, model=name).token_ids == alone.token_ids
    runs = cmp.runs
    assert sorted(runs.groupby("model").size().tolist()) == [3, 3]
    summary = cmp.summary
    assert list(zip(summary.model, summary.strategy)) == [("a", "greedy"), ("a", "top-k 20"),
                                                         ("b", "greedy"), ("b", "top-k 20")]
    assert set(cmp.by_step.model) == {"a", "b"}
    div = cmp.divergence
    across = div[(div.model_a == "a") & (div.model_b == "b") & (div.strategy_a == "greedy")
                 & (div.strategy_b == "greedy")].iloc[0]
    ta, tb = cmp.trace("greedy", model="a"), cmp.trace("greedy", model="b")
    k = next((i for i, (x, y) in enumerate(zip(ta.tokens, tb.tokens)) if x != y), None)  # by text, by hand
    if k is None:
        assert across.first_divergence is pd.NA
    else:
        assert across.first_divergence == k and across.token_a == ta.tokens[k] and across.token_b == tb.tokens[k]
        assert across.logprob_a == pytest.approx(ta.steps.logprob[k]) and across.logprob_b == pytest.approx(
            tb.steps.logprob[k])
    with pytest.raises(KeyError, match="models"):
        cmp.trace("greedy", model="c")
    with pytest.raises(dl.StrategyError, match="not a decoderlab model"):
        dl.compare({"x": object()}, PROMPT, strategies)


class CtrlC:
    """A processor that presses Ctrl-C once the sequence is `length` tokens long."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.length:
            raise KeyboardInterrupt
        return scores


def test_ctrl_c_returns_the_runs_made_so_far(tiny_lms):
    lm = tiny_lms["llama"]
    n = lm.encode(PROMPT)[0].shape[1]
    strategies = {"greedy": {"eos_token_id": []},
                  "top-k": {"do_sample": True, "top_k": 20, "eos_token_id": [], "logits_processor": [CtrlC(n + 3)]},
                  "beam 2": {"num_beams": 2, "eos_token_id": []}}
    with pytest.warns(UserWarning, match="interrupted"):
        cmp = dl.compare(lm, [PROMPT, "A second prompt never reached"], strategies, seeds=[1, 2], max_new_tokens=8,
                         progress=False)
    assert cmp.interrupted and "interrupted" in repr(cmp)
    runs = cmp.runs
    assert set(runs.prompt) == {PROMPT}  # the second prompt never ran
    for name in ("greedy", "top-k"):
        tr = cmp.trace(name, seed=None if name == "greedy" else 2)
        assert tr.num_steps == 3 and tr.stop_reason == "interrupted"
    # the three steps kept are the steps the runs take uninterrupted
    alone = lm.generate(PROMPT, seed=2, do_sample=True, top_k=20, eos_token_id=[], max_new_tokens=3, progress=False)
    assert cmp.trace("top-k", seed=2).token_ids == alone.token_ids


def test_a_one_run_group_keeps_its_own_stop_reason(tiny_lms):
    """Greedy is one row of the batch: when it ends at EOS while sampled rows run on, its run says "eos"."""
    lm = tiny_lms["llama"]
    greedy = lm.generate(PROMPT, max_new_tokens=8, eos_token_id=[], progress=False)
    eos = [greedy.token_ids[2]]  # greedy ends at its third token
    cmp = dl.compare(lm, PROMPT, {"greedy": {"eos_token_id": eos},
                                  "top-k": {"do_sample": True, "top_k": 20, "eos_token_id": []}},
                     seeds=[1], max_new_tokens=8, progress=False)
    runs = cmp.runs.set_index("strategy")
    assert runs.loc["greedy", "stop_reason"] == "eos" and runs.loc["greedy", "length"] == 3
    assert cmp.trace("greedy").stop_reason == "eos"
    assert runs.loc["top-k", "stop_reason"] == "max_new_tokens"


def test_an_empty_comparison_has_empty_frames():
    from decoderlab.analysis.compare import Comparison

    cmp = Comparison([], [PROMPT], ["greedy"], ["m"])
    assert cmp.runs.empty and "stop_reason" in cmp.runs
    assert cmp.divergence.empty and "first_divergence" in cmp.divergence
    assert cmp.by_step.empty and "token" in cmp.by_step
