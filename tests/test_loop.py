"""The recorded loop decodes exactly what `model.generate` decodes (greedy and sampling)."""
from __future__ import annotations

import pytest
import torch

import decoderlab as dl

PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "def fibonacci(n):"]


def hf_generate(lm, ids, seed=None, **words):
    if seed is not None:
        torch.manual_seed(seed)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True,
                            output_logits=True, output_scores=True, **words)
    return out


@pytest.mark.parametrize("prompt", PROMPTS[:2])
@pytest.mark.parametrize("n", [1, 12])
def test_greedy_matches_generate_on_tiny_models(tiny_lm, prompt, n):
    ids, _ = tiny_lm.encode(prompt)
    trace = tiny_lm.generate(prompt, max_new_tokens=n, do_sample=False, progress=False)
    out = hf_generate(tiny_lm, ids, max_new_tokens=n, do_sample=False)
    assert trace.token_ids == out.sequences[0, ids.shape[1]:].tolist()
    assert trace.num_steps == len(out.logits)
    # the recorded raw logprob of each chosen token is the model's
    for s, logits in enumerate(out.logits):
        expected = torch.log_softmax(logits[0], -1)[trace.token_ids[s]].item()
        assert trace.steps.logprob[s] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("words", [
    dict(top_k=50),
    dict(top_p=0.9, temperature=0.7),
    dict(min_p=0.05, temperature=1.3),
    dict(typical_p=0.8),
    dict(top_k=20, top_p=0.95, repetition_penalty=1.3, no_repeat_ngram_size=2),
])
@pytest.mark.parametrize("seed", [0, 7])
def test_sampling_matches_generate_with_same_seed(tiny_lms, words, seed):
    lm = tiny_lms["llama"]
    prompt = PROMPTS[1]
    ids, _ = lm.encode(prompt)
    n = 10
    trace = lm.generate(prompt, max_new_tokens=n, do_sample=True, seed=seed, progress=False,
                        record=dl.Record(logits=True), **words)
    out = hf_generate(lm, ids, seed=seed, max_new_tokens=n, do_sample=True, **words)
    assert trace.token_ids == out.sequences[0, ids.shape[1]:].tolist()
    raw = torch.stack([x[0] for x in out.logits])
    # full logits are stored as float16: exactly generate's logits rounded to float16
    assert torch.equal(torch.from_numpy(trace.arrays["logits"][:, 0]), raw.half())
    # the top-k candidates keep float32: allclose to generate's raw logits
    cand = torch.from_numpy(trace.arrays["cand_logit"][:, 0])
    assert torch.allclose(cand, raw.gather(-1, torch.from_numpy(trace.arrays["cand_id"][:, 0])), atol=1e-6)
    # final scores: the chosen token's final logprob equals log_softmax(output_scores)
    for s, sc in enumerate(out.scores):
        expected = torch.log_softmax(sc[0], -1)[trace.token_ids[s]].item()
        assert trace.steps.final_logprob[s] == pytest.approx(expected, abs=1e-5)


def test_sampling_leaves_global_rng_alone(tiny_lms):
    lm = tiny_lms["qwen2"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    lm.generate("Hello there", max_new_tokens=5, do_sample=True, seed=1, progress=False)
    assert torch.equal(before, torch.get_rng_state())


def test_stops_at_eos_and_says_why(tiny_lms):
    lm = tiny_lms["llama"]
    first = lm.generate("Hello", max_new_tokens=1, progress=False).token_ids[0]
    trace = lm.generate("Hello", max_new_tokens=10, eos_token_id=first, progress=False)
    assert trace.token_ids == [first]
    assert trace.stop_reason == "eos"
    assert lm.generate("Hello", max_new_tokens=3, eos_token_id=[], progress=False).stop_reason == "max_new_tokens"


def test_context_window_stops_generation(tokenizer):
    from tests.conftest import make_tiny

    lm = dl.LM(make_tiny("llama", tokenizer, max_position_embeddings=12), tokenizer)
    ids, _ = lm.encode("one two three four five")
    trace = lm.generate("one two three four five", max_new_tokens=50, eos_token_id=[], progress=False)
    assert trace.stop_reason == "context_window"
    assert ids.shape[1] + trace.num_steps == 12


def test_loop_runs_without_observers(tiny_lms):
    from decoderlab.engine import loop

    lm = tiny_lms["mistral"]
    ids, _ = lm.encode("No recording at all")
    strategy = lm.strategy(ids.shape[1], max_new_tokens=6)
    state = loop.prefill(lm.model, ids, strategy)
    loop.run(lm.model, state, strategy)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert torch.equal(state.ids, out[:, : state.ids.shape[1]])


def test_user_processor_and_chooser(tiny_lms):
    from transformers import SuppressTokensLogitsProcessor

    lm = tiny_lms["llama"]
    plain = lm.generate("Hello", max_new_tokens=4, progress=False)
    banned = plain.token_ids[0]
    trace = lm.generate("Hello", max_new_tokens=4, progress=False,
                        logits_processor=[SuppressTokensLogitsProcessor([banned])])
    assert banned not in trace.token_ids
    row = trace.processors[(trace.processors.step == 0)]
    assert row.processor.tolist() == ["SuppressTokensLogitsProcessor"]
    assert row.mass_removed.iloc[0] == pytest.approx(plain.steps.prob[0], rel=1e-4)

    def second_best(scores, generators):
        return torch.topk(scores, 2, dim=-1).indices[:, 1]

    t2 = lm.generate("Hello", max_new_tokens=3, chooser=second_best, progress=False)
    assert (t2.steps.final_rank == 1).all()
    assert (t2.steps.choice == "second_best").all()


@pytest.mark.integration
@pytest.mark.parametrize("prompt,chat,n", [("What is the capital of France?", True, 20),
                                          ("The three primary colours are", False, 24),
                                          ("Write a haiku about rain.", True, 32)])
def test_greedy_matches_generate_on_smollm2(smol, prompt, chat, n):
    ids, _ = smol.encode(prompt, chat=chat)
    trace = smol.generate(prompt, chat=chat, max_new_tokens=n, progress=False)
    out = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    assert trace.token_ids == out[0, ids.shape[1]:].tolist()


@pytest.mark.integration
def test_sampling_matches_generate_on_smollm2(smol):
    ids, _ = smol.encode("Tell me a story.", chat=True)
    words = dict(do_sample=True, top_k=50, top_p=0.95, temperature=0.8, max_new_tokens=24)
    trace = smol.generate("Tell me a story.", chat=True, seed=3, progress=False, **words)
    torch.manual_seed(3)
    out = smol.model.generate(ids, attention_mask=torch.ones_like(ids), **words)
    assert trace.token_ids == out[0, ids.shape[1]:].tolist()


@pytest.mark.integration
def test_capital_of_france(smol):
    trace = smol.generate("What is the capital of France?", chat=True, max_new_tokens=20, progress=False)
    assert trace.text == "The capital of France is Paris."
    assert trace.stop_reason == "eos"


def test_no_eos_on_a_model_without_pad_token(tokenizer):
    """eos_token_id=[] turns EOS stops off, also where the model has no pad token (GPT-2 style)."""
    from tests.conftest import make_tiny

    model = make_tiny("gpt2", tokenizer, pad_token_id=None)
    model.generation_config.pad_token_id = None
    lm = dl.LM(model, tokenizer)
    trace = lm.generate("no stop", max_new_tokens=6, eos_token_id=[], progress=False)
    assert trace.num_steps == 6 and trace.stop_reason == "max_new_tokens"
