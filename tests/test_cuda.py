"""The same faithfulness checks on a GPU (skipped where there is none, as in CI).

Run on a lent GPU with only the tokenizer at hand:
    DECODERLAB_TEST_TOKENIZER=<folder with tokenizer.json> python -m pytest tests/test_cuda.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl
from tests.conftest import make_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["llama", "mistral", "gemma2"])
def gpu_lm(request, tokenizer):
    return dl.LM(make_tiny(request.param, tokenizer).to("cuda"), tokenizer, name=request.param)


def test_greedy_and_sampling_match_generate_on_gpu(gpu_lm):
    ids, _ = gpu_lm.encode("On the GPU, the tokens are the same")
    assert ids.device.type == "cuda"
    trace = gpu_lm.generate("On the GPU, the tokens are the same", max_new_tokens=12, eos_token_id=[], progress=False)
    out = gpu_lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                                do_sample=False, eos_token_id=None)
    assert trace.token_ids == out[0, ids.shape[1]:].tolist()
    words = dict(do_sample=True, top_k=40, top_p=0.9, temperature=0.8, max_new_tokens=12)
    sampled = gpu_lm.generate("On the GPU, the tokens are the same", seed=3, eos_token_id=[], progress=False, **words)
    torch.manual_seed(3)
    out = gpu_lm.model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=12, eos_token_id=None, **words)
    assert sampled.token_ids == out[0, ids.shape[1]:].tolist()


def test_attention_lens_and_rewind_on_gpu(gpu_lm):
    prompt = "A prompt longer than the sliding window of eight tokens, on the GPU"
    trace = gpu_lm.generate(prompt, max_new_tokens=10, eos_token_id=[], progress=False,
                            record=dl.Record(attention=True, lens=True))
    full = torch.tensor([list(trace.prompt_ids) + trace.token_ids], device="cuda")
    impl = gpu_lm.model.config._attn_implementation
    gpu_lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = gpu_lm.model(input_ids=full, output_attentions=True, use_cache=False)
    gpu_lm.model.set_attn_implementation(impl)
    P = len(trace.prompt_ids)
    for s in (0, 1, 9):
        want = torch.stack([a[0, :, P - 1 + s, : P + s] for a in eager.attentions]).float().cpu().numpy()
        np.testing.assert_allclose(trace.attention_weights(s), want, atol=2e-3)
    last = trace.lens_stats[trace.lens_stats.layer == trace.lens_stats.layer.max()]
    np.testing.assert_allclose(last.chosen_prob.values, trace.steps.prob.values, rtol=1e-3)
    s = gpu_lm.session(prompt, max_new_tokens=10, eos_token_id=[], do_sample=True, seed=1)
    s.step(10)
    first = s.trace.token_ids
    s.rewind(to=4)
    s.step(6)
    assert s.trace.token_ids == first


def test_attention_rows_of_all_layers_at_once_on_gpu():
    """The rows computed for all layers in one product (`attention.last_rows`, where no mask applies) equal the
    per-layer rows (`attention.last_row`) on the GPU, in float32 and from bfloat16 queries and keys."""
    from decoderlab import attention

    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        queries = [torch.randn(3, 8, 1, 16, generator=g, device="cuda").to(dtype) for _ in range(4)]
        keys = [torch.randn(3, 2, 21, 16, generator=g, device="cuda").to(dtype) for _ in range(4)]
        rows = attention.last_rows(queries, keys, 0.25)
        for layer in range(4):
            one = attention.last_row(None, queries[layer], keys[layer], None, 0.25)
            torch.testing.assert_close(rows[layer], one, atol=1e-6, rtol=1e-5)


def test_compare_runs_equal_runs_made_alone_on_gpu(gpu_lm):
    """dl.compare's batched step (rows selected by slices, the layout kept between steps) on the GPU: every run
    token for token the run made alone, rows ending at their own EOS, a beam search among the rows."""
    from tests.test_compare import STRATEGIES, check

    if gpu_lm.name == "gemma2":
        pytest.skip("parity on three architectures is enough; Gemma 2 runs eager attention")
    check(gpu_lm, STRATEGIES, 12)


def test_numeric_fault_on_gpu_flags_what_each_test_would():
    """`loop.numeric_fault` reads faults off each row's maximum; on the GPU too a maximum is NaN when any element is:
    every row of three elements drawn from finite, NaN, +inf and -inf values gives what a test per fault gives."""
    import itertools

    from decoderlab.loop import numeric_fault

    values = [0.0, 1.5, float("nan"), float("inf"), float("-inf")]
    rows = torch.tensor(list(itertools.product(values, repeat=3)), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        scores = rows.to(dtype)
        for i in range(len(rows)):
            logits = scores[i : i + 1].expand(len(rows), -1)
            want = (torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isnan(scores).any(-1)
                    | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1))
            assert torch.equal(numeric_fault(logits, scores), want)
