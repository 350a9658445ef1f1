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
    from decoderlab.engine import attention

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

    from decoderlab.engine.loop import numeric_fault

    values = [0.0, 1.5, float("nan"), float("inf"), float("-inf")]
    rows = torch.tensor(list(itertools.product(values, repeat=3)), device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        scores = rows.to(dtype)
        for i in range(len(rows)):
            logits = scores[i : i + 1].expand(len(rows), -1)
            want = (torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isnan(scores).any(-1)
                    | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1))
            assert torch.equal(numeric_fault(logits, scores), want)


# ---- a model sharded over two GPUs by accelerate (device_map) ---------------------------------------------------
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
PROMPT = "A prompt longer than eight tokens, its layers split over two GPUs"
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 0,
         "model.layers.2": 1, "model.layers.3": 1, "model.norm": 1, "lm_head": 1}


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    """A 4-layer Llama with random weights (untied head) saved as a transformers folder, for dl.load."""
    folder = tmp_path_factory.mktemp("llama4")
    make_tiny("llama", tokenizer, num_hidden_layers=4, tie_word_embeddings=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def split_lms(tiny_folder):
    """The same float32 weights split over two GPUs (layers 0-1 on cuda:0; 2-3, norm and head on cuda:1) and on one."""
    return dl.load(tiny_folder, device_map=SPLIT), dl.load(tiny_folder, device="cuda:0")


@two_gpus
def test_sharded_repr_says_where_the_layers_are(split_lms):
    sharded, one = split_lms
    assert {p.device.index for p in sharded.model.parameters()} == {0, 1}
    assert "layers 0-1 cuda:0, 2-3 cuda:1, head cuda:1" in repr(sharded)
    assert "device=cuda:0" in repr(one) and "placement" not in repr(one)
    assert sharded.lens.device == torch.device("cuda:1")


def _generate_parity(lm):
    ids, _ = lm.encode(PROMPT)
    trace = lm.generate(PROMPT, max_new_tokens=12, eos_token_id=[], progress=False,
                        record=dl.Record(attention=True, lens=True))
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                            do_sample=False, eos_token_id=None)
    assert trace.token_ids == out[0, ids.shape[1]:].tolist()
    words = dict(do_sample=True, top_k=40, top_p=0.9, temperature=0.8, max_new_tokens=12)
    sampled = lm.generate(PROMPT, seed=3, eos_token_id=[], progress=False, record=dl.Record(attention=True), **words)
    torch.manual_seed(3)
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), min_new_tokens=12, eos_token_id=None, **words)
    assert sampled.token_ids == out[0, ids.shape[1]:].tolist()
    return trace


def _same_recording(a, b, atol):
    assert a.token_ids == b.token_ids
    for s in range(a.num_steps):
        np.testing.assert_allclose(a.attention_weights(s), b.attention_weights(s), atol=atol, rtol=0)
    np.testing.assert_allclose(a.arrays["residual"], b.arrays["residual"], atol=atol, rtol=atol)
    la, lb = a.lens_stats, b.lens_stats
    for col in ("chosen_prob", "entropy"):
        np.testing.assert_allclose(la[col].values, lb[col].values, atol=atol, rtol=atol)
    np.testing.assert_allclose(a.lens.prob.values, b.lens.prob.values, atol=atol, rtol=atol)


@two_gpus
def test_sharded_tokens_attention_and_lens(split_lms):
    """Tokens equal model.generate on the same sharded model (greedy and seeded sampling); attention rows, residuals
    and the lens within 1e-5 of the same float32 weights on one GPU."""
    sharded, one = split_lms
    got, want = _generate_parity(sharded), _generate_parity(one)
    assert got.arrays["attention"].shape[2] == 4 and got.arrays["residual"].shape[2] == 4
    _same_recording(got, want, atol=1e-5)


