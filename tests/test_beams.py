"""Beam search: the returned sequences and scores equal `model.generate(num_beams=B)`, and the recorded tree
agrees with a hand computation (every candidate's score is its parent's plus its own logprob)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl

PROMPT = "Once upon a time, in a land far away,"
N = 12


def hf_beams(lm, ids, seed=None, **words):
    if seed is not None:
        torch.manual_seed(seed)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                            output_scores=True, **words)
    return out


def ending_eos(lm, prompt, n):
    """EOS ids taken from a beam run's own tokens (one early, one later), so that beams end at EOS: found, not
    hard-coded."""
    tr = lm.generate(prompt, num_beams=4, num_return_sequences=2, max_new_tokens=n, eos_token_id=[], progress=False)
    a, b = tr.row(0).token_ids, tr.row(1).token_ids
    return sorted({a[3], b[n // 2]})


def check_parity(lm, prompt, seed=None, chat=False, **words):
    ids, _ = lm.encode(prompt, chat=chat)
    trace = lm.generate(prompt, chat=chat, progress=False, seed=seed, **words)
    out = hf_beams(lm, ids, seed=seed, **words)
    eos = words.get("eos_token_id")
    eos = set([eos] if isinstance(eos, int) else eos or [])
    expected = []
    for seq in out.sequences[:, ids.shape[1]:].tolist():
        for i, t in enumerate(seq):  # generate pads a sequence that ended before the longest
            if t in eos:
                seq = seq[: i + 1]
                break
        expected.append(seq)
    got = [trace.row(i).token_ids for i in range(trace.rows)]
    assert got == expected
    np.testing.assert_allclose(trace.runs.score.to_numpy(), out.sequences_scores.numpy(), rtol=1e-5, atol=1e-5)
    return trace


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("beams", [2, 4])
@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beams_match_generate(tiny_lms, arch, beams, early_stopping):
    lm = tiny_lms[arch]
    eos = ending_eos(lm, PROMPT, N)
    for length_penalty in (1.0, -0.5) if beams == 2 else (2.0,):
        trace = check_parity(lm, PROMPT, num_beams=beams, num_return_sequences=2, early_stopping=early_stopping,
                             length_penalty=length_penalty, max_new_tokens=N, eos_token_id=eos)
        assert trace.rows == 2


def test_beams_end_in_eos_and_are_returned_best_first(tiny_lms):
    lm = tiny_lms["llama"]
    eos = ending_eos(lm, PROMPT, N)
    trace = check_parity(lm, PROMPT, num_beams=4, num_return_sequences=3, max_new_tokens=N, eos_token_id=eos)
    runs = trace.runs
    assert "eos" in runs.stop_reason.tolist()
    assert runs.score.is_monotonic_decreasing
    tree = trace.beams
    for i in range(trace.rows):
        row = trace.row(i)
        if runs.stop_reason[i] == "eos":
            assert row.token_ids[-1] in eos
        # the normalised score: the path's summed logprob / generated length ** length_penalty (1.0 here)
        path = tree[[i in r for r in tree.rows]]
        assert len(path) == len(row.token_ids)
        assert runs.score[i] == pytest.approx(path.logprob.sum() / len(row.token_ids), abs=1e-4)
        assert path.fate.iloc[-1] == "finished" and (path.fate.iloc[:-1] == "continues").all()


def test_beam_sampling_matches_generate_with_the_same_seed(tiny_lms):
    lm = tiny_lms["qwen2"]
    for seed in (0, 5):
        check_parity(lm, PROMPT, seed=seed, num_beams=3, do_sample=True, top_k=40, temperature=1.3, max_new_tokens=N)


def test_processors_act_on_beams(tiny_lms):
    lm = tiny_lms["gpt2"]
    trace = check_parity(lm, PROMPT, num_beams=3, no_repeat_ngram_size=2, repetition_penalty=1.3, max_new_tokens=N)
    assert trace.processor_names == ["RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor"]


def test_the_tree_agrees_with_a_hand_computation(tiny_lms):
    """Every candidate: its token's logprob is the model's log-softmax at its parent's prefix (no processors), its
    score is the score of the candidate it grew from plus that logprob; each step keeps K = 2B candidates of which
    B go on; a returned row is a chain of candidates through the tree."""
    lm = tiny_lms["llama"]
    beams = 3
    ids, _ = lm.encode(PROMPT)
    trace = lm.generate(PROMPT, num_beams=beams, num_return_sequences=2, max_new_tokens=6, eos_token_id=[],
                        progress=False)
    tree = trace.beams
    k = 2 * beams
    assert tree.groupby("step").size().tolist() == [k] * trace.num_steps
    last = trace.num_steps - 1
    for step, group in tree.groupby("step"):
        # no EOS: B go on at every step; at the length limit none does, and the best B are finalised
        assert (group.fate == "continues").sum() == (beams if step < last else 0)
        assert (group.fate == "finished").sum() == (0 if step < last else beams)
        assert group.score.is_monotonic_decreasing  # ranked
        if step == 0:
            assert (group.parent == 0).all()  # the first step expands beam 0 only
            np.testing.assert_allclose(group.score, group.logprob, atol=1e-5)
        else:
            prev = tree[tree.step == step - 1].set_index("candidate")
            assert (prev.loc[group.origin, "fate"] == "continues").all()
            np.testing.assert_allclose(group.score.to_numpy(),
                                       prev.loc[group.origin, "score"].to_numpy() + group.logprob.to_numpy(), atol=1e-4)
    # hand computation of one returned row's path: the model's own log-softmax at each prefix
    row = trace.row(0)
    seq = ids[0].tolist()
    path = tree[[0 in r for r in tree.rows]].sort_values("step")
    assert path.token_id.tolist() == row.token_ids
    with torch.no_grad():
        for t, token in enumerate(row.token_ids):
            logits = lm.model(torch.tensor([seq])).logits[0, -1].float()
            expected = torch.log_softmax(logits, -1)[token].item()
            assert path.logprob.iloc[t] == pytest.approx(expected, abs=1e-4)
            assert row.steps.logprob.iloc[t] == pytest.approx(expected, abs=1e-4)
            seq.append(token)


def test_beam_trace_frames_attention_and_save(tiny_lms, tmp_path):
    lm = tiny_lms["mistral"]
    trace = lm.generate(PROMPT, num_beams=2, num_return_sequences=2, max_new_tokens=5, eos_token_id=[],
                        progress=False, record=dl.Record(attention=True, lens=True))
    assert trace.chooser == "beam search"
    assert trace.steps.groupby("row").size().tolist() == trace.runs.length.tolist()
    w = trace.attention_weights(3, row=1)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=2e-3)  # each head's row is a distribution over the context
    back = dl.Trace.load(trace.save(tmp_path / "beams.parquet"))
    assert back.beams.drop(columns="rows").equals(trace.beams.drop(columns="rows"))
    assert back.beams.rows.tolist() == trace.beams.rows.tolist()
    assert back.runs.equals(trace.runs)
    one = trace.row(1)
    assert one.rows == 1 and one.token_ids == trace.row(1).token_ids


def test_beam_requests_that_cannot_be_served_are_clear(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="seeds= with num_beams"):
        lm.generate(PROMPT, num_beams=2, seeds=[1, 2])
    with pytest.raises(dl.SessionError, match="beam search keeps several"):
        lm.session(PROMPT, num_beams=2)
    with pytest.raises(ValueError, match="not a beam search"):
        lm.generate(PROMPT, max_new_tokens=2, progress=False).beams


@pytest.mark.integration
@pytest.mark.parametrize("beams", [2, 4])
def test_beams_match_generate_on_smollm2(smol, beams):
    """A chat prompt whose beams end in EOS (<|im_end|>) within the limit."""
    trace = check_parity(smol, "What is the capital of France?", chat=True, num_beams=beams, num_return_sequences=2,
                         max_new_tokens=16, eos_token_id=smol.model.generation_config.eos_token_id)
    assert "eos" in trace.runs.stop_reason.tolist()


def test_score_refuses_a_search_and_prefill_attention_comes_per_row(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="score"):
        lm.score(PROMPT, " and then", num_beams=2)
    trace = lm.generate(PROMPT, num_beams=2, num_return_sequences=2, max_new_tokens=3, progress=False,
                        record=dl.Record(prefill_attention=True))
    plain = lm.generate(PROMPT, max_new_tokens=1, progress=False, record=dl.Record(prefill_attention=True))
    for layer, m in trace.prefill_attention.items():
        assert m.shape[0] == 2
        np.testing.assert_allclose(m[1], plain.prefill_attention[layer][0], atol=2e-3)
