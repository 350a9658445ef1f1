"""Strategy words: `model.generate`'s words resolved into a `Strategy`, their checks, and their description.

The words are resolved the way `generate` resolves them (the model's `generation_config` first, then the
user's words), and the processors are built by transformers itself (`GenerationMixin._get_logits_processor`),
so the order and the arithmetic are generate's; the rule is `engine.rules.rule_for`'s.
"""
from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from ..errors import StrategyError
from .rules import rule_for
from .rules.sampling import greedy, sample
from .strategy import Chooser, Strategy


def check_words(cfg: GenerationConfig, user: dict[str, Any], only_given: bool = False) -> None:
    """Clear errors for values generate would silently ignore or fail on deep inside.

    With `only_given`, check the user's own words (before transformers validates them its way).
    """
    if only_given:
        cfg = copy.copy(cfg)
        for word, value in user.items():
            object.__setattr__(cfg, word, value)

    def bad(word: str, why: str) -> StrategyError:
        return StrategyError(f"{word}={user.get(word, getattr(cfg, word, None))!r}: {why}")

    def whole(word: str, least: int, why: str) -> int | None:
        v = getattr(cfg, word, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            raise bad(word, why)
        return v

    def num(word: str) -> float | None:
        v = getattr(cfg, word, None)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)):
            raise bad(word, "must be a number")
        return float(v)

    t = num("temperature")
    if t is not None and t <= 0:
        raise bad("temperature", "must be > 0 (use do_sample=False for greedy decoding)")
    p = num("top_p")
    if p is not None and not 0 < p <= 1:
        raise bad("top_p", "must be in (0, 1]")
    whole("top_k", 0, "must be a whole number >= 0 (0 turns it off)")
    m = num("min_p")
    if m is not None and not 0 <= m <= 1:
        raise bad("min_p", "must be in [0, 1]")
    tp = num("typical_p")
    if tp is not None and not 0 < tp <= 1:
        raise bad("typical_p", "must be in (0, 1]")
    rp = num("repetition_penalty")
    if rp is not None and rp <= 0:
        raise bad("repetition_penalty", "must be > 0 (1.0 turns it off)")
    whole("no_repeat_ngram_size", 0, "must be a whole number >= 0")
    whole("max_new_tokens", 1, "must be a whole number >= 1")
    for word in ("epsilon_cutoff", "eta_cutoff"):
        v = num(word)
        if v is not None and not 0 <= v < 1:
            raise bad(word, "must be in [0, 1) (0 turns it off)")
    nb = whole("num_beams", 1, "must be a whole number >= 1 (1: no beam search)")
    nr = whole("num_return_sequences", 1, "must be a whole number >= 1")
    if nr is not None and nr > 1 and (nb or 1) == 1:
        raise StrategyError(f"num_return_sequences={nr}: without beams one run is one sequence; use seeds=[...] for "
                            "several samples, or num_beams >= num_return_sequences")
    if nr is not None and nb is not None and nr > nb:
        raise StrategyError(f"num_return_sequences={nr} is more than num_beams={nb}: at most num_beams sequences "
                            "come back")
    es = getattr(cfg, "early_stopping", None)
    if es is not None and es not in (True, False, "never"):
        raise bad("early_stopping", "must be True, False or 'never'")
    num("length_penalty")  # any number: > 0 favours longer sequences, < 0 shorter
    ng = whole("num_beam_groups", 1, "must be a whole number >= 1")
    if ng is not None and ng > 1 and (not isinstance(nb, int) or nb % ng):
        raise StrategyError(f"num_beam_groups={ng}: num_beams={nb} must be a multiple of it (each group keeps "
                            "num_beams / num_beam_groups beams)")
    if ng is not None and ng > 1 and getattr(cfg, "do_sample", False):
        raise StrategyError(f"do_sample=True with num_beam_groups={ng}: group (diverse) beam search does not sample; "
                            "pass do_sample=False, or num_beam_groups=1 for beam sampling")
    dp = num("diversity_penalty")
    if dp is not None and dp < 0:
        raise bad("diversity_penalty", "must be >= 0")
    pa = num("penalty_alpha")
    if pa is not None and not 0 <= pa <= 1:
        raise bad("penalty_alpha", "must be in [0, 1] (0: greedy)")
    dl_ = getattr(cfg, "dola_layers", None)
    if dl_ is not None and dl_ not in ("low", "high") and not (
            isinstance(dl_, (list, tuple)) and dl_ and all(isinstance(i, int) and not isinstance(i, bool)
                                                             and i >= 0 for i in dl_)):
        raise bad("dola_layers", "must be 'low', 'high', or a list of layer indices >= 0")
    gs = getattr(cfg, "guidance_scale", None)
    if gs is not None and gs != 1:
        raise StrategyError(f"guidance_scale={gs}: classifier-free guidance runs a second model forward inside a "
                            "processor, which decoderlab cannot record faithfully yet")