@two_gpus
def test_sharded_sessions_compare_and_score(split_lms):
    sharded, one = split_lms
    s = sharded.session(PROMPT, max_new_tokens=10, eos_token_id=[], do_sample=True, seed=1,
                        record=dl.Record(attention=True, lens=True))
    s.step(10)
    first = s.trace.token_ids
    s.rewind(to=4)
    s.step(6)
    assert s.trace.token_ids == first
    alone = one.session(PROMPT, max_new_tokens=10, eos_token_id=[], do_sample=True, seed=1,
                        record=dl.Record(attention=True, lens=True))
    alone.step(10)
    _same_recording(s.trace, alone.trace, atol=1e-5)
    g = sharded.session(PROMPT, max_new_tokens=10, eos_token_id=[], record=dl.Record(attention=True, lens=True))
    g.step(10)
    fork = g.fork(at=4)
    fork.step(6)
    assert fork.trace.token_ids == g.trace.token_ids
    _same_recording(fork.trace, g.trace, atol=1e-5)
    a = sharded.score(PROMPT, " and the continuation is scored")
    b = one.score(PROMPT, " and the continuation is scored")
    np.testing.assert_allclose(a.steps.logprob.values, b.steps.logprob.values, atol=1e-5)
    from tests.test_compare import STRATEGIES, check

    check(sharded, STRATEGIES, 12)


def _syncs(fn) -> list[str]:
    """Where `fn` synchronises the host (torch's sync debug mode warns at each): file:line of each."""
    import warnings

    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]


@two_gpus
def test_sharded_recording_adds_no_host_synchronisation(split_lms):
    """A decode forward of the sharded model with attention and residuals recorded (rows computed per device,
    gathered on the ids' device) synchronises the host no more often than the plain forward."""
    from types import SimpleNamespace

    from transformers import DynamicCache

    from decoderlab.engine import loop
    from decoderlab.record import Recording

    sharded, _ = split_lms
    ids, _ = sharded.encode(PROMPT)
    plain_cache, rec_cache = DynamicCache(), DynamicCache()
    loop.forward(sharded.model, ids, plain_cache)
    rec = Recording(dl.Record(attention=True, lens=True))
    full = torch.cat([ids, ids[:, -1:]], 1)
    with rec.attached(sharded.model):
        rec.before_forward(SimpleNamespace(ids=ids), 0)
        loop.forward(sharded.model, ids, rec_cache)

        def recorded():
            rec.before_forward(SimpleNamespace(ids=full), 1)
            loop.forward(sharded.model, ids[:, -1:], rec_cache)
            rec._flush_forward()

        _syncs(lambda: None)  # the debug mode's own first warning (inside torch.cuda) is not a forward's
        n_recorded = _syncs(recorded)
    n_plain = _syncs(lambda: loop.forward(sharded.model, ids[:, -1:], plain_cache))
    assert len(n_recorded) == len(n_plain), (n_recorded, n_plain)
    assert rec.attention[1].device == ids.device and rec.residuals[1].device == ids.device
    assert rec.attention[1].shape[:2] == (1, 4) and rec.residuals[1].shape[:2] == (1, 4)



@pytest.fixture(scope="module", params=["llama", "qwen2", "gpt2"])
def fast_lm(request, tokenizer):
    """Architectures the fast path captures (sliding-window models are refused: tests/test_fast.py)."""
    return dl.LM(make_tiny(request.param, tokenizer).to("cuda"), tokenizer, name=request.param)


class _Seen(list):
    keep = None  # fast.keep, which the fixture turns off


@pytest.fixture
def captures(monkeypatch):
    """The fast path's decoders of a test, each seen when it captures its decode step."""
    from decoderlab.engine import fast

    seen = _Seen()
    capture = fast.CapturedDecoder._capture
    seen.keep = fast.keep
    monkeypatch.setattr(fast, "keep", lambda decoder: None)  # each run captures its own step (a kept one: below)

    def spy(self, model, input_ids):
        seen.append(self)
        return capture(self, model, input_ids)

    monkeypatch.setattr(fast.CapturedDecoder, "_capture", spy)
    return seen


@pytest.mark.parametrize("words", [dict(), dict(do_sample=True, top_k=20, temperature=0.8, seed=3),
                                   dict(do_sample=True, top_p=0.9, repetition_penalty=1.3, seeds=[1, 2, 3])],
                         ids=["greedy", "top_k", "rows"])
