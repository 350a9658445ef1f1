"""Recorded attention rows equal the last row of eager `output_attentions` (1e-5, float32)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import decoderlab as dl
from tests.conftest import ARCHS, make_tiny


def eager_rows(model, ids: torch.Tensor, positions: list[int]) -> dict[int, np.ndarray]:
    """Run the same model eagerly (no cache) and return, per position p, the attention row of query p: [L, H, p+1]."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(before)
    return {p: torch.stack([a[0, :, p, : p + 1] for a in out.attentions]).numpy() for p in positions}


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_match_eager_attention(tiny_lms, arch):
    lm = tiny_lms[arch]
    prompt = "The cat sat on the mat and looked at the bird outside."
    before = lm.model.config._attn_implementation
    trace = lm.generate(prompt, max_new_tokens=14, eos_token_id=[], record=dl.Record(attention=True, logits=True),
                        progress=False)
    assert lm.model.config._attn_implementation == before  # the user's implementation comes back
    ids = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
    P = len(trace.prompt_ids)
    # step 0 comes from the prefill, step 1 is the first decode step, and one later step; the prompt
    # is longer than Mistral's/Gemma2's sliding window (8), so windowed layers are exercised.
    steps = [0, 1, 9]
    want = eager_rows(lm.model, ids, [P - 1 + s for s in steps])
    for s in steps:
        got = trace.attention_weights(s)
        assert got.shape == want[P - 1 + s].shape
        np.testing.assert_allclose(got, want[P - 1 + s], atol=1e-3)  # stored as float16


def rows_against_eager(lm, sink) -> None:
    """Record rows of steps 0, 1 and 5 into `sink` (which fills `sink.got[step][layer]`) and compare each with
    eager attention within 1e-5; a sliding-window cache hands the function only the most recent keys, so the row
    is compared with the right end of the eager row, whose other positions must be 0."""
    from decoderlab.engine import attention
    from decoderlab.engine import loop

    ids, _ = lm.encode("A long enough prompt to pass a sliding window of eight tokens")
    strategy = lm.strategy(ids.shape[1], max_new_tokens=6, eos_token_id=[])
    with attention.recording(lm.model, sink):
        state = loop.prefill(lm.model, ids, strategy)
        for n in range(1, 6):
            loop.step(lm.model, state, strategy)
            sink.step = n
            loop.ensure_logits(lm.model, state)
    P = ids.shape[1]
    want = eager_rows(lm.model, state.ids, [P - 1 + s for s in (0, 1, 5)])
    for s in (0, 1, 5):
        assert sorted(sink.got[s]) == list(range(len(want[P - 1 + s])))
        for layer, row in sink.got[s].items():
            expected = want[P - 1 + s][layer]
            k = row.shape[-1]
            np.testing.assert_allclose(row.numpy(), expected[..., -k:], atol=1e-5)
            assert np.abs(expected[..., :-k]).max(initial=0.0) == 0.0


class RowSink:
    """Keeps each step's rows as the recording function hands them (computed inside it)."""

    wants_full = False

    def __init__(self):
        self.got: dict[int, dict[int, torch.Tensor]] = {}
        self.step = 0

    def __call__(self, layer, row, full):
        self.got.setdefault(self.step, {})[layer] = row[0].clone()


