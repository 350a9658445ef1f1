"""The token rule's choosers: greedy and sampling, one token per row from the processed scores.

The token rule itself is the loop's own step (`loop.step`: forward, the strategy's processors, the chooser);
what varies between greedy decoding and sampling is only the chooser, kept here beside the other rules.
"""
from __future__ import annotations

from typing import Sequence

import torch


def greedy(scores: torch.Tensor, generators: Sequence[torch.Generator | None] = ()) -> torch.Tensor:
    """The highest score, as `generate(do_sample=False)` picks it."""
    return torch.argmax(scores, dim=-1)


def sample(scores: torch.Tensor, generators: Sequence[torch.Generator | None] = ()) -> torch.Tensor:
    """One draw per row from softmax(scores), each row with its own generator.

    With one row and a generator seeded with `s`, this draws what `torch.manual_seed(s)` followed by
    `generate(do_sample=True)` draws (both call `torch.multinomial` on the same probabilities).
    """
    probs = torch.softmax(scores, dim=-1)
    if not generators or all(g is None for g in generators):
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    rows = [torch.multinomial(probs[i : i + 1], 1, generator=generators[i]).squeeze(1) for i in range(probs.shape[0])]
    return torch.cat(rows)
