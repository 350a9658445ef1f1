"""Where a decode step's time goes: operators, kernel launches and host synchronisations per step, and the costliest ops.

    python benchmarks/profile_step.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16 \
        [--tokens 32] [--only generate record everything compare] [--compile] [--kernels] [--python] [--out FILE]

Why: on a GPU a small model's decode step is bound by the host (Python, dispatch, kernel launches) and by
waits for the device, not by the device's arithmetic; counting those per step says what to cut.
Variants: plain `model.generate`; `lm.generate` with `Record()`; with everything on (attention, lens, fp16
logits); and the batched step of `dl.compare` (the benchmark's strategies that share the batch: contrastive
search runs alone and is left out). For each: seconds per step, aten operators per step (a dispatch-mode
census), and on CUDA the kernel launches and synchronisations per step (torch.profiler's runtime events), the
places that synchronise (`torch.cuda.set_sync_debug_mode`), and the ops that cost the most host time;
`--kernels`: the GPU kernels by device time; `--python`: the host's time by Python function (cProfile). Profile
one variant a run (`--only`) for the kernel table: after one variant's operator census, the next variant's
compiled layers were counted uncompiled.
"""
from __future__ import annotations

import argparse
import collections
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import decoderlab as dl
from _models import add_arguments, load
from bench_compare import STRATEGIES

LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
SYNC = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class OpCount(TorchDispatchMode):
    """Counts the aten operators that reach a backend (about one kernel each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def variants(lm: dl.LM, n: int, compile: bool = False) -> dict:
    prompt = "Write a long story about a lighthouse keeper who finds a message in a bottle."
    ids, _ = lm.encode(prompt, chat=True)
    batched = {k: {**v, "eos_token_id": []} for k, v in STRATEGIES.items() if "penalty_alpha" not in v}

    def plain():
        lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None)

    def recorded(record):
        return lambda: lm.generate(prompt, chat=True, max_new_tokens=n, eos_token_id=[], progress=False, record=record,
                                   compile=compile)

    def compare():
        dl.compare(lm, prompt, batched, seeds=range(5), max_new_tokens=n, chat=True, progress=False)

    return {"generate": plain, "record": recorded(dl.Record()),
            "everything": recorded(dl.Record(attention=True, lens=True, logits=True)), "compare": compare}


def kernel_table(prof, lm: dl.LM, n: int, top: int) -> str:
    """The GPU kernels of a profiled run by device time (per step), the GPU's busy time per step and the weights'
    bytes read over it: how far a step is from the memory-bandwidth limit, and which kernels stand in the way."""
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / n  # microseconds of kernels per step (they run one at a time)
    by_name: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in kernels:
        by_name[e.name] += e.device_time / n
        count[e.name] += 1 / n
    weights = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    lines = [f"  GPU busy {busy / 1e3:.3f} ms/step, {sum(count.values()):.0f} kernels/step; weights {weights / 1e9:.2f} "
             f"GB read per step: {weights / (busy * 1e-6) / 1e12:.2f} TB/s while busy"]
    for name, us in by_name.most_common(top):
        lines.append(f"  {us:9.1f} us/step {100 * us / busy:5.1f}%  x{count[name]:5.1f}  {name[:110]}")
    return "\n".join(lines)


def python_table(fn, n: int, sync, top: int) -> str:
    """The host's time per step by Python function (cProfile over one run): own time and time with callees, the
    functions of decoderlab and torch that take the most. On a GPU a host-bound step is this time."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = []
    for (path, line, func), (_, calls, own, cum, _) in stats.items():
        rows.append((cum / n * 1e6, own / n * 1e6, calls / n, f"{'/'.join(Path(path).parts[-2:])}:{line} {func}"))
    lines = ["  host time per step by function (us with callees, us own, calls per step):"]
    for cum, own, calls, where in sorted(rows, reverse=True)[:top]:
        lines.append(f"  {cum:9.1f} {own:8.1f} x{calls:6.1f}  {where[:110]}")
    lines.append("  by own time:")
    for cum, own, calls, where in sorted(rows, key=lambda r: -r[1])[:top]:
        lines.append(f"  {cum:9.1f} {own:8.1f} x{calls:6.1f}  {where[:110]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="a file for the profiler tables (ops by host time)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="the fast path: lm.generate(..., compile=True)")
    ap.add_argument("--kernels", action="store_true",
                    help="also the GPU kernels by device time: the GPU's busy time per step, and the weights' bytes "
                         "over it (the memory bandwidth a step reaches)")
    ap.add_argument("--python", action="store_true",
                    help="also the host's Python time per step by function (cProfile): where a host-bound step goes")
    args = ap.parse_args()
    lm = load(args)
    cuda = lm.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n = args.tokens
    tables = []
    print(f"model={lm.name} device={lm.device} dtype={lm.model.dtype} {n} new tokens per run; counts are per step")
    for name, fn in variants(lm, n, args.compile).items():
        if args.only and name not in args.only:
            continue
        fn()  # warm up
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        per_step = (time.perf_counter() - t0) / n
        kernels = ""
        if cuda and args.kernels:  # before the census: under a dispatch mode compiled layers may run uncompiled
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            kernels = kernel_table(prof, lm, n, args.top)
        if args.python:
            print(python_table(fn, n, sync, args.top))
        with OpCount() as census:
            fn()
        ops = sum(census.ops.values()) / n
        line = f"{name:<11} {per_step * 1e3:8.2f} ms/step  {ops:7.1f} ops/step"
        if cuda:
            where: collections.Counter = collections.Counter()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            torch.cuda.set_sync_debug_mode(0)
            for w in caught:
                if "synchroniz" in str(w.message):
                    where[f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"] += 1
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                fn()
                sync()
            events = prof.key_averages()
            launches = sum(e.count for e in events if e.key in LAUNCH) / n
            syncs = sum(e.count for e in events if e.key in SYNC) / n
            line += f"  {launches:7.1f} launches/step  {syncs:5.1f} syncs/step (runtime)  " \
                    f"{sum(where.values()) / n:5.1f} syncing ops/step"
            tables.append(f"== {name}: {n} steps\n" + events.table(sort_by="self_cpu_time_total", row_limit=args.top))
            print(line)
            if kernels:
                print(kernels)
            print("  synchronising ops per step, by place:",
                  ", ".join(f"{k} {v / n:.2f}" for k, v in where.most_common(8)) or "none")
        else:
            print(line)
        top = census.ops.most_common(12)
        print("  most frequent ops per step:", ", ".join(f"{k.replace('aten.', '')} {v / n:.1f}" for k, v in top))
    if args.out and tables:
        Path(args.out).write_text("\n\n".join(tables))


if __name__ == "__main__":
    main()
