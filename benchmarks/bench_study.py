"""A study on Ray against a plain loop of `dl.compare` calls, over the same prompts and strategies.

    .venv/bin/python benchmarks/bench_study.py [--prompts 200] [--tokens 64] [--workers N]
    python benchmarks/bench_study.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16   # one GPU

Prompts are "Write one sentence about <thing>." over a list of things, chat formatted; four strategies (greedy,
top-k 50, top-p 0.9, min-p 0.1 at temperature 1.2), one seed, EOS off so every run is `--tokens` long. The loop:
one `dl.compare` per prompt, in this process, with every thread. The study: `dl.study` into a fresh folder,
Ray started by it (its start, the workers' model loading and the Parquet writing are in the time). Reports
prompts per second of each and the ratio; checks that both made the same tokens.
The table is also written to benchmarks/results/bench_study-<device>[-<shape>].json (`--out`).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import decoderlab as dl
from _models import add_arguments, load
from _results import add_out_argument, label_for, write

THINGS = ["the sea", "a lighthouse", "winter", "a city at night", "bread", "a library", "rain", "a violin",
          "the moon", "a garden", "an old map", "a train", "snow", "a market", "a clock", "the desert", "a bridge",
          "a forest", "a letter", "the harbour"]
STRATEGIES = {"greedy": {}, "top-k 50": dict(do_sample=True, top_k=50), "top-p 0.9": dict(do_sample=True, top_p=0.9),
              "min-p 0.1, t=1.2": dict(do_sample=True, min_p=0.1, temperature=1.2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="model replicas of the study (default: dl.study's)")
    add_arguments(ap)
    add_out_argument(ap)
    args = ap.parse_args()
    prompts = [f"Write one sentence about {THINGS[i % len(THINGS)]} ({i})." for i in range(args.prompts)]
    strategies = {k: {**v, "eos_token_id": []} for k, v in STRATEGIES.items()}
    lm = load(args)
    if args.random_weights:  # the workers build the same model: a saved folder they can load
        folder = tempfile.mkdtemp(prefix="bench-study-model-")
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        model = {"path_or_id": folder, "dtype": args.dtype, "device": args.device}
        # the loop runs the very model the workers load: a model built in memory differs from it in the last bits
        # of buffers made at load time (rotary inv_freq, 3e-8 on one H200), and bf16 greedy texts then part
        lm = dl.load(folder, dtype=args.dtype, device=args.device)
    else:
        model = {"path_or_id": args.model, "dtype": args.dtype, "device": args.device}
    t0 = time.perf_counter()
    loop_runs = [dl.compare(lm, p, strategies, max_new_tokens=args.tokens, chat=True, progress=False).runs
                 for p in prompts]
    loop_s = time.perf_counter() - t0
    del lm
    out = tempfile.mkdtemp(prefix="bench-study-")
    t0 = time.perf_counter()
    st = dl.study(model, prompts, strategies, out=os.path.join(out, "study"), max_new_tokens=args.tokens, chat=True,
                  workers=args.workers, progress=False)
    study_s = time.perf_counter() - t0
    same = all(
        study_text == loop_text
        for p, runs in zip(prompts, loop_runs)
        for study_text, loop_text in zip(st.runs[st.runs["prompt"] == p].sort_values("strategy")["text"],
                                         runs.sort_values("strategy")["text"]))
    n = len(prompts)
    rows = [{"variant": "loop of dl.compare", "seconds": round(loop_s, 1), "prompts/s": round(n / loop_s, 3),
             "vs loop": 1.0},
            {"variant": f"dl.study ({args.workers or 'default'} workers)",
             "seconds": round(study_s, 1), "prompts/s": round(n / study_s, 3), "vs loop": round(loop_s / study_s, 3)}]
    for r in rows:
        print(f"{r['variant']:<32} {r['seconds']:8.1f} s {r['prompts/s']:8.3f} prompts/s {r['vs loop']:6.3f}x")
    print("same texts:", same, "| failed prompts:", len(st.failures))
    write(__file__, title=f"A study on Ray against a loop of dl.compare ({n} prompts × {len(strategies)} strategies, "
          f"{args.tokens} tokens)", settings=args, columns=["variant", "seconds", "prompts/s", "vs loop"],
          results=rows, summary={"study vs loop": rows[1]["vs loop"], "same texts": same,
                                 "failed prompts": len(st.failures)},
          label=label_for(args, args.device or "cpu"),
          notes=f"{os.cpu_count()} CPUs; the study's time includes starting Ray and loading the model in each worker")


if __name__ == "__main__":
    main()
