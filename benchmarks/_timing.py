"""What the comparison benchmarks share: "everything on", a timer that waits for the GPU, the table they print.

Why one place: bench_outputs and bench_seed_loop time decoderlab against a baseline in the same way, and their
"everything on" must be bench_overhead's (attention rows, lens, fp16 logits).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import torch

import decoderlab as dl

EVERYTHING = dl.Record(attention=True, lens=True, logits=True)  # bench_overhead's "everything on"


def sync(device: torch.device) -> None:
    """Wait for every GPU's queue (a CPU run has none)."""
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, the device's queue drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def run_recorded(lm: dl.LM, ids: torch.Tensor, n: int, record: dl.Record,
                 read_lens: bool = False) -> tuple[float, dl.Trace]:
    """(seconds, trace) of `lm.generate` from `ids` [1, P] on the model's device: greedy, EOS off, exactly `n` steps;
    with `read_lens`, `trace.lens` is read inside the timing (the lens is computed when first read)."""
    text = lm.tokenizer.decode(ids[0])

    def go():
        trace = lm.generate_ids(ids, text, max_new_tokens=n, eos_token_id=[], progress=False, record=record)
        if read_lens:
            trace.lens
        return trace
    seconds, trace = timed(go, lm.device)
    assert trace.num_steps == n, f"{trace.num_steps} steps, not {n}"
    return seconds, trace


def load_average() -> str:
    """The 1/5/15-minute load average, for the printout (timings on shared cores depend on it)."""
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first step where two token lists differ (or one ends), None where they are equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def same_tokens(a: list[int], b: list[int]) -> str:
    """'yes', or where the two greedy runs part."""
    step = first_difference(a, b)
    return "yes" if step is None else f"no (first difference at step {step} of {max(len(a), len(b))})"


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table."""
    return "\n".join([markdown_header(header), *(markdown_row(row) for row in rows)])


def markdown_header(header: list[str]) -> str:
    """A markdown table's first two lines (for a table printed row by row)."""
    return markdown_row(header) + "\n|" + " --- |" * len(header)


def markdown_row(cells: list[Any]) -> str:
    """One line of a markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def json_line(**fields: Any) -> str:
    """The results as one JSON line (for scripts that collect runs)."""
    return json.dumps(fields)


def setting(lm: dl.LM, **extra: Any) -> dict:
    """What a run was measured on."""
    return dict(model=lm.name, device=str(lm.device), dtype=str(lm.model.dtype).removeprefix("torch."),
                threads=torch.get_num_threads(), torch=torch.__version__, **extra)