def test_fast_path_on_gpu_records_what_the_eager_path_records(fast_lm, words, captures):
    """compile=True on the GPU: the decode step captured as a CUDA graph, with compiled layers, replayed; tokens
    equal the eager run's (float32), every recorded array within float16 storage (attention rows within 2e-3)."""
    from tests.test_fast import EVERYTHING, PROMPT, same_trace

    a = fast_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, **words)
    b = fast_lm.generate(PROMPT, max_new_tokens=14, record=EVERYTHING, progress=False, compile=True, **words)
    assert len(captures) == 1 and captures[0].graph is not None and captures[0].decode_steps == 13
    same_trace(a, b, attention_atol=2e-3)


def test_fast_path_on_gpu_rows_ending_at_eos(fast_lm, captures):
    """Rows that reach EOS stay in the captured batch and are recorded as the eager run's retired rows."""
    from tests.test_fast import EVERYTHING, PROMPT, same_trace

    words = dict(do_sample=True, temperature=1.5, max_new_tokens=20, seeds=[0, 1, 2, 3])
    free = fast_lm.generate(PROMPT, eos_token_id=[], progress=False, **words)
    counts = np.unique(free.arrays["token_id"][:8], return_counts=True)
    eos = int(counts[0][np.argmax(counts[1])])
    a = fast_lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, **words)
    b = fast_lm.generate(PROMPT, eos_token_id=eos, pad_token_id=0, record=EVERYTHING, progress=False, compile=True,
                        **words)
    assert captures and captures[0].graph is not None
    same_trace(a, b, attention_atol=2e-3)


def test_long_gpu_run_stages_chunks_to_pinned_memory_and_records_the_same_numbers(gpu_lm, monkeypatch):
    """On a GPU each chunk of steps is copied to page-locked host memory without waiting, and converted a few
    steps at a time later; the trace equals one built from per-step tensors kept on the GPU to the end."""
    import decoderlab.record.recording as record_mod
    from decoderlab.record import host as host_mod

    staged = []
    pinned = host_mod.to_pinned

    def spy(items):
        out = pinned(items)
        staged.extend(x for x in out if x is not None and x.device.type == "cpu")
        return out

    monkeypatch.setattr(record_mod, "to_pinned", spy)
    opts = dict(max_new_tokens=150, eos_token_id=[], do_sample=True, seeds=[3, 4], progress=False,
                record=dl.Record(attention=True, lens=True, logits=True))
    a = gpu_lm.generate("Hello there", **opts)
    assert staged and all(x.is_pinned() for x in staged)
    monkeypatch.setattr(record_mod, "HOST_CHUNK", 10**9)
    b = gpu_lm.generate("Hello there", **opts)
    assert set(a.arrays) == set(b.arrays)
    for name in b.arrays:
        np.testing.assert_array_equal(a.arrays[name], b.arrays[name], err_msg=name)


@pytest.mark.parametrize("words", [dict(), dict(do_sample=True, top_p=0.9, seed=2)], ids=["greedy", "top_p"])
def test_fast_path_synchronises_no_more_for_more_steps(fast_lm, words):
    """On the fast path the host waits on events only (the numbers check and the EOS check read flags copied
    without waiting for the next forward): the synchronising calls of a run (prompt, warm-up, capture, the last
    step, building the trace) do not grow with its steps, with everything recorded."""
    from tests.test_fast import EVERYTHING, PROMPT

    from decoderlab.engine import fast

    def run(n):
        def go():
            fast.forget(fast_lm.model)  # each run warms up and captures
            fast_lm.generate(PROMPT, max_new_tokens=n, eos_token_id=[], record=EVERYTHING, progress=False,
                             compile=True, **words)
        return go

    from collections import Counter

    run(20)()  # compile and plans first
    _syncs(lambda: None)  # the debug mode's own first warning (inside torch.cuda) is not a run's
    short, long = Counter(_syncs(run(20))), Counter(_syncs(run(80)))
    assert not long - short, (long - short, short)


