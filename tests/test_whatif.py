"""What-if at one step (`trace.what_if`, `decoderlab.whatif`): kept sets, final distributions and choices
checked against hand computations from the step's logits, against what the recorded run itself chose, and
the model-forward path against the recorded-logits path.

Hand computations follow each method's definition (top-k: the k largest; top-p: the most probable tokens
until their mass reaches p; min-p: p >= min_p * max p; typical-p: tokens by closeness of -log p to the
entropy until their mass reaches the target; temperature: logits / T), in float64 numpy, never through
transformers.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

import decoderlab as dl
from decoderlab.analysis import whatif
from decoderlab.trace.builder import from_tokens
from decoderlab.analysis.whatif import WhatIfError, run_words, strategy_for


# ---- hand computations ------------------------------------------------------------------------------------------
def softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.where(np.isfinite(x), np.exp(x - x[np.isfinite(x)].max()), 0.0)
    return e / e.sum()


def keep_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    return logits >= np.sort(logits)[-k]


def keep_top_p(p: np.ndarray, top_p: float) -> tuple[np.ndarray, float]:
    """The most probable tokens until their mass reaches top_p; and the distance of the cut from a tie."""
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]  # mass of the tokens more probable than each
    kept = np.zeros(p.shape, bool)
    kept[order[before < top_p]] = True
    return kept, float(np.min(np.abs(before - top_p)))


def keep_min_p(p: np.ndarray, min_p: float) -> tuple[np.ndarray, float]:
    cut = min_p * p.max()
    return p >= cut, float(np.min(np.abs(p - cut)))


def keep_typical(p: np.ndarray, mass: float) -> tuple[np.ndarray, float]:
    logp = np.log(np.where(p > 0, p, 1e-300))
    entropy = -(p * logp).sum()
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cum = np.cumsum(p[order])
    n = int((cum < mass).sum()) + 1
    kept = np.zeros(p.shape, bool)
    kept[order[:n]] = True
    return kept, float(np.min(np.abs(cum - mass)))


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def final_of(w: whatif.WhatIf, name: str) -> np.ndarray:
    return w.final_probs[name].astype(np.float64)


# ---- a trace with every number chosen by hand --------------------------------------------------------------------
VOCAB = ["<s>", " a", " b", " c", " d", " e", " f", "<i>x</i>"]
# step 0 prefers " b"; step 1 prefers " a" (in the prompt: a repetition penalty lowers it); step 2 " c"
LOGITS = np.log(np.array([
    [1e-4, 0.10, 0.42, 0.20, 0.13, 0.09, 0.05, 0.0099],
    [1e-4, 0.46, 0.05, 0.22, 0.12, 0.08, 0.04, 0.0299],
    [1e-4, 0.05, 0.26, 0.33, 0.18, 0.10, 0.07, 0.0099],
])).astype(np.float16)


def hand_made() -> dl.Trace:
    """Prompt '<s> a', then ' b', ' a', ' c'; float16 logits over an 8-token vocabulary, chosen by hand."""
    vocab = {t: i for i, t in enumerate(VOCAB)}
    return from_tokens([" b", " a", " c"], prompt="a", prompt_tokens=["<s>", " a"], vocab=vocab,
                       model_name="hand", chooser="greedy", strategy={"do_sample": False, "max_new_tokens": 3},
                       arrays={"logits": LOGITS[:, None, :]})


def logits_at(trace, step, row=0) -> np.ndarray:
    return trace.array("logits")[step, row].astype(np.float64)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_kept_sets_and_final_distributions_equal_hand_computations(step):
    trace = hand_made()
    x = logits_at(trace, step)
    p = softmax(x)
    strategies = {
        "greedy": {},
        "top-k 3": {"do_sample": True, "top_k": 3},
        "top-p 0.7": {"do_sample": True, "top_k": 0, "top_p": 0.7},
        "min-p 0.35": {"do_sample": True, "top_k": 0, "min_p": 0.35},
        "typical 0.6": {"do_sample": True, "top_k": 0, "typical_p": 0.6},
        "T 0.5": {"do_sample": True, "top_k": 0, "temperature": 0.5},
        "T 2 + top-p 0.55": {"do_sample": True, "top_k": 0, "temperature": 2.0, "top_p": 0.55},
    }
    w = trace.what_if(step, strategies, top=len(VOCAB))
    hot = softmax(x / 2.0)
    expected_kept = {
        "greedy": np.ones(len(VOCAB), bool),
        "top-k 3": keep_top_k(x, 3),
        "top-p 0.7": keep_top_p(p, 0.7)[0],
        "min-p 0.35": keep_min_p(p, 0.35)[0],
        "typical 0.6": keep_typical(p, 0.6)[0],
        "T 0.5": np.ones(len(VOCAB), bool),
        "T 2 + top-p 0.55": keep_top_p(hot, 0.55)[0],
    }
    for margin in (keep_top_p(p, 0.7)[1], keep_min_p(p, 0.35)[1], keep_typical(p, 0.6)[1], keep_top_p(hot, 0.55)[1]):
        assert margin > 1e-3  # no cut sits on a near-tie: the hand sets are the only right answers
    scaled = {"T 0.5": x / 0.5, "T 2 + top-p 0.55": x / 2.0}
    for name, kept in expected_kept.items():
        final = softmax(np.where(kept, scaled.get(name, x), -np.inf))
        np.testing.assert_allclose(final_of(w, name), final, atol=1e-6, err_msg=name)
        rows = w.tokens[w.tokens["strategy"] == name].set_index("token_id")
        assert (rows["kept"].to_numpy() == kept[rows.index]).all(), name
        np.testing.assert_allclose(rows["raw_prob"], p[rows.index], atol=1e-6)
        np.testing.assert_allclose(rows["final_prob"], final[rows.index], atol=1e-6)
        s = w.summary.set_index("strategy").loc[name]
        assert s["kept"] == kept.sum()
        assert s["mass_removed"] == pytest.approx(p[~kept].sum(), abs=1e-6)
        assert s["entropy"] == pytest.approx(entropy(final), abs=1e-5)
        assert s["top_id"] == int(np.argmax(final))
        assert s["top_prob"] == pytest.approx(final.max(), abs=1e-6)
    # greedy chooses the argmax; a sampler's chance of each token is its final probability
    g = w.summary.set_index("strategy").loc["greedy"]
    assert g["chooser"] == "greedy" and g["chosen_id"] == int(np.argmax(x))
    greedy_rows = w.tokens[w.tokens["strategy"] == "greedy"]
    assert greedy_rows["chosen"].sum() == 1 and greedy_rows.loc[greedy_rows["chosen"], "token_id"].item() == int(np.argmax(x))
    assert (greedy_rows["choice_prob"] == greedy_rows["chosen"].astype(float)).all()
    top_p = w.tokens[w.tokens["strategy"] == "top-p 0.7"]
    assert not top_p["chosen"].any() and (top_p["choice_prob"] == top_p["final_prob"]).all()
    assert pd.isna(w.summary.set_index("strategy").loc["top-p 0.7", "chosen_id"])


def test_ranks_and_the_run_token_columns():
    trace = hand_made()
    w = trace.what_if(2, {"top-k 2": {"do_sample": True, "top_k": 2}}, top=len(VOCAB))
    x = logits_at(trace, 2)
    t = w.tokens.set_index("token_id")
    assert list(t["raw_rank"]) == [int((x > x[i]).sum()) for i in t.index]
    assert list(w.tokens["raw_rank"]) == sorted(w.tokens["raw_rank"])  # ordered by the model's ranking
    kept = keep_top_k(x, 2)
    assert t["final_rank"].isna().to_numpy().tolist() == (~kept[t.index]).tolist()  # NA where removed
    assert t.loc[kept[t.index], "final_rank"].tolist() == [int((x[kept] > x[i]).sum()) for i in t.index[kept[t.index]]]
    run = VOCAB.index(" c")
    assert w.run_token_id == run and w.run_token == " c" and t.loc[run, "run_token"] and t["run_token"].sum() == 1
    s = w.summary.iloc[0]
    assert s["run_token_kept"] and s["run_token_prob"] == pytest.approx(softmax(np.where(kept, x, -np.inf))[run])


def test_top_limits_the_tokens_shown_but_keeps_the_run_token():
    trace = hand_made()
    w = trace.what_if(1, {"greedy": {}, "min-p 0.35": {"do_sample": True, "top_k": 0, "min_p": 0.35}}, top=1)
    x = logits_at(trace, 1)
    # the model's top 1, each strategy's top 1 kept token, and the run's token (' a', which is also the top)
    assert set(w.tokens["token_id"]) == {int(np.argmax(x)), VOCAB.index(" a")}
    # top-k 2 at step 2 keeps ' c' and ' b'; the run chose ' c'; the model's top 3 are ' c', ' b', ' d'
    w = trace.what_if(2, {"top-k 2": {"do_sample": True, "top_k": 2}}, top=3)
    assert list(w.tokens["token"]) == [" c", " b", " d"]
    w = trace.what_if(2, {"greedy": {}}, top=1)
    assert list(w.tokens["token"]) == [" c"]
    w = trace.what_if(0, {"greedy": {}}, top=1)
    assert list(w.tokens["token"]) == [" b"]


def test_prefix_reading_processors_see_the_prompt_and_the_tokens_before_the_step():
    trace = hand_made()
    # step 1's prefix is '<s> a b': a repetition penalty lowers ' a' and ' b' (and '<s>') and nothing else
    w = trace.what_if(1, {"penalty": {"repetition_penalty": 2.0}, "no 2-gram": {"no_repeat_ngram_size": 2}},
                      top=len(VOCAB))
    x = logits_at(trace, 1)
    seen = [VOCAB.index(t) for t in ("<s>", " a", " b")]
    penalised = x.copy()
    penalised[seen] = np.where(x[seen] < 0, x[seen] * 2.0, x[seen] / 2.0)
    np.testing.assert_allclose(final_of(w, "penalty"), softmax(penalised), atol=1e-6)
    # prefix '<s> a b' has the 2-gram (a, b); the next token follows ' b', so no 2-gram is banned yet
    np.testing.assert_allclose(final_of(w, "no 2-gram"), softmax(x), atol=1e-6)
    # step 2's prefix '<s> a b a': after ' a', the token ' b' would repeat the 2-gram (a, b)
    w2 = trace.what_if(2, {"no 2-gram": {"no_repeat_ngram_size": 2}}, top=len(VOCAB))
    x2 = logits_at(trace, 2)
    banned = np.zeros(len(VOCAB), bool)
    banned[VOCAB.index(" b")] = True
    np.testing.assert_allclose(final_of(w2, "no 2-gram"), softmax(np.where(banned, -np.inf, x2)), atol=1e-6)
    assert w2.summary.iloc[0]["kept"] == len(VOCAB) - 1
    assert w2.summary.iloc[0]["mass_removed"] == pytest.approx(softmax(x2)[banned].sum(), abs=1e-6)


def test_the_processors_frame_measures_each_processor_as_a_run_records_it():
    trace = hand_made()
    w = trace.what_if(0, {"T+k+p": {"do_sample": True, "temperature": 2.0, "top_k": 4, "top_p": 0.7}}, top=8)
    x = logits_at(trace, 0)
    hot = softmax(x / 2.0)
    after_k = keep_top_k(x, 4)
    p_k = softmax(np.where(after_k, x / 2.0, -np.inf))
    after_p = after_k & keep_top_p(p_k, 0.7)[0]
    pr = w.processors
    assert list(pr["processor"]) == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    np.testing.assert_allclose(pr["mass_removed"], [0.0, hot[~after_k].sum(), p_k[after_k & ~after_p].sum()], atol=1e-6)
    assert list(pr["kept"]) == [len(VOCAB), after_k.sum(), after_p.sum()]
    run = VOCAB.index(" b")  # about the token the run chose, as trace.processors is
    final = softmax(np.where(after_p, x / 2.0, -np.inf))
    np.testing.assert_allclose(pr["prob_after"], [hot[run], p_k[run], final[run]], atol=1e-6)


def test_a_saved_trace_answers_the_same(tmp_path):
    trace = hand_made()
    strategies = {"top-p 0.7": {"do_sample": True, "top_k": 0, "top_p": 0.7}}
    loaded = dl.Trace.load(trace.save(tmp_path / "t.parquet"))
    a, b = trace.what_if(1, strategies), loaded.what_if(1, strategies)
    assert a.tokens.equals(b.tokens) and a.summary.equals(b.summary)


def test_token_text_is_kept_exactly_and_unknown_ids_read_as_their_number():
    trace = hand_made()
    w = trace.what_if(0, {"greedy": {}}, top=len(VOCAB))
    assert "<i>x</i>" in set(w.tokens["token"])  # text as decoded; escaping is the views' business
    bare = dataclasses.replace(trace, token_text={i: t for i, t in trace.token_text.items() if i != 6})
    assert "<6>" in set(bare.what_if(0, {"greedy": {}}, top=len(VOCAB)).tokens["token"])


# ---- bad input ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    (dict(step=3), "step=3"), (dict(step=-4), "step=-4"), (dict(step=1.5), "step=1.5"), (dict(row=1), "row=1"),
    (dict(strategies={}), "strategies="), (dict(strategies=["greedy"]), "strategies="),
    (dict(strategies={"x": "greedy"}), "strategy 'x'"), (dict(strategies={"x": {"top_q": 1}}), "top_q"),
    (dict(strategies={"x": {"do_sample": True, "top_p": 1.5}}), "top_p=1.5"),
    (dict(strategies={"beam": {"num_beams": 2}}), "beam search"),
    (dict(strategies={"c": {"penalty_alpha": 0.6, "top_k": 4}}), "contrastive search"),
    (dict(top=0), "top=0"),
])
def test_bad_input_is_named(kwargs, words):
    args = dict(step=0, strategies={"greedy": {}})
    args.update(kwargs)
    with pytest.raises(WhatIfError) as err:
        hand_made().what_if(args.pop("step"), args.pop("strategies"), **args)
    assert words in str(err.value)


def test_negative_steps_count_from_the_rows_last():
    trace = hand_made()
    assert trace.what_if(-1, {"greedy": {}}).step == 2


def test_no_logits_and_no_model_says_what_to_do():
    trace = from_tokens([" b"], prompt_tokens=["<s>"], model_name="hand")
    with pytest.raises(WhatIfError, match=r"lm=.*Record\(logits=True\)"):
        trace.what_if(0, {"greedy": {}})


# ---- the real model: faithful to the run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled(smol):
    return smol.generate("Write a haiku about rain.", chat=True, max_new_tokens=10, do_sample=True, temperature=0.8,
                         top_k=40, top_p=0.9, seed=3, record=dl.Record(logits=True), progress=False)


@pytest.fixture(scope="module")
def greedy_run(smol):
    return smol.generate("The capital of France is", max_new_tokens=10, repetition_penalty=1.3,
                         record=dl.Record(logits=True), progress=False)


def without_logits(trace) -> dl.Trace:
    return dataclasses.replace(trace, arrays={k: v for k, v in trace.arrays.items() if k != "logits"})


def test_greedy_what_if_chooses_what_the_greedy_run_chose(smol, greedy_run):
    words = run_words(greedy_run)
    assert words["repetition_penalty"] == 1.3 and not words["do_sample"]
    for step in range(greedy_run.num_steps):
        token = greedy_run.token_ids[step]
        recorded = greedy_run.what_if(step, {"as run": words})
        forward = without_logits(greedy_run).what_if(step, {"as run": words}, lm=smol)
        assert forward.source == "model forward" and recorded.source == "recorded logits"
        assert forward.summary.iloc[0]["chosen_id"] == token  # float32 logits, as the run saw them
        # float16 logits: the run's token is the argmax unless float16 rounding made a tie with it
        final = recorded.final_probs["as run"]
        assert final[token] == final.max()


def test_sampled_run_token_has_the_chance_the_run_recorded(smol, sampled):
    words = run_words(sampled)
    steps = sampled.steps
    procs = sampled.processors
    for step in range(sampled.num_steps):
        recorded_final = float(steps["final_prob"][step])
        for w, tol in ((sampled.what_if(step, {"as run": words}), 5e-3),
                       (without_logits(sampled).what_if(step, {"as run": words}, lm=smol), 1e-4)):
            s = w.summary.iloc[0]
            assert s["run_token_kept"] and s["chooser"] == "sample"
            assert s["run_token_prob"] == pytest.approx(recorded_final, rel=tol, abs=tol)
            mine = procs[procs["step"] == step]
            assert list(w.processors["processor"]) == list(mine["processor"])
            np.testing.assert_allclose(w.processors["mass_removed"], mine["mass_removed"], atol=tol)
            np.testing.assert_allclose(w.processors["prob_after"], mine["prob_after"], atol=tol)


def test_the_forward_path_equals_the_recorded_path_within_float16(smol, sampled):
    strategies = {"greedy": {}, "top-k 10": {"do_sample": True, "top_k": 10},
                  "min-p 0.05": {"do_sample": True, "top_k": 0, "min_p": 0.05}, "as run": run_words(sampled)}
    bare = without_logits(sampled)
    for step in (0, 3, 7):
        a = sampled.what_if(step, strategies, lm=smol)
        b = bare.what_if(step, strategies, lm=smol)
        # the recorded logits are the forward's rounded to float16 (half a unit in the last place: 2^-11 relative)
        x16 = sampled.array("logits")[step, 0].astype(np.float32)
        x32 = whatif.forward_prefix(smol, whatif.step_prefix(sampled, step)).numpy()
        assert np.abs(x16 - x32).max() <= np.abs(x32).max() * 2 ** -11 + 1e-3
        np.testing.assert_allclose(a.raw_probs, b.raw_probs, atol=2e-3)
        for name in strategies:
            np.testing.assert_allclose(a.final_probs[name], b.final_probs[name], atol=5e-3, err_msg=name)
            sa, sb = a.summary.set_index("strategy").loc[name], b.summary.set_index("strategy").loc[name]
            assert sa["top_id"] == sb["top_id"]
            assert sa["mass_removed"] == pytest.approx(sb["mass_removed"], abs=5e-3)
        ka = a.tokens.set_index(["strategy", "token_id"])["kept"]
        kb = b.tokens.set_index(["strategy", "token_id"])["kept"]
        shared = ka.index.intersection(kb.index)
        assert (ka[shared] == kb[shared]).all()


def test_the_forward_uses_the_rows_own_prefix(smol):
    trace = smol.generate("Name a colour.", chat=True, max_new_tokens=6, do_sample=True, top_p=0.9, seeds=[1, 2],
                          record=dl.Record(logits=True), progress=False)
    assert trace.row(0).token_ids != trace.row(1).token_ids
    bare = without_logits(trace)
    for row in (0, 1):
        rows = trace.steps[trace.steps["row"] == row].set_index("step")
        for step in (1, 4):
            w = bare.what_if(step, {"as run": run_words(trace)}, row=row, lm=smol)
            assert w.run_token_id == trace.row(row).token_ids[step]
            assert w.summary.iloc[0]["run_token_prob"] == pytest.approx(rows.loc[step, "final_prob"], rel=1e-4)


def test_without_the_model_the_processors_are_the_models_for_smollm2(smol, sampled):
    """SmolLM2's generation_config sets no sampling word: the weightless stand-in builds the very processors
    `lm.strategy` builds (same classes, same settings), so the answers are the same."""
    cases = [{}, {"do_sample": True}, {"do_sample": True, "top_p": 0.9, "temperature": 0.7},
             {"do_sample": True, "top_k": 0, "min_p": 0.1, "typical_p": 0.9, "repetition_penalty": 1.2},
             {"no_repeat_ngram_size": 3, "min_new_tokens": 5}, run_words(sampled)]
    for words in cases:
        mine, theirs = strategy_for(sampled, words), strategy_for(sampled, words, lm=smol)
        assert mine.processor_names == theirs.processor_names, words
        for a, b in zip(mine.processors, theirs.processors):
            assert settings(a) == settings(b), (words, type(a).__name__)
        assert mine.chooser_name == theirs.chooser_name
    strategies = {str(i): w for i, w in enumerate(cases)}
    a, b = sampled.what_if(4, strategies), sampled.what_if(4, strategies, lm=smol)
    cols = [c for c in a.summary.columns if c not in ("chosen_token", "top_token")]  # names: the model's tokenizer
    assert a.summary[cols].equals(b.summary[cols])


def settings(processor) -> dict:
    return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in vars(processor).items()}


def test_without_the_model_its_generation_config_defaults_are_unknown(tokenizer):
    """The documented difference: a model that ships sampling defaults samples with them under `{}` given the
    model, and not without it; the run's own resolved words reproduce the run either way."""
    from conftest import make_tiny

    model = make_tiny("llama", tokenizer)
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.6
    lm = dl.LM(model, tokenizer, name="tiny-sampler")
    trace = lm.generate("Once upon a time", max_new_tokens=4, seed=0, record=dl.Record(logits=True), progress=False)
    assert trace.strategy["temperature"] == 0.6
    assert "TemperatureLogitsWarper" in strategy_for(trace, {}, lm=lm).processor_names
    assert strategy_for(trace, {}).processor_names == []  # transformers' defaults: greedy
    a = trace.what_if(2, {"as run": run_words(trace)})
    b = trace.what_if(2, {"as run": run_words(trace)}, lm=lm)
    np.testing.assert_array_equal(a.final_probs["as run"], b.final_probs["as run"])
    assert a.summary.iloc[0]["run_token_prob"] == pytest.approx(math.exp(trace.arrays["final_logprob"][2, 0]), rel=5e-3)


