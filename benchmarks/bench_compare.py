"""What batching buys: `dl.compare` against the same distinct runs made one by one with `lm.generate`.

    .venv/bin/python benchmarks/bench_compare.py [--seeds 5] [--tokens 64] [--model PATH] [--device cpu]
    python benchmarks/bench_compare.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16

Eight strategies (greedy, beam 4, top-k 50, nucleus 0.9, min-p 0.1, typical 0.9, temperature 0.7,
contrastive search) × `--seeds` seeds on one chat prompt, EOS off so every run is the same length.
Strategies that do not sample run once. Both sides make exactly the same runs, in one process; the
table gives each side's time and the speed-up, also written to benchmarks/results/bench_compare-<device>[-<shape>].json
(`--out`). Goals: >= 5x on the default model on 2 CPU cores, >= 15x on one GPU (H100 or H200) with the Llama-1B shape in
bfloat16 (random weights: see benchmarks/_models.py).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl
from _models import add_arguments, load
from _results import add_out_argument, label_for, write

BAR_CPU, BAR_GPU = 5.0, 15.0

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
    ap.add_argument("--repeats", type=int, default=1, help="measure both sides this many times; medians")
    add_arguments(ap)
    add_out_argument(ap)
    args = ap.parse_args()
    lm = load(args)
    prompt = "Write a short story about a lighthouse keeper."
    strategies = {name: {**words, "eos_token_id": []} for name, words in STRATEGIES.items()}
    seeds = list(range(args.seeds))
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)

    def batch(chosen: dict) -> tuple[float, int]:
        gc.collect()  # what earlier runs left for the collector is not this run's cost
        sync()
        t0 = time.perf_counter()
        cmp = dl.compare(lm, prompt, chosen, seeds=seeds, max_new_tokens=args.tokens, chat=True, progress=False)
        sync()
        return time.perf_counter() - t0, len(cmp.run_list)

    def one_by_one(tokens: int, seeds: list[int] = seeds) -> dict[str, float]:
        spent = {}
        for name, words in strategies.items():
            gc.collect()
            sync()
            t0 = time.perf_counter()
            for seed in seeds if words.get("do_sample") else [None]:
                lm.generate(prompt, chat=True, seed=seed, max_new_tokens=tokens, progress=False, **words)
            sync()
            spent[name] = time.perf_counter() - t0
        return spent

    # warm up both sides at full length: on a GPU, each new shape (rows x context length) of the attention kernel
    # costs a plan the first time (cuDNN), about a second over a 64-token run; neither side should pay that here.
    # One seed per strategy warms the one-by-one side: every seed of a strategy runs the same shapes
    dl.compare(lm, prompt, strategies, seeds=seeds, max_new_tokens=args.tokens, chat=True, progress=False)
    one_by_one(args.tokens, seeds[:1])
    batched, alone, n_runs = [], [], 0
    for _ in range(args.repeats):
        seconds, n_runs = batch(strategies)
        batched.append(seconds)
        alone.append(one_by_one(args.tokens))
    per_strategy = {name: statistics.median(a[name] for a in alone) for name in strategies}
    one = statistics.median(sum(a.values()) for a in alone)
    both = statistics.median(batched)
    own_rule = {n: w for n, w in strategies.items() if "penalty_alpha" in w}  # runs alone inside compare too
    shared = statistics.median(batch({n: w for n, w in strategies.items() if n not in own_rule})[0]
                               for _ in range(args.repeats))
    print(f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()} "
          f"{len(strategies)} strategies x {args.seeds} seeds, {args.tokens} new tokens: {n_runs} distinct runs, "
          f"median of {args.repeats}")
    print(f"one by one with lm.generate  {one:8.2f} s")
    print(f"dl.compare, one batch         {both:8.2f} s")
    print(f"speed-up                      {one / both:8.2f} x")
    print(f"  the batch's rows alone ({', '.join(n for n in strategies if n not in own_rule)}): {shared:.2f} s in "
          f"dl.compare, {one - sum(per_strategy[n] for n in own_rule):.2f} s one by one")
    print("  one by one, per strategy: " + ", ".join(f"{n} {t:.2f} s" for n, t in per_strategy.items()))
    alone_own = sum(per_strategy[n] for n in own_rule)
    rows = [{"runs": f"every run ({n_runs} distinct)", "one by one s": one, "dl.compare s": both,
             "speed-up": one / both},
            {"runs": "the batch's rows (" + ", ".join(n for n in strategies if n not in own_rule) + ")",
             "one by one s": one - alone_own, "dl.compare s": shared, "speed-up": (one - alone_own) / shared}]
    rows += [{"runs": f"{name}, one by one", "one by one s": t, "dl.compare s": None, "speed-up": None}
             for name, t in per_strategy.items()]
    bar = BAR_GPU if lm.device.type == "cuda" else BAR_CPU
    write(__file__, title=f"What batching buys: dl.compare against one run at a time ({lm.name}, {lm.device}, "
          f"{len(strategies)} strategies x {args.seeds} seeds x {args.tokens} tokens)", settings=args,
          columns=["runs", "one by one s", "dl.compare s", "speed-up"], results=rows,
          summary={"speedup": one / both, "bar": bar, "met": one / both >= bar, "distinct_runs": n_runs,
                   "speedup_batch_rows": (one - alone_own) / shared},
          label=label_for(args, lm.device),
          notes=f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()}; "
                f"both sides make the same runs in one process, median of {args.repeats}; strategies with a rule "
                f"of their own ({', '.join(own_rule)}) run alone inside dl.compare too.")


if __name__ == "__main__":
    main()
