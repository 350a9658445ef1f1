"""What recording costs: decoderlab's loop against plain `model.generate`, in the same process.

    .venv/bin/python benchmarks/bench_overhead.py [--tokens 256] [--repeats 5] [--model PATH] [--device cpu]
    python benchmarks/bench_overhead.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16

Greedy decoding of a fixed number of tokens (EOS off, so every run is the same length), runs
interleaved so drift hits all variants alike; prints the median time of each and its ratio to
plain `generate`. The bar: Record() defaults <= 1.05x, everything on (attention, lens, fp16
logits) <= 1.25x.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl
from _models import add_arguments, load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lens-read", action="store_true", help="also time reading trace.lens (the lazy lens pass)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    prompt = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    ids, _ = lm.encode(prompt, chat=True)
    n = args.tokens
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    def plain():
        lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None)

    def recorded(record, read_lens=False):
        def run():
            t = lm.generate(prompt, chat=True, max_new_tokens=n, eos_token_id=[], progress=False, record=record)
            assert t.num_steps == n
            if read_lens:
                t.lens
        return run

    variants = {
        "generate": plain,
        "Record()": recorded(dl.Record()),
        "Record(attention, lens, logits)": recorded(dl.Record(attention=True, lens=True, logits=True)),
    }
    if args.lens_read:
        variants["... and reading trace.lens"] = recorded(dl.Record(attention=True, lens=True, logits=True), True)
    for fn in variants.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["generate"])
    print(f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()} "
          f"prompt={ids.shape[1]} tokens, {n} new tokens, {args.repeats} repeats (median)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34} {med:8.3f} s  {n / med:7.1f} tok/s  ratio {med / base:5.3f}")


if __name__ == "__main__":
    main()
