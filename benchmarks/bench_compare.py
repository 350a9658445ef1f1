"""What batching buys: `dl.compare` against the same distinct runs made one by one with `lm.generate`.

    .venv/bin/python benchmarks/bench_compare.py [--seeds 5] [--tokens 64] [--model PATH] [--device cpu]

Eight strategies (greedy, beam 4, top-k 50, nucleus 0.9, min-p 0.1, typical 0.9, temperature 0.7,
contrastive search) × `--seeds` seeds on one chat prompt, EOS off so every run is the same length.
Strategies that do not sample run once. Both sides make exactly the same runs, in one process; the
table gives each side's time and the speed-up. Bar (README): >= 5x on the default model on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl

STRATEGIES = {
    "greedy": {},
    "beam 4": {"num_beams": 4},
    "top-k 50": {"do_sample": True, "top_k": 50},
    "nucleus 0.9": {"do_sample": True, "top_p": 0.9, "top_k": 0},
    "min-p 0.1": {"do_sample": True, "min_p": 0.1, "top_k": 0},
    "typical 0.9": {"do_sample": True, "typical_p": 0.9, "top_k": 0},
    "temperature 0.7": {"do_sample": True, "temperature": 0.7},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    lm = dl.load(args.model, device=args.device)
    prompt = "Write a short story about a lighthouse keeper."
    strategies = {name: {**words, "eos_token_id": []} for name, words in STRATEGIES.items()}
    seeds = list(range(args.seeds))
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    dl.compare(lm, prompt, {"greedy": strategies["greedy"]}, max_new_tokens=4, chat=True, progress=False)  # warm up
    sync()
    t0 = time.perf_counter()
    cmp = dl.compare(lm, prompt, strategies, seeds=seeds, max_new_tokens=args.tokens, chat=True, progress=False)
    sync()
    batched = time.perf_counter() - t0
    n_runs = len(cmp.runs)

    t0 = time.perf_counter()
    alone = 0
    for name, words in strategies.items():
        for seed in seeds if words.get("do_sample") else [None]:
            lm.generate(prompt, chat=True, seed=seed, max_new_tokens=args.tokens, progress=False, **words)
            alone += 1
    sync()
    one_by_one = time.perf_counter() - t0
    print(f"model={lm.name} device={lm.device} threads={torch.get_num_threads()} {len(strategies)} strategies x "
          f"{args.seeds} seeds, {args.tokens} new tokens: {n_runs} runs (one by one: {alone})")
    print(f"one by one with lm.generate  {one_by_one:8.2f} s")
    print(f"dl.compare, one batch         {batched:8.2f} s")
    print(f"speed-up                      {one_by_one / batched:8.2f} x")


if __name__ == "__main__":
    main()
