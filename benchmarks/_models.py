"""The model a benchmark times: the default model (or `--model PATH`), or a model of a named shape with random weights.

Why random weights: a GPU machine has no copy of any weights and cannot download them, and a decode step's
cost depends on the shapes, not on the values. A shape folder holds a `config.json` and the default model's
tokenizer; write them here, where the default model is at hand, and carry them to the GPU:

    .venv/bin/python benchmarks/_models.py .bench          # .bench/smollm2, .bench/llama-1b, .bench/llama-8b
    python benchmarks/bench_overhead.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16

The Llama shapes keep Llama 3's vocabulary (128,256 rows in the unembedding, as the real models pay for); the
tokenizer has 49,152 tokens, so ids past it decode as empty text, which no timing depends on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl

LLAMA3 = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, head_dim=64,
              rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, max_position_embeddings=131072,
              rms_norm_eps=1e-5, hidden_act="silu")
SHAPES = {
    # Llama 3.2 1B: 1.24 B parameters, tied embeddings
    "llama-1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    # Llama 3.1 8B: 8.03 B parameters
    "llama-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The words every benchmark takes to pick its model."""
    ap.add_argument("--model", default=None, help="a model path or id (default: the bundled SmolLM2)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the model's own, float32 for random weights)")
    ap.add_argument("--random-weights", default=None, metavar="DIR",
                    help="build the model from DIR's config.json with random weights (same shapes and cost; for "
                         "machines that lack the weights) and use DIR's tokenizer (see benchmarks/_models.py)")


def load(args: argparse.Namespace) -> dl.LM:
    """The model the arguments name."""
    if not args.random_weights:
        return dl.load(args.model, device=args.device, dtype=args.dtype)
    return random_lm(args.random_weights, args.device or "cpu", getattr(torch, args.dtype or "float32"))


def random_lm(folder: str | Path, device: str, dtype: torch.dtype) -> dl.LM:
    """A model with random weights built from `folder`'s config.json, on `device` from the start (an 8B model
    initialised on the host first would take minutes), with `folder`'s tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return dl.LM(model.eval(), AutoTokenizer.from_pretrained(folder), name=f"{Path(folder).name} (random weights)")


def write_shapes(out: Path) -> None:
    """One folder per shape: config.json and the default model's tokenizer; `smollm2` is the default model's
    own config."""
    lm = dl.load()
    tok = lm.tokenizer
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    smol = lm.model.config.to_dict()
    smol.pop("_name_or_path", None)
    for name, cfg in {"smollm2": smol, **SHAPES}.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
        (folder / "config.json").write_text(json.dumps({**cfg, **ids, "dtype": "float32"}, indent=2))
        print(folder)


if __name__ == "__main__":
    write_shapes(Path(sys.argv[1] if len(sys.argv) > 1 else ".bench"))
