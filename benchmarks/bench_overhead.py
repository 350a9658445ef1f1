"""What recording costs: decoderlab's loop against plain `model.generate`, in the same process.

    .venv/bin/python benchmarks/bench_overhead.py [--tokens 256] [--repeats 5] [--model PATH] [--device cpu]
    python benchmarks/bench_overhead.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16
    python benchmarks/bench_overhead.py --random-weights .bench/llama-8b --device cuda --dtype bfloat16 --device-map auto

Greedy decoding of a fixed number of tokens (EOS off, so every run is the same length), runs
interleaved so drift hits all variants alike; prints the median time of each and its ratio to
plain `generate`, and writes them to benchmarks/results/bench_overhead-<device>[-<shape>].json (`--out`).
The bar: Record() defaults <= 1.05x, everything on (attention, lens, fp16 logits) <= 1.25x on a CPU,
<= 1.10x on a GPU.

`--device-map auto` shards the model over every visible GPU as `from_pretrained(device_map="auto")` does
(accelerate's balanced memory, no layer split), and both sides run on that placement.
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
from _results import add_out_argument, label_for, write

BAR_RECORD, BAR_EVERYTHING_CPU, BAR_EVERYTHING_GPU = 1.05, 1.25, 1.10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device-map", default=None, choices=["auto"],
                    help="shard the model over all visible GPUs with accelerate (balanced, as device_map='auto')")
    ap.add_argument("--lens-read", action="store_true", help="also time reading trace.lens (the lazy lens pass)")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    if args.device_map:
        lm = shard(lm)
        print(lm, "GiB allocated per GPU:",
              [round(torch.cuda.memory_allocated(i) / 2**30, 1) for i in range(torch.cuda.device_count())])
    prompt = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    ids, _ = lm.encode(prompt, chat=True)
    n = args.tokens
    def sync():  # every GPU's queue, not only the current one's
        for i in range(torch.cuda.device_count() if lm.device.type == "cuda" else 0):
            torch.cuda.synchronize(i)

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
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<34} {med:8.3f} s  {n / med:7.1f} tok/s  ratio {med / base:5.3f}")
        rows.append({"variant": name, "median s": med, "tok/s": n / med, "ratio to generate": med / base})
    ratio = {name: statistics.median(ts) / base for name, ts in times.items()}
    bar = BAR_EVERYTHING_GPU if lm.device.type == "cuda" else BAR_EVERYTHING_CPU
    everything = ratio["Record(attention, lens, logits)"]
    summary = {"generate_s": base, "ratio_record": ratio["Record()"], "bar_record": BAR_RECORD,
               "record_met": ratio["Record()"] <= BAR_RECORD, "ratio_everything_on": everything,
               "bar_everything_on": bar, "everything_on_met": everything <= bar}
    if args.lens_read:
        summary["ratio_lens_read"] = ratio["... and reading trace.lens"]
    write(__file__, title=f"What recording costs: lm.generate against model.generate ({lm.name}, {lm.device}, "
          f"{n} new tokens)", settings=args, columns=["variant", "median s", "tok/s", "ratio to generate"],
          results=rows, summary=summary, label=label_for(args, lm.device, args.device_map),
          notes=f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()}, "
                f"prompt {ids.shape[1]} tokens, greedy, EOS off, runs interleaved, median of {args.repeats}.")


def shard(lm: dl.LM) -> dl.LM:
    """The model spread over every visible GPU as `device_map="auto"` places it (accelerate's balanced memory)."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    model = lm.model
    no_split = model._no_split_modules
    memory = get_balanced_memory(model, dtype=model.dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=model.dtype)
    return dl.LM(dispatch_model(model, device_map=device_map), lm.tokenizer, name=lm.name)


if __name__ == "__main__":
    main()