def test_another_model_is_refused(smol, tiny_lms, sampled):
    with pytest.raises(WhatIfError, match="not the model that made this trace"):
        without_logits(sampled).what_if(0, {"greedy": {}}, lm=tiny_lms["llama"])


def test_a_processor_list_and_a_chooser_of_ones_own():
    """As in dl.compare, a strategy may be a list of processors (greedy over what they leave) or carry a chooser."""
    trace = hand_made()
    ban_b = VOCAB.index(" b")

    def ban(ids, scores):
        scores[:, ban_b] = -math.inf
        return scores

    def second_best(scores, generators=()):
        return torch.topk(scores, 2, dim=-1).indices[:, 1]

    w = trace.what_if(0, {"ban ' b'": [ban], "second best": {"chooser": second_best}}, top=len(VOCAB))
    x = logits_at(trace, 0)
    s = w.summary.set_index("strategy")
    assert s.loc["ban ' b'", "chooser"] == "greedy" and s.loc["ban ' b'", "kept"] == len(VOCAB) - 1
    assert s.loc["ban ' b'", "chosen_id"] == int(np.argsort(-x)[1])  # greedy over what the processor left
    assert s.loc["ban ' b'", "run_token_prob"] == 0 and not s.loc["ban ' b'", "run_token_kept"]
    assert s.loc["second best", "chooser"] == "second_best" and s.loc["second best", "chosen_id"] == int(np.argsort(-x)[1])
    mine = w.tokens[w.tokens["strategy"] == "second best"]
    assert mine["choice_prob"].isna().all()  # a chooser of one's own: its odds are its own
