"""What recording costs in memory: peak RSS growth of an N-token greedy run, each measurement in a fresh process.

    .venv/bin/python benchmarks/bench_memory.py [--tokens 4000] [--only NAME ...]

Default model (`dl.load()`, SmolLM2-135M) on the CPU, EOS off so every run is N tokens. Each variant
runs in its own subprocess: load the model, warm up (a short plain `model.generate`, or for the
"after lm.generate" variants a single short `lm.generate`, the warm-up that fragmented the heap before
records lived in chunked buffers), reset the peak (`/proc/self/clear_refs`), run, and report
VmHWM - VmRSS-before. The trace's own bytes are the sum of its arrays' nbytes. The table is also written to
benchmarks/results/bench_memory-cpu.json (`--out`).

The goal: growth <= 1.25 x (plain generate's growth + the trace's bytes) for `Record()` and
for attention on a few layers, whatever ran before; `Record()` holds <= 2 KiB per step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _results import add_out_argument, write

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
BAR_RATIO, BAR_STEP = 1.25, 2048

# name -> (Record keyword arguments, or None for plain generate; warm-up: "plain" or "lm")
VARIANTS = {
    "generate": (None, "plain"),
    "Record()": ({}, "plain"),
    "Record() after lm.generate": ({}, "lm"),
    "attention [0, 15, 29]": ({"attention": True, "attention_layers": [0, 15, 29]}, "plain"),
    "attention [0, 15, 29] after lm.generate": ({"attention": True, "attention_layers": [0, 15, 29]}, "lm"),
}


def _status() -> dict:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(name: str, tokens: int, threads: int | None) -> dict:
    """One variant, in this (fresh) process."""
    import gc

    import torch

    import decoderlab as dl

    if threads:
        torch.set_num_threads(threads)
    kwargs, warmup = VARIANTS[name]
    lm = dl.load()
    ids, _ = lm.encode(PROMPT, chat=True)

    def plain(n):
        return lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, eos_token_id=None)

    if warmup == "plain":
        plain(8)
    else:
        lm.generate(PROMPT, chat=True, max_new_tokens=8, eos_token_id=[], progress=False)
    gc.collect()
    before = _status()["VmRSS"]
    reset = _reset_peak()
    trace_bytes = 0
    if kwargs is None:
        out = plain(tokens)
        assert out.shape[1] - ids.shape[1] == tokens
    else:
        trace = lm.generate(PROMPT, chat=True, max_new_tokens=tokens, eos_token_id=[], progress=False,
                            record=dl.Record(**kwargs))
        assert trace.num_steps == tokens
        trace_bytes = sum(a.nbytes for a in trace.arrays.values())
    peak = _status()["VmHWM"]
    return {"name": name, "growth": peak - before, "trace_bytes": trace_bytes, "peak_reset": reset}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--only", nargs="*", default=None, choices=list(VARIANTS), help="variants to run (default all)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_out_argument(ap)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.tokens, args.threads)))
        return
    names = args.only or list(VARIANTS)
    if "generate" not in names:
        names = ["generate", *names]
    results = {}
    for name in names:
        cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{name}: the child failed\n{done.stderr}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  measured {name}", file=sys.stderr, flush=True)
    mib = 1 << 20
    base = results["generate"]["growth"]
    print(f"peak RSS growth over {args.tokens} greedy tokens, default model, CPU, each in a fresh process")
    print(f"{'variant':42s} {'growth MiB':>10s} {'trace MiB':>10s} {'ratio':>7s} {'bar':>5s} {'B/step':>8s}")
    rows = []
    for name in names:
        r = results[name]
        line = f"{name:42s} {r['growth'] / mib:10.1f} {r['trace_bytes'] / mib:10.2f}"
        row = {"variant": name, "growth MiB": r["growth"] / mib, "trace MiB": r["trace_bytes"] / mib,
               "ratio": None, "met": None, "bytes/step": None}
        if name != "generate":
            ratio = r["growth"] / (base + r["trace_bytes"])
            per_step = r["trace_bytes"] / args.tokens
            ok = ratio <= BAR_RATIO and (VARIANTS[name][0] or per_step <= BAR_STEP)
            line += f" {ratio:7.2f} {'ok' if ok else 'MISS':>5s} {per_step:8.0f}"
            row.update({"ratio": ratio, "met": bool(ok), "bytes/step": per_step})
        print(line)
        rows.append(row)
    notes = (f"Peak RSS growth over {args.tokens} greedy tokens (EOS off), default model, CPU, each variant in a "
             "fresh process; ratio = growth / (plain generate's growth + the trace's bytes).")
    if not all(r["peak_reset"] for r in results.values()):
        print("note: /proc/self/clear_refs refused: peaks include loading the model")
        notes += " /proc/self/clear_refs was refused: the peaks include loading the model."
    measured = [r for r in rows if r["ratio"] is not None]
    summary = {"generate_growth_mib": base / mib, "bar_ratio": BAR_RATIO, "bar_record_bytes_per_step": BAR_STEP,
               **{f"ratio {r['variant']}": r["ratio"] for r in measured},
               "all_met": all(r["met"] for r in measured)}
    write(__file__, title=f"What recording costs in memory: peak RSS growth of a {args.tokens}-token greedy run",
          settings=args, columns=["variant", "growth MiB", "trace MiB", "ratio", "met", "bytes/step"], results=rows,
          summary=summary, label="cpu", notes=notes)


if __name__ == "__main__":
    main()
