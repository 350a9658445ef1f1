"""The fast path (`compile=True`, decoderlab/fast.py) on a CPU: the same static-cache steps a GPU captures, run
uncaptured, in the order a GPU runs them (each token forwarded before the step is recorded). The captured graph
and the compiled layers are tested on a GPU (tests/test_cuda.py)."""
from __future__ import annotations

import numpy as np
import pytest

import decoderlab as dl
from decoderlab.engine import fast
from decoderlab.errors import StrategyError

PROMPT = "A prompt longer than the sliding window of eight tokens"
EVERYTHING = dl.Record(attention=True, lens=True, logits=True)
SLIDING = ("tiny-mistral", "tiny-gemma2")


def same_trace(a: dl.Trace, b: dl.Trace, attention_atol: float = 1e-3) -> None:
    """Every recorded array of two runs: tokens and integer columns exactly, numbers within float16 storage
    (logits are stored as float16: a difference of one unit in their last place is allowed)."""
    assert a.arrays.keys() == b.arrays.keys()
    for key, x in a.arrays.items():
        y = b.arrays[key]
        assert x.shape == y.shape, key
        if x.dtype.kind in "biu":
            np.testing.assert_array_equal(x, y, err_msg=key)
        elif key == "logits":
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=key)
        else:
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), atol=attention_atol, rtol=1e-4,
                                       err_msg=key)
    assert a.stop_reason == b.stop_reason


@pytest.mark.parametrize("words", [dict(), dict(do_sample=True, top_k=20, temperature=0.8, seed=3),
                                   dict(do_sample=True, top_p=0.9, repetition_penalty=1.3, seeds=[1, 2, 3])],
                         ids=["greedy", "top_k", "rows"])
def test_fast_path_records_what_the_eager_path_records(tiny_lm, words):
    """Tokens and every recorded array (attention rows of every layer, residuals, logits, candidates, processors)
    equal the eager run's, on four architectures (GPT-2's own attention among them); the two with sliding-window
    layers are refused with a clear error."""
    if tiny_lm.name in SLIDING:
        with pytest.raises(StrategyError, match="sliding-window layers"):
            tiny_lm.generate(PROMPT, max_new_tokens=4, progress=False, compile=True, **words)
        return
    a = tiny_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, **words)
    b = tiny_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, compile=True, **words)
    same_trace(a, b)


def test_rows_ending_at_eos_keep_their_tokens(tiny_lms):
    """Rows that reach EOS stay in the captured batch (emitting padding) while the others run on; the trace equals
    the eager run's, whose finished rows leave the batch, and a run that ends at EOS discards the forward made
    ahead of it."""
    lm = tiny_lms["llama"]
    words = dict(do_sample=True, temperature=1.5, max_new_tokens=20, seeds=[0, 1, 2, 3])
    free = lm.generate(PROMPT, eos_token_id=[], progress=False, **words)
    counts = np.unique(free.arrays["token_id"][:8], return_counts=True)
    eos = int(counts[0][np.argmax(counts[1])])  # a token some row draws early: rows end at different steps
    a = lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, **words)
    b = lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, compile=True, **words)
    assert a.stop_reason == "eos" or a.num_steps == 20
    same_trace(a, b)
    one = lm.generate(PROMPT, eos_token_id=eos, record=EVERYTHING, progress=False, compile=True, seed=1,
                      do_sample=True, temperature=1.5, max_new_tokens=20)
    same_trace(lm.generate(PROMPT, eos_token_id=eos, record=EVERYTHING, progress=False, seed=1, do_sample=True,
                           temperature=1.5, max_new_tokens=20), one)


def test_prompt_attention_and_the_context_window(tiny_lms, tokenizer):
    """The prompt's full matrices (an uncaptured forward) as the eager path records them; a run that reaches the
    context window stops there as the eager run does (the static cache is sized within the window)."""
    lm = tiny_lms["qwen2"]
    rec = dl.Record(attention=True, prefill_attention=True)
    same_trace(lm.generate(PROMPT, max_new_tokens=6, record=rec, progress=False),
               lm.generate(PROMPT, max_new_tokens=6, record=rec, progress=False, compile=True))
    window = lm.context_window
    ids = tokenizer(" word" * (window - 5), return_tensors="pt").input_ids[:, : window - 5]
    a = lm.generate_ids(ids, max_new_tokens=50, eos_token_id=[], progress=False)
    b = lm.generate_ids(ids, max_new_tokens=50, eos_token_id=[], progress=False, compile=True)
    assert a.stop_reason == b.stop_reason == "context_window"
    same_trace(a, b)


def test_cache_length_is_rounded_within_the_window():
    assert fast.cache_length(1, None) == fast.LENGTH_STEP
    assert fast.cache_length(fast.LENGTH_STEP, None) == fast.LENGTH_STEP
    assert fast.cache_length(fast.LENGTH_STEP + 1, None) == 2 * fast.LENGTH_STEP
    assert fast.cache_length(300, 280) == 280


@pytest.mark.parametrize("words, what", [(dict(num_beams=3), "beam"), (dict(penalty_alpha=0.6, top_k=4), "contrastive"),
                                         (dict(dola_layers="high"), "dola")])
def test_strategies_without_one_forward_a_step_are_refused(tiny_lms, words, what):
    with pytest.raises(StrategyError, match=f"compile=True with {what}"):
        tiny_lms["llama"].generate(PROMPT, max_new_tokens=3, compile=True, progress=False, **words)


def test_compile_must_be_a_bool(tiny_lms):
    with pytest.raises(StrategyError, match="compile='yes'"):
        tiny_lms["llama"].generate(PROMPT, max_new_tokens=3, compile="yes", progress=False)


def test_numbers_that_go_wrong_stop_the_fast_path_with_the_steps_before(tiny_lms):
    """A processor that turns the scores to NaN at step 4: the same NumericError as the eager path, naming the step
    and the processor, and `err.trace` holds the same four steps (the forward made ahead is not a step)."""
    from tests.test_errors import NaNAfter

    lm = tiny_lms["llama"]
    length = lm.encode(PROMPT)[0].shape[1] + 4
    traces = []
    for compile in (False, True):
        with pytest.raises(dl.NumericError, match="step 4: after NaNAfter") as caught:
            lm.generate(PROMPT, max_new_tokens=10, record=EVERYTHING, progress=False, compile=compile,
                        logits_processor=[NaNAfter(length)])
        assert caught.value.step == 4 and caught.value.trace.num_steps == 4
        traces.append(caught.value.trace)
    same_trace(*traces)


def test_compiled_layers_record_what_eager_layers_record(tiny_lms):
    """`fast.compiled_layers` (on a GPU, the warm-up and the capture run in it) on the CPU, around a whole run:
    torch.compile's layers, with the attention sink outside compiled code and the lens hooks around the layers,
    record what the eager layers record; afterwards the model's own forwards are back."""
    lm = tiny_lms["llama"]
    a = lm.generate(PROMPT, max_new_tokens=5, record=EVERYTHING, progress=False)
    with fast.compiled_layers(lm.model):
        b = lm.generate(PROMPT, max_new_tokens=5, record=EVERYTHING, progress=False, compile=True)
    same_trace(a, b)
    assert all("forward" not in vars(layer) for layer in lm.model.model.layers)
