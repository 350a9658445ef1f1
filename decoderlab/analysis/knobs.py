"""Which sampler knob decided: one recorded step's candidate token over grids of sampler settings.

Why: "would this token have come out at a lower temperature?", "which top-p would have cut it?", "does a
repetition penalty make it the greedy pick?" are questions about one step's distribution under many settings.
Each point of a grid is a strategy resolved and run over the step's raw logits by the processors a run builds
(`whatif.strategy_for`, `whatif.outcome`, the code `trace.what_if` runs): exact, with no new generation. The
logits are the recorded ones (`Record(logits=True)`), or one forward of the step's prefix with `lm=`.

Each grid fixes the other knobs at "off" (`top_k=0`, `top_p=1.0`, no `min_p`, temperature 1, no penalty), so a
row says what its knobs alone do.

Why the strategies are kept (`_resolved`): resolving a point's words through transformers' generation config costs
about 2 ms, and the same 132 points are asked again at every step a view shows; over recorded logits (no `lm=`) a
point's strategy depends only on the run's strategy, the prompt length and the point's words, so it is resolved
once. Only the final scores are needed, so each point runs `loop.process` without keeping each processor's stage.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..backends.local import LM
from ..trace import Trace
from ..engine import Strategy, loop
from .whatif import WhatIfError, check_step, step_logits, step_prefix, strategy_for, token_namer

TEMPERATURES = (0.3, 0.5, 0.7, 0.9, 1.0, 1.2, 1.5)
GRIDS: dict[str, tuple[str, Sequence[Any], str | None, Sequence[Any]]] = {
    "temperature × top_p": ("temperature", TEMPERATURES, "top_p", (0.5, 0.7, 0.8, 0.9, 0.95, 1.0)),
    "temperature × top_k": ("temperature", TEMPERATURES, "top_k", (1, 5, 10, 20, 50, 0)),
    "temperature × min_p": ("temperature", TEMPERATURES, "min_p", (0.0, 0.02, 0.05, 0.1, 0.2, 0.3)),
    "repetition_penalty": ("repetition_penalty", (1.0, 1.1, 1.2, 1.3, 1.5, 2.0), None, ()),
}
OFF = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
COLUMNS = ["grid", "knob_1", "value_1", "knob_2", "value_2", "prob", "kept", "rank", "greedy", "top_token"]


def token_id(trace: Trace, token: int | str, lm: LM | None = None) -> int:
    """A candidate given as an id, or as its text (a token the trace shows, or one the tokenizer has)."""
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        return int(token)
    if not isinstance(token, str):
        raise WhatIfError(f"token={token!r}: give a token id or its text")
    found = sorted({int(i) for i, text in trace.token_text.items() if text == token})
    if not found and lm is not None:
        ids = lm.tokenizer.encode(token, add_special_tokens=False)
        found = ids if len(ids) == 1 else []
    if len(found) != 1:
        raise WhatIfError(f"token={token!r}: {'no' if not found else 'more than one'} token of this trace has that "
                          "text" + ("" if lm is not None else "; pass lm= to ask the tokenizer, or give the id"))
    return found[0]


def knobs(trace: Trace, step: int, token: int | str, *, row: int = 0, lm: LM | None = None,
          grids: Mapping[str, tuple] | None = None) -> pd.DataFrame:
    """One row per grid point: the token's chance under sampling (`prob`), whether it survives the processors
    (`kept`), its rank in the final distribution, whether it is the greedy choice there (`greedy`), and what the
    greedy choice is (`top_token`). `grids` maps a name to (knob, values, knob or None, values) (default `GRIDS`)."""
    step = check_step(trace, step, row)
    tid = token_id(trace, token, lm)
    logits, _ = step_logits(trace, step, row, lm)
    if not 0 <= tid < logits.shape[-1]:
        raise WhatIfError(f"token={token!r}: id {tid} is outside the vocabulary (0..{logits.shape[-1] - 1})")
    device = lm.device if lm is not None else torch.device("cpu")
    logits = logits.to(device=device, dtype=torch.float32)
    prefix = torch.as_tensor(step_prefix(trace, step, row), device=device)
    namer = token_namer(trace, lm)
    rows = []
    for grid, (knob_1, values_1, knob_2, values_2) in (grids or GRIDS).items():
        for a in values_1:
            for b in (values_2 if knob_2 else [None]):
                words = {**OFF, knob_1: a, **({knob_2: b} if knob_2 else {})}
                strategy = strategy_for(trace, words, grid, lm) if lm is not None else _resolved(trace, words, grid)
                with torch.inference_mode():
                    scores = loop.process(strategy, prefix[None], logits[None], False, step)[0][0]
                    probs = torch.softmax(scores, dim=-1)
                kept = not bool(torch.isneginf(scores[tid]))
                top = int(torch.argmax(scores))
                rank = int((scores > scores[tid]).sum()) if kept else -1
                rows.append({"grid": grid, "knob_1": knob_1, "value_1": a, "knob_2": knob_2, "value_2": b,
                             "prob": float(probs[tid]), "kept": kept, "rank": rank, "greedy": top == tid,
                             "top_token": namer([top])[0]})
    frame = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("value_1", "value_2"):  # each knob's own values (top_k's whole numbers stay whole)
        frame[col] = pd.Series([r[col] for r in rows], dtype=object)
    return frame


_RESOLVED: dict[tuple, Strategy] = {}  # (run strategy, prompt length, words) -> the strategy it resolves to


def _resolved(trace: Trace, words: dict[str, Any], grid: str) -> Strategy:
    """`strategy_for(trace, words)` over recorded logits, resolved once per (run strategy, prompt length, words):
    nothing else of the trace goes into it (the stand-in model reads only the run's EOS and padding ids)."""
    key = (repr(sorted(trace.strategy.items())), len(trace.prompt_ids), tuple(sorted(words.items())))
    strategy = _RESOLVED.get(key)
    if strategy is None:
        if len(_RESOLVED) >= 4096:  # a long session of many traces: start over rather than grow
            _RESOLVED.clear()
        strategy = _RESOLVED[key] = strategy_for(trace, words, grid)
    return strategy
