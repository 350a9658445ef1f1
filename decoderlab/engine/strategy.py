"""What a run decodes with: a `Strategy` (the resolved config, transformers' processors, a chooser) and the
`Rule` that turns each step's scores into tokens.

Plain data, so that the loop and every rule can name it without importing how it is made: the words are
resolved into a `Strategy` by `engine.words.resolve`, and `engine.rules.rule_for` picks its rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

# A chooser picks one token per row from the processed scores; rows may have their own generator.
Chooser = Callable[[torch.Tensor, Sequence["torch.Generator | None"]], torch.Tensor]


@dataclass(frozen=True)
class Rule:
    """How a strategy turns a step's logits into tokens. `engine.rules` holds one per rule and the one table
    that picks a rule from the words; everything that depends on the rule asks these fields, never its name."""

    name: str  # "token", "beam", "group beam", "contrastive", "dola": shown in messages, never compared
    words: tuple[str, ...] = ()  # the words that configure the rule (shown in trace.strategy)
    # one token per row per step from the processors and the chooser: rows (seeds=), sessions, score(),
    # compile=True and what_if all need this
    by_processors: bool = False
    step: Callable | None = None  # one step over a State, with the signature of `loop.step`
    search: Callable | None = None  # a whole search: (model, prompt_ids, strategy, observers, generator=) -> BeamRun
    batch_search: type | None = None  # the search as a group of rows in compare's batch (greedy beams)
    needs_hidden: bool = False  # the step reads every layer's hidden states (kept from the prefill on)
    takes_chooser: bool = True  # chooser= applies
    chooser_names: tuple[str, str] | None = None  # what the chooser is called (greedy, sampling) when the rule picks
    limits: str = ""  # why a session cannot step it (rules that are not by_processors)


@dataclass
class Strategy:
    """What a run decodes with: the resolved config, its processors in order, and the chooser."""

    config: GenerationConfig
    processors: LogitsProcessorList
    chooser: Chooser
    chooser_name: str
    seed: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    max_new_tokens: int
    rule: Rule
    # DoLa's candidate premature layers, set at its first step (they depend on the model): shown by describe()
    dola_candidate_layers: list[int] | None = None
    _eos_tensor: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def eos_tensor(self, device) -> torch.Tensor:
        """The EOS ids as a tensor on `device` (built once)."""
        cached = self._eos_tensor
        if cached is None or cached.device != torch.device(device):
            cached = self._eos_tensor = torch.tensor(self.eos_token_ids, device=device)
        return cached

    @property
    def do_sample(self) -> bool:
        return bool(self.config.do_sample)

    @property
    def num_beams(self) -> int:
        return int(self.config.num_beams or 1)

    @property
    def processor_names(self) -> list[str]:
        return [type(p).__name__ for p in self.processors]

    def generators(self, rows: int, device: torch.device, seeds: Sequence[int | None] | None = None) -> list:
        """One generator per row, seeded so that row i draws what it would draw alone."""
        seeds = list(seeds) if seeds is not None else [self.seed] * rows
        out = []
        for s in seeds:
            if s is None:
                out.append(None)
            else:
                g = torch.Generator(device=device)
                g.manual_seed(int(s))
                out.append(g)
        return out