class DeferringSink(RowSink):
    """Takes the layer's last query and keys instead, where no mask applies, and computes the row with `last_rows`."""

    def defer(self, layer, query, key, scaling):
        from decoderlab.engine import attention

        self.got.setdefault(self.step, {})[layer] = attention.last_rows([query], [key], scaling)[0, 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_match_eager_attention_in_float32(tiny_lms, arch):
    """The row computed inside the recording function, before float16 storage, is within 1e-5 of eager."""
    rows_against_eager(tiny_lms[arch], RowSink())


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_of_all_layers_at_once_match_eager_in_float32(tiny_lms, arch):
    """Where no mask applies, the recording function hands the layer's last query and keys to the sink's `defer`;
    `last_rows` computes every layer's row in one product (GQA heads share their key head), within 1e-5 of eager."""
    rows_against_eager(tiny_lms[arch], DeferringSink())


def test_last_rows_batches_layers_in_chunks():
    """Layers taken a few at a time (to bound the float32 copy of the keys) give the rows taken all at once."""
    from decoderlab.engine import attention

    g = torch.Generator().manual_seed(0)
    queries = [torch.randn(2, 8, 1, 16, generator=g) for _ in range(5)]
    keys = [torch.randn(2, 2, 11, 16, generator=g) for _ in range(5)]
    whole = attention.last_rows(queries, keys, 0.25)
    assert whole.shape == (5, 2, 8, 11)
    torch.testing.assert_close(attention.last_rows(queries, keys, 0.25, max_elements=2 * 2 * 11 * 16 * 2), whole)
    by_hand = torch.softmax(queries[3] @ keys[3].repeat_interleave(4, 1).transpose(-1, -2) * 0.25, -1)[:, :, 0]
    torch.testing.assert_close(whole[3], by_hand)


def test_narrowing_layers_and_heads(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("Hello world", max_new_tokens=4, progress=False,
                        record=dl.Record(attention=True, attention_layers=[1], attention_heads=[0, 3]))
    assert trace.arrays["attention"].shape[2:4] == (1, 2)
    assert trace.attention_layers == [1] and trace.attention_heads == [0, 3]
    full = lm.generate("Hello world", max_new_tokens=4, progress=False, record=dl.Record(attention=True))
    np.testing.assert_array_equal(trace.attention_weights(2), full.attention_weights(2)[[1]][:, [0, 3]])
    frame = trace.attention_frame(steps=[2], mean_over=("head",))
    assert set(frame.layer) == {1} and "head" not in frame.columns
    assert frame.weight.sum() == pytest.approx(1.0, abs=1e-2)  # one row, averaged over heads, sums to 1


def test_long_frame_and_rows_sum_to_one(tiny_lms):
    lm = tiny_lms["qwen2"]
    trace = lm.generate("Attention please", max_new_tokens=5, progress=False, record=dl.Record(attention=True))
    df = trace.attention
    assert list(df.columns) == ["step", "branch", "row", "layer", "head", "position", "source_token", "weight"]
    sums = df.groupby(["step", "layer", "head"]).weight.sum()
    np.testing.assert_allclose(sums.values, 1.0, atol=1e-2)
    # the source token of the last position of step s is the token generated at step s-1
    last = df[(df.step == 3) & (df.position == df[df.step == 3].position.max())]
    assert set(last.source_token) == {trace.tokens[2]}


def test_prefill_attention_is_the_full_matrix(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("one two three four", max_new_tokens=2, progress=False,
                        record=dl.Record(prefill_attention=True))
    ids = torch.tensor([list(trace.prompt_ids)])
    P = ids.shape[1]
    before = lm.model.config._attn_implementation
    lm.model.set_attn_implementation("eager")
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_attentions=True)
    lm.model.set_attn_implementation(before)
    for layer, m in trace.prefill_attention.items():
        np.testing.assert_allclose(m[0].astype(np.float32), out.attentions[layer][0].numpy(), atol=1e-3)
    assert trace.prefill_attention[0].shape == (1, 4, P, P)


def test_unsupported_architecture_falls_back_to_eager_with_a_warning(tokenizer, monkeypatch):
    model = make_tiny("llama", tokenizer, seed=3)
    lm = dl.LM(model, tokenizer)
    fast = lm.generate("Fallback please", max_new_tokens=5, progress=False, record=dl.Record(attention=True))
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", lambda self: False)
    with pytest.warns(UserWarning, match="eager"):
        slow = lm.generate("Fallback please", max_new_tokens=5, progress=False, record=dl.Record(attention=True))
    assert slow.token_ids == fast.token_ids
    for s in range(5):
        np.testing.assert_allclose(slow.attention_weights(s), fast.attention_weights(s), atol=1e-3)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.integration
def test_smollm2_rows_match_eager(smol):
    trace = smol.generate("What is the capital of France?", chat=True, max_new_tokens=8, progress=False,
                          record=dl.Record(attention=True))
    ids = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
    P = len(trace.prompt_ids)
    want = eager_rows(smol.model, ids, [P - 1, P, P + 5])
    for s in (0, 1, 6):
        np.testing.assert_allclose(trace.attention_weights(s), want[P - 1 + s], atol=2e-3)
