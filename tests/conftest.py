"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models of several architectures, SmolLM2 itself."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import decoderlab as dl
from decoderlab.engine.models import default_model_dir

ARCHS = ["llama", "qwen2", "mistral", "gemma2", "gpt2", "phi3"]


@pytest.fixture(scope="session")
def smol_dir():
    """The converted default model; DECODERLAB_TEST_TOKENIZER names a folder with just its tokenizer
    (for machines without the model package, e.g. a lent GPU running tests/test_cuda.py)."""
    from pathlib import Path

    override = os.environ.get("DECODERLAB_TEST_TOKENIZER")
    return Path(override) if override else default_model_dir()


@pytest.fixture(scope="session")
def tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def tiny_config(arch: str, vocab: int, **overrides):
    """A 2-layer config of the named architecture, small enough for unit tests to take seconds."""
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    else:
        base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, **common)
        if arch == "llama":
            cfg = tf.LlamaConfig(**base)
        elif arch == "qwen2":
            cfg = tf.Qwen2Config(**base)
        elif arch == "mistral":
            cfg = tf.MistralConfig(sliding_window=8, **base)
        elif arch == "gemma2":
            cfg = tf.Gemma2Config(head_dim=16, sliding_window=8, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=30.0, query_pre_attn_scalar=16, **base)
        elif arch == "phi3":
            cfg = tf.Phi3Config(**base)
        else:
            raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny(arch: str, tokenizer, seed: int = 0, attn: str | None = None, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, len(tokenizer), **overrides)
    attn = attn or ("eager" if arch == "gemma2" else "sdpa")  # Gemma2 has no sdpa path in transformers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    # Random init gives near-uniform logits; a larger unembedding makes the distributions peaked like a real LM's.
    with torch.no_grad():
        out = model.get_output_embeddings()
        if out.weight is model.get_input_embeddings().weight:
            out.weight.mul_(4.0)
        else:
            out.weight.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_lms(tokenizer):
    """One LM per architecture, built once."""
    return {arch: dl.LM(make_tiny(arch, tokenizer), tokenizer, name=f"tiny-{arch}") for arch in ARCHS}


@pytest.fixture(params=ARCHS)
def tiny_lm(request, tiny_lms):
    return tiny_lms[request.param]


@pytest.fixture(scope="session")
def smol():
    return dl.load()


# ---- timings that tests report (printed at the end of the run, never asserted) -----------------------
TIMINGS: list[tuple[str, float]] = []


@pytest.fixture
def timing():
    """`timing(what, seconds)`: report a measured time in the run's summary (speed is measured, not asserted)."""
    return lambda what, seconds: TIMINGS.append((what, seconds))


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.section("decoderlab timings (measured, not asserted)")
        for what, seconds in TIMINGS:
            terminalreporter.write_line(f"{1000 * seconds:8.0f} ms  {what}")
