"""Contrastive search against the method written out by hand: no cache, every candidate forwarded on its own,
every intermediate (candidates, confidences, penalties, scores, tokens) compared with what the trace recorded."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

import decoderlab as dl

PROMPT = "Once upon a time, in a land far away,"


def by_hand(model, prompt_ids, alpha, k, steps, repetition_penalty=None):
    """Su et al.'s contrastive search, plainly: per step, full forwards without a cache."""
    seq = prompt_ids[0].tolist()
    record = []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([seq]), output_hidden_states=True)
            logits = out.logits[0, -1].float()
            context = out.hidden_states[-1][0]  # [T, D]: every position so far, prompt included
            scores = logits[None].clone()
            if repetition_penalty is not None:
                scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(torch.tensor([seq]), scores)
            probs = torch.softmax(scores[0], -1)
            conf, ids = torch.topk(probs, k)
            penalties = []
            for v in ids.tolist():
                h = model(torch.tensor([seq + [v]]), output_hidden_states=True).hidden_states[-1][0, -1]
                cos = torch.nn.functional.cosine_similarity(context, h[None], dim=-1)
                penalties.append(cos.max())
            penalty = torch.stack(penalties)
            score = (1 - alpha) * conf - alpha * penalty
            token = int(ids[int(score.argmax())])
            record.append(dict(ids=ids, conf=conf, penalty=penalty, score=score, token=token,
                               logprob=torch.log_softmax(logits, -1)[token]))
            seq.append(token)
    return record


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mistral"])
@pytest.mark.parametrize("alpha,k", [(0.6, 4), (0.3, 6)])
def test_contrastive_search_equals_the_hand_computation(tiny_lms, arch, alpha, k):
    lm = tiny_lms[arch]
    steps = 6
    ids, _ = lm.encode(PROMPT)
    trace = lm.generate(PROMPT, penalty_alpha=alpha, top_k=k, max_new_tokens=steps, eos_token_id=[], progress=False)
    hand = by_hand(lm.model, ids, alpha, k, steps)
    assert trace.chooser == "contrastive search"
    assert trace.token_ids == [h["token"] for h in hand]
    a = trace.arrays
    for s, h in enumerate(hand):
        assert a["contrastive_id"][s, 0].tolist() == h["ids"].tolist()
        np.testing.assert_allclose(a["contrastive_confidence"][s, 0], h["conf"].numpy(), atol=1e-5)
        np.testing.assert_allclose(a["contrastive_penalty"][s, 0], h["penalty"].numpy(), atol=1e-4)
        np.testing.assert_allclose(a["contrastive_score"][s, 0], h["score"].numpy(), atol=1e-4)
        assert trace.steps.logprob[s] == pytest.approx(float(h["logprob"]), abs=1e-4)


def test_processors_act_before_the_candidates_are_taken(tiny_lms):
    lm = tiny_lms["qwen2"]
    ids, _ = lm.encode(PROMPT)
    trace = lm.generate(PROMPT, penalty_alpha=0.5, top_k=5, repetition_penalty=1.5, max_new_tokens=5, eos_token_id=[],
                        progress=False)
    hand = by_hand(lm.model, ids, 0.5, 5, 5, repetition_penalty=1.5)
    assert trace.token_ids == [h["token"] for h in hand]
    np.testing.assert_allclose(trace.arrays["contrastive_confidence"][:, 0], np.stack([h["conf"] for h in hand]),
                               atol=1e-5)
    assert trace.processor_names == ["RepetitionPenaltyLogitsProcessor"]


def test_alpha_zero_is_greedy(tiny_lms):
    lm = tiny_lms["llama"]
    greedy = lm.generate(PROMPT, max_new_tokens=6, eos_token_id=[], progress=False)
    # penalty_alpha=0 selects by confidence alone: greedy, as generate decides it
    zero = lm.generate(PROMPT, penalty_alpha=0.0, top_k=4, max_new_tokens=6, eos_token_id=[], progress=False)
    assert zero.chooser == "greedy" and zero.token_ids == greedy.token_ids
    assert greedy.token_ids == [h["token"] for h in by_hand(lm.model, lm.encode(PROMPT)[0], 0.0, 4, 6)]


def test_attention_and_lens_follow_the_chosen_candidate(tiny_lms):
    """The look-ahead forwards all k candidates; the recorded row is the chosen one's: its attention rows are
    distributions over the context, and the last lens layer is the model's own distribution."""
    lm = tiny_lms["mistral"]
    trace = lm.generate(PROMPT, penalty_alpha=0.6, top_k=4, max_new_tokens=5, eos_token_id=[], progress=False,
                        record=dl.Record(attention=True, lens=True))
    for s in range(trace.num_steps):
        np.testing.assert_allclose(trace.attention_weights(s).sum(-1), 1.0, atol=3e-3)
    last = trace.lens_stats[trace.lens_stats.layer == trace.lens_layers - 1]
    np.testing.assert_allclose(last.chosen_prob.to_numpy(), trace.steps.prob.to_numpy(), rtol=1e-3)
    assert (last.chosen_rank.to_numpy() == trace.steps["rank"].to_numpy()).all()


def test_contrastive_requests_that_cannot_be_served_are_clear(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.StrategyError, match="penalty_alpha"):
        lm.generate(PROMPT, penalty_alpha=1.5, top_k=4)
    with pytest.raises(dl.StrategyError, match="seeds="):
        lm.generate(PROMPT, penalty_alpha=0.6, top_k=4, seeds=[1, 2])
    with pytest.raises(dl.SessionError, match="contrastive search"):
        lm.session(PROMPT, penalty_alpha=0.6, top_k=4)
