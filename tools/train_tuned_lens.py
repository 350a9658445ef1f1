"""Train a tuned lens for a model and save it in the format the `tuned-lens` package reads and writes.

    .venv/bin/python tools/train_tuned_lens.py --out lenses/smollm2 [--model PATH] [--steps 300] [--lr 1e-3]

A tuned lens (Belrose et al., 2023) gives each layer an affine translator h -> h + A h + b, trained so that the
final norm and unembedding of the translated residual predict what the model's last layer predicts (the KL
divergence from the model's own next-token distribution to the lens's, averaged over positions and layers). The
translators start at zero (the logit lens) and are trained on the residual streams of text: by default this
repository's own docs pages (no download), in chunks of `--length` tokens.

The folder holds `config.json` and `params.pt` (the state dict of `layer_translators`, keys "{i}.weight" and
"{i}.bias"), so `dl.tuned_lens(lm, folder)` and `tuned_lens.TunedLens.from_model_and_pretrained(model, folder)`
both read it. Training is a script, not a test: a few minutes on 2 CPU cores for the default model.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl
from decoderlab.engine.tuned_lens import train_tuned_lens

ROOT = Path(__file__).resolve().parent.parent


def chunks(lm, length: int) -> list[torch.Tensor]:
    """The docs pages as token chunks of `length`."""
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    ids = lm.tokenizer(text, return_tensors="pt").input_ids[0]
    return [ids[i : i + length] for i in range(0, len(ids) - length, length)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the folder to write config.json and params.pt to")
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--length", type=int, default=128, help="tokens per training chunk")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    lm = dl.load(args.model)
    model = lm.model.eval().requires_grad_(False)

    def log(step: int, loss: float) -> None:
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  KL(model || tuned lens), mean over layers = {loss:.3f} nats", flush=True)

    out = train_tuned_lens(model, chunks(lm, args.length), args.out, steps=args.steps, lr=args.lr, seed=args.seed,
                           name=lm.name, log=log)
    print(f"wrote {out / 'config.json'} and {out / 'params.pt'}")


if __name__ == "__main__":
    main()
