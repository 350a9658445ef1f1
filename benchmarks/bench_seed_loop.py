"""What the seed's loop costs: the blog post's `CustomDecoder(GenerationMixin)`, which re-runs the whole sequence at
every step, against `lm.generate` (a KV cache, every step recorded), greedy, at several lengths.

    .venv/bin/python benchmarks/bench_seed_loop.py [--tokens 64 256 1024] [--repeats 1] [--model PATH]
    python benchmarks/bench_seed_loop.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16

The baseline is the seed's class copied verbatim ("重写解码过程" in the blog post "llm decoder的研究"), called as the post calls it
but greedy: `CustomDecoder(model, tokenizer).generate(input_ids, max_length=P + N, do_sample=False)` (its top-k
filter of 50 still runs; it does not change the argmax). EOS off on every side, so every run makes exactly N
tokens: the seed's loop stops when a token equals `tokenizer.eos_token_id`, so it is handed the tokenizer behind
`NoEos`, which answers None for that id and passes everything else through; decoderlab gets `eos_token_id=[]`.
decoderlab runs with the default `Record()` and with everything on (bench_overhead's: attention, lens, fp16
logits; `trace.lens` read once). The three runs of a length are interleaved after a short warm-up of each;
medians of `--repeats` (default 1: the seed's loop is O(N²) in the tokens, about an hour at 1,024 on 2 CPU
cores). Each length's row is printed as soon as it is measured, and the result file
(benchmarks/results/bench_seed_loop-<device>[-<shape>].json, `--out`) is rewritten with the rows so far.
Goal: `lm.generate` >= 10x faster than the blog post's loop at 1,024 new tokens.

`--compile` adds a fourth variant, `lm.generate(compile=True)` with the default `Record()` (the GPU's fast path:
static cache, captured step); its first call at each length (compile, capture) runs untimed before that length's
timed runs. The goal's figure stays the slowest decoderlab variant's speed-up; each variant's is in the table.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GenerationMixin

import decoderlab as dl
from _models import add_arguments, load
from _results import add_out_argument, label_for, write
from _timing import (EVERYTHING, json_line, load_average, markdown_header, markdown_row, run_recorded, same_tokens,
                     setting, timed)

BAR, BAR_AT = 10.0, 1024
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


# ---- the seed's loop, verbatim (the blog post's cell) -------------------------------------------------------
class CustomDecoder(GenerationMixin):
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def generate(self, input_ids, max_length: int = 100, do_sample: bool = True, top_k: int = 50, **kwargs):
        # Initialize the output sequence with the input_ids
        output_ids = input_ids.clone()

        for i in range(max_length - input_ids.size(1)):
            # Get the logits for the next token
            with torch.no_grad():
                outputs = self.model(output_ids)
                next_token_logits = outputs.logits[:, -1, :]

            # Apply top-k filtering
            if top_k is not None:
                next_token_logits = self.top_k_filter(next_token_logits, top_k)

            # Sample the next token
            if do_sample:
                probs = torch.softmax(next_token_logits, dim=-1)
                next_token = torch.multinomial(probs, num_samples=1)
            else:
                next_token = torch.argmax(next_token_logits, dim=-1, keepdim=True)
                
            # Append the next token to the output sequence
            output_ids = torch.cat([output_ids, next_token], dim=-1)

            # Custom action: print the generated token
            generated_token = self.tokenizer.decode(next_token[0], skip_special_tokens=True)

            # Check for end of sequence (optional)
            if next_token.item() == self.tokenizer.eos_token_id:
                break

        return output_ids

    def top_k_filter(self, logits, top_k):
        values, top_k_indices = torch.topk(logits, top_k)
        min_values = values[:, -1].unsqueeze(-1)
        return torch.where(logits < min_values, torch.ones_like(logits) * -float('inf'), logits)
# ---- end of the seed's loop ---------------------------------------------------------------------------------


class NoEos:
    """The tokenizer with no EOS id: the seed's loop compares each token to `eos_token_id`, so it never stops early."""

    eos_token_id = None

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def seed_loop(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
    """The seed's loop, greedy, EOS off: (seconds, tokens)."""
    decoder = CustomDecoder(lm.model, NoEos(lm.tokenizer))
    seconds, out = timed(lambda: decoder.generate(ids, max_length=ids.shape[1] + n, do_sample=False), lm.device)
    return seconds, out[0, ids.shape[1]:].tolist()


def recorded(record: dl.Record, read_lens: bool):
    """`lm.generate` with `record`, greedy, EOS off: (seconds, tokens)."""
    def run(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
        seconds, trace = run_recorded(lm, ids, n, record, read_lens)
        return seconds, trace.token_ids
    return run


def compiled(record: dl.Record):
    """`lm.generate(compile=True)` with `record`, greedy, EOS off: (seconds, tokens)."""
    def run(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
        text = lm.tokenizer.decode(ids[0])
        seconds, trace = timed(lambda: lm.generate_ids(ids, text, max_new_tokens=n, eos_token_id=[], progress=False,
                                                       record=record, compile=True), lm.device)
        assert trace.num_steps == n, f"{trace.num_steps} steps, not {n}"
        return seconds, trace.token_ids
    return run


SEED = "seed's CustomDecoder loop"
COMPILED = "lm.generate(compile=True), Record()"
VARIANTS = {
    SEED: seed_loop,
    "lm.generate, Record()": recorded(dl.Record(), read_lens=False),
    "lm.generate, everything on": recorded(EVERYTHING, read_lens=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024], help="new tokens per run")
    ap.add_argument("--repeats", type=int, default=1)
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true",
                    help=f"also time {COMPILED!r} (its first call at each length untimed)")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    ids, _ = lm.encode(PROMPT, chat=True)  # on the model's device
    variants = dict(VARIANTS)
    if args.compile:
        variants[COMPILED] = compiled(dl.Record())
    ours = [k for k in variants if k != SEED]
    print(f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()} "
          f"prompt={ids.shape[1]} tokens, greedy, EOS off, median of {args.repeats}; {load_average()} (start)")
    for name, run in variants.items():  # warm up (the compiled variant at each length, below)
        if name != COMPILED:
            run(lm, ids, 8)
    # each length's row is printed as soon as it is measured: the 1,024-token run takes an hour on a CPU
    print(markdown_header(["new tokens", f"{SEED} s", *(f"{k} s (speed-up)" for k in ours),
                           "same tokens as the seed's loop", "load average after"]), flush=True)
    results = []
    for n in args.tokens:
        times: dict[str, list[float]] = {name: [] for name in variants}
        tokens: dict[str, list[int]] = {}
        if COMPILED in variants:  # compile and capture for this length's cache, untimed
            first, _ = variants[COMPILED](lm, ids, n)
            print(f"({COMPILED}: first call at {n} new tokens {first:.2f} s, untimed)", flush=True)
        for _ in range(args.repeats):
            for name, run in variants.items():
                seconds, tokens[name] = run(lm, ids, n)
                times[name].append(seconds)
                gc.collect()
        med = {name: statistics.median(ts) for name, ts in times.items()}
        r = dict(new_tokens=n, seconds=med, speedup={k: med[SEED] / med[k] for k in ours},
                 same_tokens={k: tokens[k] == tokens[SEED] for k in ours}, load_average=os.getloadavg())
        results.append(r)
        print(markdown_row([n, f"{med[SEED]:.2f}", *(f"{med[k]:.2f} ({r['speedup'][k]:.1f}x)" for k in ours),
                            "; ".join(f"{k.removeprefix('lm.generate, ')}: {same_tokens(tokens[k], tokens[SEED])}"
                                      for k in ours),
                            ", ".join(f"{x:.2f}" for x in r["load_average"])]), flush=True)
        save(args, lm, ids, results, ours)
    at_bar = [r for r in results if r["new_tokens"] == BAR_AT]
    met = None
    if at_bar:
        worst = min(at_bar[0]["speedup"].values())
        met = worst >= BAR
        print(f"at {BAR_AT} new tokens lm.generate is {worst:.1f}x faster than the seed's loop or more "
              f"(bar >= {BAR:.0f}x: {'met' if met else 'MISSED'})")
    print(json_line(bench="seed_loop", **setting(lm), prompt_tokens=ids.shape[1], repeats=args.repeats,
                    results=results, bar=BAR, bar_at=BAR_AT, met=met))


def save(args: argparse.Namespace, lm: dl.LM, ids: torch.Tensor, results: list[dict], ours: list[str]) -> None:
    """The result file with the lengths measured so far (the longest takes an hour on a CPU: a run cut short keeps
    what it measured)."""
    columns = ["new tokens", f"{SEED} s"]
    for k in ours:
        columns += [f"{k} s", f"{k} speed-up", f"{k} same tokens"]
    columns.append("load average after")
    rows = []
    for r in results:
        row = {"new tokens": r["new_tokens"], f"{SEED} s": r["seconds"][SEED],
               "load average after": ", ".join(f"{x:.2f}" for x in r["load_average"])}
        for k in ours:
            row.update({f"{k} s": r["seconds"][k], f"{k} speed-up": r["speedup"][k],
                        f"{k} same tokens": r["same_tokens"][k]})
        rows.append(row)
    at_bar = [r for r in results if r["new_tokens"] == BAR_AT]
    worst = min(at_bar[0]["speedup"].values()) if at_bar else None
    write(__file__, title=f"Against the blog post's loop: CustomDecoder against lm.generate ({lm.name}, {lm.device})",
          settings=args, columns=columns, results=rows,
          summary={f"speedup_at_{BAR_AT}": worst, "bar": BAR, "met": None if worst is None else worst >= BAR,
                   "lengths_measured": [r["new_tokens"] for r in results]},
          label=label_for(args, lm.device),
          notes=f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()}, "
                f"prompt {ids.shape[1]} tokens, greedy, EOS off, median of {args.repeats}; the speed-up is the "
                "seed's loop's time over lm.generate's.")


if __name__ == "__main__":
    main()
