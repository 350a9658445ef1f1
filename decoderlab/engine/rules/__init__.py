"""Decoding rules, one module each (sampling, beams, group beams, contrastive search, DoLa), and the one table
that picks a strategy's rule from its words, as `generate` picks it.

Every place that depends on the rule asks the `Rule` this table gives (`strategy.rule`), never its name.
"""
from __future__ import annotations

from typing import Callable

from transformers import GenerationConfig

from .. import loop
from ..strategy import Rule
from . import beams, contrastive, dola, group_beams

BEAM_WORDS = ("num_beams", "length_penalty", "early_stopping", "num_return_sequences")

TOKEN = Rule("token", by_processors=True, step=loop.step)
BEAM = Rule("beam", words=BEAM_WORDS, search=beams.beam_search, batch_search=beams.BeamSearch, takes_chooser=False,
            chooser_names=("beam search", "beam sample"),
            limits="beam search keeps several sequences at once: use generate(..., num_beams=B), whose trace "
                   "holds the returned beams and trace.beams the tree")
GROUP_BEAM = Rule("group beam", words=BEAM_WORDS + ("num_beam_groups", "diversity_penalty"),
                  search=group_beams.group_beam_search, takes_chooser=False,
                  chooser_names=("group beam search", "group beam search"),
                  limits="group beam search keeps several sequences at once: use generate(..., num_beams=B, "
                         "num_beam_groups=G), whose trace holds the returned beams and trace.beams the tree")
CONTRASTIVE = Rule("contrastive", words=("penalty_alpha", "top_k"), step=contrastive.step, needs_hidden=True,
                   takes_chooser=False, chooser_names=("contrastive search", "contrastive search"),
                   limits="contrastive search chooses by a rule of its own over the top-k candidates: run it with "
                          "generate(...), whose trace records what each step decided")
DOLA = Rule("dola", words=("dola_layers",), step=dola.step, needs_hidden=True,
            limits="DoLa contrasts the model's layers at every step: run it with generate(...), whose trace records "
                   "what each step decided")

# The table: the first rule whose test the resolved words pass (the order is generate's).
TABLE: tuple[tuple[Callable[[GenerationConfig], bool], Rule], ...] = (
    (lambda c: (c.num_beams or 1) > 1 and (c.num_beam_groups or 1) > 1, GROUP_BEAM),
    (lambda c: (c.num_beams or 1) > 1, BEAM),
    (lambda c: c.dola_layers is not None, DOLA),
    (lambda c: not c.do_sample and (c.penalty_alpha or 0) > 0 and (c.top_k or 0) > 1, CONTRASTIVE),
    (lambda c: True, TOKEN),
)


def rule_for(config: GenerationConfig) -> Rule:
    """The rule that decodes with these resolved words."""
    return next(rule for test, rule in TABLE if test(config))


__all__ = ["Rule", "rule_for", "TABLE", "TOKEN", "BEAM", "GROUP_BEAM", "CONTRASTIVE", "DOLA"]