@contextmanager
def _quiet_transformers():
    """transformers logs that words of the strategies it moved to the hub (penalty_alpha, top_k with it, ...)
    "may be ignored": decoderlab runs those strategies itself, so the message would mislead."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def resolve(
    model,
    prompt_length: int,
    *,
    logits_processor: Sequence[LogitsProcessor] | None = None,
    chooser: Chooser | None = None,
    seed: int | None = None,
    **words: Any,
) -> Strategy:
    """Turn generate's words into a `Strategy` for this model and prompt length."""
    unknown = [w for w in words if not hasattr(GenerationConfig(), w)]
    if unknown:
        raise StrategyError(
            f"unknown strategy word(s) {', '.join(map(repr, unknown))}: use model.generate's words "
            "(do_sample, temperature, top_k, top_p, min_p, typical_p, repetition_penalty, "
            "no_repeat_ngram_size, max_new_tokens, eos_token_id, ...) or seed / logits_processor / chooser"
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise StrategyError(f"seed={seed!r}: must be a whole number or None")
    if logits_processor is not None and (not isinstance(logits_processor, (list, tuple, LogitsProcessorList))
                                         or not all(callable(p) for p in logits_processor)):
        raise StrategyError("logits_processor must be a list of LogitsProcessor objects (callables taking "
                            "input_ids and scores)")
    if chooser is not None and not callable(chooser):
        raise StrategyError("chooser must be a function (scores [B, V], generators) -> token ids [B]")
    has_default_max_length = words.get("max_length") is None and model.generation_config.max_length is None
    check_words(GenerationConfig(), words, only_given=True)
    with warnings.catch_warnings(), _quiet_transformers():
        warnings.simplefilter("ignore")
        try:
            config, _ = model._prepare_generation_config(None, **words)
        except ValueError as err:
            raise StrategyError(f"invalid strategy: {err}") from err
    check_words(config, words)
    device = model.device
    if isinstance(config.eos_token_id, (list, tuple)) and len(config.eos_token_id) == 0:
        config.eos_token_id = None  # eos_token_id=[]: no EOS stop (None would fall back to the model's EOS)
    model._prepare_special_tokens(config, None, device=device)
    if config.max_new_tokens is None and not has_default_max_length and config.max_length is not None:
        max_new = int(config.max_length) - prompt_length
        if max_new < 1:
            raise StrategyError(f"max_length={config.max_length} leaves no room after the {prompt_length}-token "
                                "prompt: use max_new_tokens, or a larger max_length")
    elif config.max_new_tokens is None:
        max_new = int(config.max_length) if config.max_length is not None else 20
    else:
        max_new = int(config.max_new_tokens)
    config.max_new_tokens = max_new
    config.max_length = prompt_length + max_new
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + prompt_length
    user_processors = LogitsProcessorList(logits_processor or [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processors = model._get_logits_processor(
            generation_config=config,
            input_ids_seq_length=prompt_length,
            encoder_input_ids=None,
            prefix_allowed_tokens_fn=None,
            logits_processor=user_processors,
            device=device,
            model_kwargs={},
        )
    eos = config._eos_token_tensor
    eos_ids = [] if eos is None else [int(x) for x in torch.as_tensor(eos).flatten().tolist()]
    pad = config._pad_token_tensor
    pad_id = int(pad) if pad is not None else (eos_ids[0] if eos_ids else None)
    rule = rule_for(config)
    if chooser is not None and not rule.takes_chooser:
        word = "num_beams > 1" if rule.search is not None else "penalty_alpha"
        raise StrategyError(f"chooser= with {word}: {rule.name} search chooses by its own rule; give one or the other")
    if rule.chooser_names is not None:
        pick = sample if config.do_sample else greedy
        name = rule.chooser_names[bool(config.do_sample)]
    elif chooser is not None:
        pick, name = chooser, getattr(chooser, "__name__", type(chooser).__name__)
    elif config.do_sample:
        pick, name = sample, "sample"
    else:
        pick, name = greedy, "greedy"
    return Strategy(config=config, processors=processors, chooser=pick, chooser_name=name, seed=seed,
                    eos_token_ids=eos_ids, pad_token_id=pad_id, max_new_tokens=max_new, rule=rule)


def describe(strategy: Strategy) -> dict[str, Any]:
    """The strategy as resolved (the model's defaults and transformers' global defaults filled in), with the
    words of its rule: what a trace keeps as `trace.strategy`."""
    cfg = strategy.config
    sampling = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")
    always = ("repetition_penalty", "no_repeat_ngram_size", "min_length", "min_new_tokens", "bad_words_ids",
              "sequence_bias", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
              "forced_eos_token_id", "exponential_decay_length_penalty", "renormalize_logits",
              "remove_invalid_values", "eos_token_id", "pad_token_id")
    out: dict[str, Any] = {"do_sample": strategy.do_sample}
    for word in (sampling if strategy.do_sample else ()) + strategy.rule.words + always:
        value = getattr(cfg, word, None)
        if value is not None and value is not False:
            out[word] = value
    if strategy.dola_candidate_layers is not None:
        # the candidate layers depend on the model: DoLa's step sets them on the strategy at its first step
        out["dola_candidate_layers"] = list(strategy.dola_candidate_layers)
    out.update(max_new_tokens=strategy.max_new_tokens, seed=strategy.seed, chooser=strategy.chooser_name,
               processors=strategy.processor_names)
    return out
