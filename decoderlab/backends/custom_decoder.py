"""The blog post's `CustomDecoder`, with the same call, backed by the cached, recorded loop.

The blog post decoderlab grew from subclasses `GenerationMixin` and re-runs the whole sequence
at every step. This class takes the same constructor and `generate(...)` call and returns the
same output ids tensor, but decodes with a KV cache and keeps the recording as `.trace`.
"""
from __future__ import annotations

from typing import Any

import torch

from .local import LM
from ..record import Record
from ..trace.trace import Trace


class CustomDecoder:
    """`CustomDecoder(model, tokenizer).generate(input_ids, max_length=100, do_sample=True, top_k=50)`."""

    def __init__(self, model, tokenizer, record: Record | None = None, verbose: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.record = record or Record()
        self.verbose = verbose
        self.lm = LM(model, tokenizer)
        self.trace: Trace | None = None

    def generate(self, input_ids, max_length: int = 100, do_sample: bool = True, top_k: int | None = 50,
                 verbose: bool | None = None, **kwargs: Any) -> torch.Tensor:
        """Decode until EOS or `max_length` total tokens; return prompt + generated ids, shape [1, T].

        Extra keyword arguments are `model.generate`'s strategy words (temperature, top_p, seed, ...).
        """
        if hasattr(input_ids, "keys") and "input_ids" in input_ids:  # transformers 5 chat templates return a dict
            input_ids = input_ids["input_ids"]
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be one non-empty sequence, shape [1, T]; got {tuple(input_ids.shape)}")
        if input_ids.shape[1] >= max_length:
            raise ValueError(f"max_length={max_length} leaves no room after the {input_ids.shape[1]}-token prompt")
        verbose = self.verbose if verbose is None else verbose
        eos = self.tokenizer.eos_token_id
        words = dict(do_sample=do_sample, top_k=top_k if top_k is not None else 0,
                     max_new_tokens=max_length - input_ids.shape[1], **kwargs)
        if eos is not None:
            words.setdefault("eos_token_id", eos)
        prompt_text = self.tokenizer.decode(input_ids[0], skip_special_tokens=False)
        show = (lambda step, text: print(text, end="", flush=True)) if verbose else None
        self.trace = self.lm.generate_ids(input_ids.to(self.lm.device), prompt_text, record=self.record,
                                          on_token=show, progress=False, **words)
        if verbose:
            print()
        generated = torch.tensor([self.trace.token_ids], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, generated], dim=-1)
