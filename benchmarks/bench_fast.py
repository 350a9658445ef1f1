"""The fast path: `lm.generate(..., compile=True)` against transformers' fastest, in the same process.

    python benchmarks/bench_fast.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16
    .venv/bin/python benchmarks/bench_fast.py --tokens 32 --prompt-tokens 64      # CPU: the path runs uncaptured

Greedy decoding of `--tokens` new tokens after a `--prompt-tokens` prompt of random ids (EOS off, so every run
is the same length), runs interleaved, median of `--repeats`. Variants:

- `generate`: plain `model.generate` (dynamic cache), the baseline of the other benchmarks;
- `generate static`: `model.generate(cache_implementation="static")`, which transformers compiles (torch.compile,
  CUDA graphs) on a GPU: the bar;
- `compile=True, Record()` and `compile=True, everything on` (attention rows of every layer, the lens' residuals,
  fp16 logits): decoderlab's fast path;
- `lm.generate, Record()`: decoderlab's eager path, for reference;
- the same with nucleus sampling (`top_p=0.9`, seeded), against `generate static` sampling with the same words.

The first call of each variant (compile or capture, cuDNN plans) is timed apart: what a user waits for once; so is
the first call with a second prompt, of a length whose static cache is the same (the step captured before is
replayed) and of one that needs the next cache length (a new step is captured; the compiled layers serve every
length). Then
the tokens of the fast path are compared with the eager path's (greedy and seeded sampling) and with transformers'
static generate, and the attention rows and logits with the eager path's.

The goal (one GPU, Llama-1B shape, bf16, 256 new tokens after a 512-token prompt): `compile=True, Record()`
at least the tok/s of `generate static`; everything on at least 0.9x of it. The table, the replay times and the
parity checks are also written to benchmarks/results/bench_fast-<device>[-<shape>].json (`--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import decoderlab as dl
from _models import add_arguments, load
from _results import add_out_argument, label_for, write

EVERYTHING = dict(attention=True, lens=True, logits=True)
TOP_P = dict(do_sample=True, top_p=0.9, top_k=0, temperature=1.0)  # nucleus sampling alone
BAR_RECORD, BAR_EVERYTHING = 1.0, 0.9  # x transformers' static generate's tok/s (greedy; top-p against top-p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", nargs="*", default=[], help="variants to leave out (by name)")
    add_arguments(ap)
    add_out_argument(ap)
    args = ap.parse_args()
    lm = load(args)
    n = args.tokens
    gen = torch.Generator().manual_seed(0)
    vocab = min(lm.model.config.get_text_config().vocab_size, len(lm.tokenizer))
    ids = torch.randint(10, vocab, (1, args.prompt_tokens), generator=gen).to(lm.device)
    cuda = lm.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def plain(**words):
        def run():
            words.setdefault("do_sample", False)
            return lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                     eos_token_id=None, **words)[0, ids.shape[1]:].tolist()
        return run

    def recorded(record, **words):
        def run():
            t = lm.generate_ids(ids, record=record, max_new_tokens=n, eos_token_id=[], progress=False, **words)
            assert t.num_steps == n, t.num_steps
            return t
        return run

    variants = {
        "generate": plain(),
        "generate static": plain(cache_implementation="static"),
        "compile=True, Record()": recorded(dl.Record(), compile=True),
        "compile=True, everything on": recorded(dl.Record(**EVERYTHING), compile=True),
        "lm.generate, Record()": recorded(dl.Record()),
        "generate static, top-p": plain(cache_implementation="static", **TOP_P),
        "compile=True, top-p, Record()": recorded(dl.Record(), compile=True, seed=0, **TOP_P),
        "compile=True, top-p, everything on": recorded(dl.Record(**EVERYTHING), compile=True, seed=0, **TOP_P),
    }
    variants = {k: v for k, v in variants.items() if k not in args.skip}
    first: dict[str, float] = {}
    outputs: dict[str, object] = {}
    for name, fn in variants.items():  # first calls: compile, capture, plans
        sync()
        t0 = time.perf_counter()
        outputs[name] = fn()
        sync()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    print(f"model={lm.name} device={torch.cuda.get_device_name() if cuda else 'cpu'} dtype={lm.model.dtype} "
          f"prompt={ids.shape[1]} tokens, {n} new tokens, median of {args.repeats}; torch {torch.__version__}")
    rows = {}
    print("| variant | first call s | s | tok/s | vs generate static |\n| --- | --- | --- | --- | --- |")
    for name, ts in times.items():
        against = "generate static, top-p" if "top-p" in name else "generate static"
        bar = statistics.median(times[against]) if against in times else None
        med = statistics.median(ts)
        rows[name] = {"first_s": round(first[name], 2), "s": round(med, 4), "tok_s": round(n / med, 1),
                      "vs_static": round(bar / med, 3) if bar else None}
        print(f"| {name} | {first[name]:.2f} | {med:.3f} | {n / med:.1f} | "
              f"{'' if bar is None else f'{bar / med:.3f}×'} |")
    print(json.dumps({"bench_fast": rows}))
    summary: dict[str, object] = {}
    if cuda:
        for record in (dl.Record(), dl.Record(**EVERYTHING)):
            name = record.attention and "everything on" or "Record()"
            ms = 1000 * replay_time(lm, ids, record)
            summary[f"replay ms, {name}"] = ms
            print(f"the captured step alone ({name}): {ms:.3f} ms a step on the GPU")
    if "compile=True, Record()" in variants:
        for name, seconds in second_prompts(lm, ids, n).items():
            summary[name] = round(seconds, 2)
            print(f"{name}: {seconds:.2f} s")
    checks = parity(lm, ids, n, outputs)
    for key, bar in (("compile=True, Record()", BAR_RECORD), ("compile=True, everything on", BAR_EVERYTHING),
                     ("compile=True, top-p, Record()", BAR_RECORD),
                     ("compile=True, top-p, everything on", BAR_EVERYTHING)):
        ratio = rows.get(key, {}).get("vs_static")
        summary[f"{key} vs generate static"] = ratio
        summary[f"{key} bar"] = bar
        summary[f"{key} met"] = None if ratio is None else ratio >= bar
    columns = ["variant", "first call s", "median s", "tok/s", "vs generate static"]
    table = [dict(zip(columns, [name, r["first_s"], r["s"], r["tok_s"], r["vs_static"]])) for name, r in rows.items()]
    write(__file__, title=f"The fast path: lm.generate(compile=True) against transformers' static generate "
          f"({lm.name}, {lm.device}, {ids.shape[1]}-token prompt, {n} new tokens)", settings=args, columns=columns,
          results=table, summary=summary, label=label_for(args, lm.device),
          notes=f"dtype={lm.model.dtype}, greedy, EOS off, runs interleaved, median of {args.repeats}; the first call "
                "(compile, capture, plans) timed apart. Parity: " + "; ".join(checks))


def second_prompts(lm: dl.LM, ids: torch.Tensor, n: int) -> dict[str, float]:
    """The first call of `compile=True, Record()` with another prompt, after the runs above: one whose prompt +
    new tokens round to the same static cache length (the kept step is replayed), and one that needs the next
    length (a new cache and capture; the compiled layers serve every length)."""
    from decoderlab.engine.fast import LENGTH_STEP

    waits = {}
    for name, length in (("second prompt, same cache length: first call s", ids.shape[1] - 37),
                         ("second prompt, next cache length: first call s", ids.shape[1] + LENGTH_STEP)):
        other = torch.cat([ids, ids], 1)[:, :length] if length > ids.shape[1] else ids[:, :length]
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lm.generate_ids(other, max_new_tokens=n, eos_token_id=[], progress=False, compile=True)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        waits[f"{name} ({length}-token prompt)"] = time.perf_counter() - t0
    return waits


def replay_time(lm: dl.LM, ids: torch.Tensor, record: dl.Record, steps: int = 200) -> float:
    """Seconds a replay of the captured decode step takes on the GPU (no host work between replays): the floor
    of the fast path's step, to compare with its measured step."""
    from decoderlab.engine import loop
    from decoderlab.engine.fast import CapturedDecoder
    from decoderlab.record import Recording

    recording = Recording(record)
    strat = lm.strategy(ids.shape[1], max_new_tokens=steps + 8)
    decoder = CapturedDecoder(lm.model, ids.shape[1] + steps + 8, [recording])
    with recording.attached(lm.model):
        state = loop.prefill(lm.model, ids, strat, [recording], cache=decoder.cache)
        state.forward = decoder
        for _ in range(2):  # the warm-up and the capture
            state.pending = state.next_logits.argmax(-1)
            state.ids = torch.cat([state.ids, state.pending[:, None]], -1)
            loop.ensure_logits(lm.model, state, [recording])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            decoder.graph.replay()
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def parity(lm: dl.LM, ids: torch.Tensor, n: int, outputs: dict) -> list[str]:
    """Tokens, logits and attention rows of the fast path against the eager path (and transformers' static), each
    printed; returns the lines printed (for the result file's notes)."""
    lines: list[str] = []

    def say(*words: object) -> None:
        lines.append(" ".join(str(w) for w in words).strip())
        print(*words)

    def first_difference(a, b) -> str:
        a, b = list(a), list(b)
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        return "equal" if same is None and len(a) == len(b) else f"differ from step {same}"

    eager = lm.generate_ids(ids, record=dl.Record(**EVERYTHING), max_new_tokens=n, eos_token_id=[], progress=False)
    fast = outputs.get("compile=True, everything on") or lm.generate_ids(
        ids, record=dl.Record(**EVERYTHING), max_new_tokens=n, eos_token_id=[], progress=False, compile=True)
    tokens = eager.arrays["token_id"][:, 0]
    say("greedy tokens, compile=True vs eager lm.generate:", first_difference(fast.arrays["token_id"][:, 0], tokens))
    if "generate static" in outputs:
        say("greedy tokens, compile=True vs transformers' static generate:",
            first_difference(fast.arrays["token_id"][:, 0], outputs["generate static"]))
        if "generate" in outputs:
            say("greedy tokens, eager lm.generate vs plain generate:", first_difference(tokens, outputs["generate"]))
    agree = next((i for i, (x, y) in enumerate(zip(fast.arrays["token_id"][:, 0], tokens)) if x != y), n)
    if agree:
        for key in ("logits", "attention", "residual"):
            a = eager.arrays[key][:agree].astype(np.float32)
            b = fast.arrays[key][:agree].astype(np.float32)
            say(f"  {key}: max |compile - eager| over the {agree} equal steps = {np.abs(a - b).max():.3g} "
                f"(values up to {np.abs(a).max():.3g})")
    words = dict(do_sample=True, top_k=50, temperature=0.9, seed=7)
    a = lm.generate_ids(ids, max_new_tokens=n, eos_token_id=[], progress=False, **words)
    b = lm.generate_ids(ids, max_new_tokens=n, eos_token_id=[], progress=False, compile=True, **words)
    say("seeded sampling tokens, compile=True vs eager:", first_difference(b.arrays["token_id"][:, 0],
                                                                          a.arrays["token_id"][:, 0]))
    return lines


if __name__ == "__main__":
    main()
