"""Record options are checked, and your own recorders run when a Record asks for them."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import decoderlab as dl


@dl.recorder("margin")
def margin(ctx, record):
    top2 = ctx.logits.topk(2).values
    return {"margin": top2[:, 0] - top2[:, 1]}


def test_own_recorder_runs_and_survives_save(tiny_lms, tmp_path):
    lm = tiny_lms["llama"]
    trace = lm.generate("Hello", max_new_tokens=4, progress=False, record=dl.Record(extra=["margin"], logits=True))
    logits = torch.from_numpy(trace.arrays["logits"][:, 0].astype(np.float32))
    top2 = logits.topk(2).values
    np.testing.assert_allclose(trace.arrays["margin"][:, 0], (top2[:, 0] - top2[:, 1]).numpy(), atol=1e-2)
    back = dl.Trace.load(trace.save(tmp_path / "m.parquet"))
    np.testing.assert_array_equal(back.arrays["margin"], trace.arrays["margin"])


@pytest.mark.parametrize("options,match", [
    (dict(top_k=0), "top_k"),
    (dict(lens_top_k=-1), "lens_top_k"),
    (dict(logits="yes"), "logits"),
    (dict(attention_layers=5), "attention_layers"),
    (dict(attention_heads=[]), "attention_heads"),
    (dict(attention_heads=[-1]), "attention_heads"),
    (dict(extra=["no-such-recorder"]), "no recorder registered"),
])
def test_bad_record_options(options, match):
    with pytest.raises(ValueError, match=match):
        dl.Record(**options)


def test_layers_and_heads_checked_against_the_model(tiny_lms):
    lm = tiny_lms["llama"]  # 2 layers, 4 heads
    with pytest.raises(ValueError, match="2 layers"):
        lm.generate("x", max_new_tokens=2, progress=False, record=dl.Record(attention=True, attention_layers=[5]))
    with pytest.raises(ValueError, match="4 heads"):
        lm.session("x", record=dl.Record(attention=True, attention_heads=[9]))
    trace = lm.generate("x", max_new_tokens=2, progress=False, record=dl.Record(attention=True, attention_layers=[1]))
    with pytest.raises(ValueError, match="were not recorded"):
        trace.attention_frame(layers=[0])


def test_lens_top_k_larger_than_vocabulary(tiny_lms):
    lm = tiny_lms["qwen2"]
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    trace = lm.generate("x", max_new_tokens=1, progress=False, record=dl.Record(lens=True, lens_top_k=vocab + 10))
    assert trace.lens.groupby(["step", "layer"]).size().max() == vocab


def test_in_place_processor_works_everywhere(tiny_lms):
    from transformers import LogitsProcessor

    class Ban(LogitsProcessor):
        def __call__(self, ids, scores):
            scores[:, [13, 42]] = -float("inf")
            return scores

    lm = tiny_lms["llama"]
    for record in (dl.Record(), dl.Record(processors=False)):
        trace = lm.generate("ban", max_new_tokens=3, progress=False, logits_processor=[Ban()], record=record)
        assert not {13, 42} & set(trace.token_ids)
    s = lm.session("ban", logits_processor=[Ban()])
    assert s.candidates().final_prob[s.candidates().token_id.isin([13, 42])].sum() == 0
    s.choose(token=13)
    assert s.trace.steps.final_prob[0] == 0 and s.trace.steps.prob[0] > 0  # raw logits kept intact


def test_registry_refuses_a_taken_name():
    """A user's recorder cannot silently replace a built-in one (trace.steps reads "choice"'s arrays)."""
    before = dict(dl.STEP_RECORDERS)
    for name in ("choice", "candidates", "processors", "logits", "margin"):
        with pytest.raises(ValueError, match=f"{name!r} is already registered"):
            dl.recorder(name)(lambda ctx, record: {})
    assert dl.STEP_RECORDERS == before
    with pytest.raises(ValueError, match="non-empty string"):
        dl.recorder("")


def test_registry_replaces_when_told(tiny_lms):
    original = dl.STEP_RECORDERS["margin"]
    try:
        @dl.recorder("margin", replace=True)
        def zero_margin(ctx, record):
            return {"margin": torch.zeros(ctx.logits.shape[0])}

        trace = tiny_lms["llama"].generate("Hello", max_new_tokens=3, progress=False,
                                           record=dl.Record(extra=["margin"]))
        assert (trace.arrays["margin"] == 0).all()
    finally:
        dl.recorder("margin", replace=True)(original)
    assert dl.STEP_RECORDERS["margin"] is original


def test_bfloat16_columns_reach_the_host_as_the_same_numbers(tokenizer):
    """A column recorded in bfloat16 (contrastive search's penalty and score are computed in the model's dtype, as
    transformers does) reaches the trace as float32 holding the same numbers (numpy has no bfloat16)."""
    from tests.conftest import make_tiny

    lm = dl.LM(make_tiny("llama", tokenizer).to(torch.bfloat16), tokenizer, name="tiny-bf16")
    kept = {}

    @dl.recorder("bf16_penalty_copy", replace=True)
    def copy_penalty(ctx, record):
        kept[ctx.step] = ctx.decision["contrastive_penalty"].clone()
        return {}

    trace = lm.generate("Once upon a time", penalty_alpha=0.6, top_k=4, max_new_tokens=5, eos_token_id=[],
                        progress=False, record=dl.Record(extra=["bf16_penalty_copy"]))
    penalty = trace.arrays["contrastive_penalty"]
    assert penalty.dtype == np.float32 and trace.num_steps == 5
    for s, want in kept.items():
        assert want.dtype == torch.bfloat16
        assert penalty[s].tolist() == want.float().cpu().numpy().tolist()


def test_long_run_moves_steps_to_host_buffers_with_the_same_numbers(tiny_lms, monkeypatch):
    """Past HOST_CHUNK steps a generate run keeps its steps in host buffers, not as per-step tensors (heap
    fragmentation, issue 19), and records exactly what a run that kept every step as tensors records."""
    import numpy as np

    import decoderlab.lm as lm_mod
    import decoderlab.record as record_mod

    lm = tiny_lms["llama"]
    opts = dict(max_new_tokens=150, eos_token_id=[], do_sample=True, seeds=[3, 4], progress=False,
                record=dl.Record(attention=True, lens=True, logits=True))
    made = []

    class Kept(record_mod.Recording):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(lm_mod, "Recording", Kept)
    spilled = lm.generate("Hello there", **opts)
    rec = made[-1]
    held = [i for col in (*rec.columns.values(), rec.attention, rec.residuals) for i, x in enumerate(col)
            if x is not None]
    assert max(held) >= 150 - record_mod.HOST_CHUNK and min(held) >= 128  # only the last chunk as tensors
    monkeypatch.setattr(record_mod, "HOST_CHUNK", 10**9)  # every step kept as tensors until the trace is built
    kept = lm.generate("Hello there", **opts)
    assert set(spilled.arrays) == set(kept.arrays)
    for name in kept.arrays:
        np.testing.assert_array_equal(spilled.arrays[name], kept.arrays[name], err_msg=name)
    assert spilled.num_steps == 150 and spilled.arrays["attention"].any()
