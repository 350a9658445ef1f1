"""A wider sweep of architectures: generate parity, attention rows vs eager, lens, rewind.

The six main architectures are tested in depth elsewhere; these catch what differs in others
(QK-norm, MoE, logit scaling, attention sinks, OPT's decoder layout, ALiBi's eager fallback).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as tf

import decoderlab as dl

PROMPT = "The cat sat on the mat and looked at the bird outside the window."


def config(name: str, vocab: int):
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, vocab_size=vocab, bos_token_id=1,
                eos_token_id=2, pad_token_id=2)
    plain = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    return {
        "qwen3": lambda: tf.Qwen3Config(head_dim=16, **base),
        "gemma3": lambda: tf.Gemma3TextConfig(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, **base),
        "olmo2": lambda: tf.Olmo2Config(**base),
        "mixtral": lambda: tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **base),
        "cohere": lambda: tf.CohereConfig(logit_scale=0.5, **base),
        "granite": lambda: tf.GraniteConfig(logits_scaling=4.0, **base),
        "starcoder2": lambda: tf.Starcoder2Config(sliding_window=8, **base),
        "gpt_oss": lambda: tf.GptOssConfig(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                                           layer_types=["sliding_attention", "full_attention"], **base),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=256, **plain),
        "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=256, word_embed_proj_dim=64, **plain),
        "bloom": lambda: tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **plain),
    }[name]()


@pytest.mark.parametrize("arch", ["qwen3", "gemma3", "olmo2", "mixtral", "cohere", "granite", "starcoder2",
                                  "gpt_oss", "gpt_neox", "opt", "bloom"])
def test_architecture(tokenizer, arch):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.AutoModelForCausalLM.from_config(config(arch, len(tokenizer))).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 0.3)
    lm = dl.LM(model, tokenizer, name=arch)
    ids, _ = lm.encode(PROMPT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = lm.generate(PROMPT, max_new_tokens=10, eos_token_id=[], progress=False,
                            record=dl.Record(attention=True, lens=True, top_k=5, lens_top_k=5))
    fallback = any("eager" in str(w.message) for w in caught)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, min_new_tokens=10,
                         do_sample=False, eos_token_id=None)
    assert trace.token_ids == out[0, ids.shape[1]:].tolist()

    P = len(trace.prompt_ids)
    if fallback:  # the model cannot switch implementations: rows come from its eager path
        assert arch == "bloom"
        for s in (0, 5, 9):
            np.testing.assert_allclose(trace.attention_weights(s).sum(-1), 1.0, atol=2e-3)
    else:
        full = torch.tensor([list(trace.prompt_ids) + trace.token_ids])
        impl = model.config._attn_implementation
        model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = model(input_ids=full, output_attentions=True, use_cache=False)
        model.set_attn_implementation(impl)
        for s in (0, 1, 9):
            want = torch.stack([a[0, :, P - 1 + s, : P + s] for a in eager.attentions]).numpy()
            np.testing.assert_allclose(trace.attention_weights(s), want, atol=1e-3)

    last = trace.lens[trace.lens.layer == trace.lens.layer.max()]
    for s in range(trace.num_steps):
        mine = last[last.step == s]
        model_top = trace.candidates[trace.candidates.step == s]
        assert mine.token_id.tolist() == model_top.token_id.tolist()
        np.testing.assert_allclose(mine.prob.values, model_top.prob.values, rtol=1e-3, atol=1e-6)

    s = lm.session(PROMPT, max_new_tokens=10, eos_token_id=[])
    s.step(10)
    s.rewind(to=2)
    s.step(8)
    assert s.trace.token_ids == trace.token_ids
