"""What plain transformers costs to show the same things: `model.generate` returning attentions, hidden states and
scores (eager attention, as `output_attentions` needs) against `lm.generate` with everything on, on a long prompt.

    .venv/bin/python benchmarks/bench_outputs.py [--tokens 64] [--prompt-tokens 2048] [--repeats 3] [--model PATH]
    python benchmarks/bench_outputs.py --random-weights .bench/llama-1b --device cuda --dtype bfloat16

The prompt is repeated text cut to exactly `--prompt-tokens` tokens. Greedy, EOS off on both sides
(`eos_token_id=None` for `model.generate`, `eos_token_id=[]` for decoderlab), so every run makes exactly
`--tokens` tokens. The transformers side switches the model to eager attention for its runs
(`model.set_attn_implementation("eager")`) and back; decoderlab's side is bench_overhead's "everything on"
(`Record(attention=True, lens=True, logits=True)`) and reads `trace.lens` once, which is when the lens is computed.
Runs are interleaved after one warm-up of each at full length; medians of `--repeats`. Also timed, for
reference: plain `model.generate` returning nothing (the model's own attention) and `lm.generate` with `Record()`.
Goal: decoderlab everything on >= 2x faster than transformers with its outputs. The table is also written
to benchmarks/results/bench_outputs-<device>[-<shape>].json (`--out`).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import decoderlab as dl
from _models import add_arguments, load
from _results import add_out_argument, label_for, write
from _timing import EVERYTHING, json_line, load_average, markdown, run_recorded, same_tokens, setting, timed

BAR = 2.0
TEXT = ("The lighthouse keeper climbed the ninety-nine steps at dusk, as he had every evening for thirty years, "
        "and wrote the weather, the ships and the colour of the sea into his log. ")
BASELINE = "model.generate, attentions + hidden states + scores (eager)"
OURS = "lm.generate, everything on, reading trace.lens"


def long_prompt(tokenizer, length: int) -> torch.Tensor:
    """Exactly `length` tokens [1, length] of repeated text."""
    per_copy = max(1, len(tokenizer(TEXT).input_ids))
    ids = tokenizer(TEXT * (length // per_copy + 2), return_tensors="pt").input_ids[:, :length]
    if ids.shape[1] != length:
        raise ValueError(f"the repeated text gave {ids.shape[1]} tokens, not {length}")
    return ids


def with_outputs(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int], int]:
    """transformers' way to see attention, hidden states and scores: (seconds, tokens, bytes returned)."""
    model = lm.model
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")  # output_attentions needs the weights, which sdpa never forms
    try:
        seconds, out = timed(lambda: model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, eos_token_id=None,
            output_attentions=True, output_hidden_states=True, output_scores=True, return_dict_in_generate=True,
        ), lm.device)
    finally:
        model.set_attn_implementation(before)
    returned = [*out.scores, *(a for step in out.attentions for a in step),
                *(h for step in out.hidden_states for h in step)]
    return seconds, out.sequences[0, ids.shape[1]:].tolist(), sum(t.numel() * t.element_size() for t in returned)


def plain(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int], int]:
    """`model.generate` returning nothing but tokens, with the model's own attention."""
    seconds, out = timed(lambda: lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                   max_new_tokens=n, eos_token_id=None), lm.device)
    return seconds, out[0, ids.shape[1]:].tolist(), 0


def recorded(record: dl.Record, read_lens: bool):
    """decoderlab's side with `record`: (seconds, tokens, bytes the trace holds)."""
    def run(lm: dl.LM, ids: torch.Tensor, n: int) -> tuple[float, list[int], int]:
        seconds, trace = run_recorded(lm, ids, n, record, read_lens)
        return seconds, trace.token_ids, sum(a.nbytes for a in trace.arrays.values())
    return run


VARIANTS = {
    "model.generate, nothing returned": plain,
    BASELINE: with_outputs,
    "lm.generate, Record()": recorded(dl.Record(), read_lens=False),
    OURS: recorded(EVERYTHING, read_lens=True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    add_arguments(ap)
    ap.add_argument("--threads", type=int, default=None)
    add_out_argument(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args)
    ids = long_prompt(lm.tokenizer, args.prompt_tokens).to(lm.device)
    n = args.tokens
    print(load_average(), "(start)")
    for run in VARIANTS.values():  # warm up at full length (a GPU plans each attention shape once)
        run(lm, ids, n)
        gc.collect()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    tokens: dict[str, list[int]] = {}
    returned: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in VARIANTS.items():
            seconds, tokens[name], returned[name] = run(lm, ids, n)
            times[name].append(seconds)
            gc.collect()  # the 2,048-token attention matrices the baseline returned are not the next run's cost
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med[BASELINE]
    speedup = base / med[OURS]
    print(f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()} "
          f"prompt={ids.shape[1]} tokens, {n} new tokens, greedy, EOS off, median of {args.repeats}; {load_average()}")
    print(markdown(["variant", "median s", "tok/s", f"time / {BASELINE.split(',')[0]} with outputs",
                    "returned MiB", "same tokens as the baseline"],
                   [[name, f"{med[name]:.2f}", f"{n / med[name]:.1f}", f"{med[name] / base:.3f}",
                     f"{returned[name] / 2**20:.1f}", same_tokens(tokens[name], tokens[BASELINE])]
                    for name in VARIANTS]))
    print(f"decoderlab everything on is {speedup:.2f}x faster than transformers with its outputs "
          f"(bar >= {BAR}x: {'met' if speedup >= BAR else 'MISSED'}); same tokens: "
          f"{same_tokens(tokens[OURS], tokens[BASELINE])}")
    columns = ["variant", "median s", "tok/s", "time / transformers with outputs", "returned MiB",
               "same tokens as the baseline"]
    rows = [dict(zip(columns, [name, med[name], n / med[name], med[name] / base, returned[name] / 2**20,
                               tokens[name] == tokens[BASELINE]])) for name in VARIANTS]
    write(__file__, title=f"What showing the same things costs in plain transformers ({lm.name}, {lm.device}, "
          f"{ids.shape[1]}-token prompt, {n} new tokens)", settings=args, columns=columns, results=rows,
          summary={"speedup": speedup, "bar": BAR, "met": speedup >= BAR,
                   "same_tokens": tokens[OURS] == tokens[BASELINE]},
          label=label_for(args, lm.device),
          notes=f"model={lm.name} device={lm.device} dtype={lm.model.dtype} threads={torch.get_num_threads()}; "
                f"greedy, EOS off, runs interleaved after a full-length warm-up, median of {args.repeats}. "
                f"Baseline: {BASELINE}; ours: {OURS}.")
    print(json_line(bench="outputs", **setting(lm), prompt_tokens=ids.shape[1], new_tokens=n, repeats=args.repeats,
                    load_average=os.getloadavg(), seconds=med, returned_bytes=returned, speedup=speedup, bar=BAR,
                    met=speedup >= BAR, same_tokens=tokens[OURS] == tokens[BASELINE]))


if __name__ == "__main__":
    main()