def test_fast_path_progress_bar_says_it_is_compiling(fast_lm, monkeypatch, capsys):
    """The progress bar names the layer the warm-up has reached while it compiles, then the capture, then goes
    back to 'decoding' (the threshold set to 0 here: these layers may be compiled already)."""
    from decoderlab.engine import fast
    from tests.test_fast import PROMPT

    monkeypatch.setattr(fast, "COMPILE_NOTICE_AFTER", -1.0)
    fast.forget(fast_lm.model)  # a kept step would be replayed without a warm-up
    trace = fast_lm.generate(PROMPT, max_new_tokens=6, progress=True, compile=True)
    err = capsys.readouterr().err
    layers = fast_lm.model.config.num_hidden_layers
    assert f"compiling layer 1/{layers}" in err and f"compiling layer {layers}/{layers}" in err
    assert "capturing the step" in err and trace.num_steps == 6
    assert err.rindex("decoding") > err.rindex("capturing the step")


def test_fast_path_on_gpu_longer_cache_captures_without_compiling(fast_lm, captures, monkeypatch):
    """A run whose prompt + max_new_tokens need a longer static cache than the run before captures a new graph but
    compiles nothing (the key length is a symbol in the compiled layers), and records what the eager path
    records. (Caches in steps of 64 here: these models' context window is 256.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from decoderlab.engine import fast
    from tests.test_fast import EVERYTHING, PROMPT, same_trace

    monkeypatch.setattr(fast, "LENGTH_STEP", 64)
    torch._dynamo.reset()  # compiled afresh here (earlier tests' recompiles may have made shapes dynamic anyway)
    fast_lm.generate(PROMPT, max_new_tokens=8, record=EVERYTHING, progress=False, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    longer = 100
    a = fast_lm.generate(PROMPT, max_new_tokens=longer, record=EVERYTHING, progress=False, eos_token_id=[])
    b = fast_lm.generate(PROMPT, max_new_tokens=longer, record=EVERYTHING, progress=False, eos_token_id=[],
                         compile=True)
    assert [d.max_length for d in captures][-2:] == [fast.LENGTH_STEP, 2 * fast.LENGTH_STEP]
    assert counters["stats"]["unique_graphs"] == graphs
    same_trace(a, b, attention_atol=2e-3)


def test_fast_path_on_gpu_replays_the_step_an_earlier_run_captured(fast_lm, captures, monkeypatch):
    """A run with the cache length, rows and recording of an earlier one replays the step that run captured from
    its first decode step (no warm-up, no capture), with another prompt and other sampling words, and records
    what the eager path records; a run recording something else captures its own, and so does one after a forward
    hook was added (here one that moves a layer's output: its effect is in the tokens and logits)."""
    from decoderlab.engine import fast
    from tests.test_fast import EVERYTHING, PROMPT, same_trace

    monkeypatch.setattr(fast, "keep", captures.keep)
    fast.forget(fast_lm.model)
    words = dict(max_new_tokens=12, progress=False, eos_token_id=[])
    fast_lm.generate(PROMPT, record=EVERYTHING, compile=True, **words)
    assert len(captures) == 1
    other = dict(words, do_sample=True, top_p=0.9, seed=5)
    same_trace(fast_lm.generate("Another, shorter prompt", record=EVERYTHING, **other),
               fast_lm.generate("Another, shorter prompt", record=EVERYTHING, compile=True, **other),
               attention_atol=2e-3)
    assert len(captures) == 1
    fast_lm.generate(PROMPT, record=dl.Record(), compile=True, **words)
    assert len(captures) == 2
    layer = fast.decoder_layers(fast_lm.model)[0]
    handle = layer.register_forward_hook(lambda module, args, out: (out[0] + 0.5, *out[1:])
                                         if isinstance(out, tuple) else out + 0.5)
    try:
        hooked = fast_lm.generate(PROMPT, record=EVERYTHING, **words)
        same_trace(hooked, fast_lm.generate(PROMPT, record=EVERYTHING, compile=True, **words), attention_atol=2e-3)
        assert len(captures) == 3
    finally:
        handle.remove()
    same_trace(fast_lm.generate(PROMPT, record=EVERYTHING, **words),
               fast_lm.generate(PROMPT, record=EVERYTHING, compile=True, **words), attention_atol=2e-3)
    assert len(captures) == 3  # the first run's step again, without the hook's effect
