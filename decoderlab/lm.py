"""`LM`: what users call (`generate`, `session`, `score`), above the loop; and `load()`.

It owns the model, the tokenizer and the prompt handling (raw text, chat template, messages),
checks bad input before anything runs, and turns a `Recording` into a `Trace`.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import loop
from .models import load_pretrained
from .record import Record, Recording
from .strategy import Strategy, resolve
from .tokens import TokenText
from .trace import Trace

DEFAULT_SYSTEM = "You are a helpful assistant."


class PromptError(ValueError):
    """The prompt is empty, too long for the model, or needs a chat template the model lacks."""


class LM:
    """A causal LM and its tokenizer, ready to decode step by step with everything recorded."""

    def __init__(self, model, tokenizer, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or _model_name(model)
        self.token_text = TokenText(tokenizer)
        self._lens = None

    def __repr__(self) -> str:
        return f"LM({self.name!r}, {type(self.model).__name__}, device={self.device}, dtype={self.model.dtype})"

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_window(self) -> int | None:
        cfg = self.model.config.get_text_config()
        for word in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, word, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    @property
    def lens(self):
        """The model's logit lens (final norm + unembedding)."""
        if self._lens is None:
            from .lens import Lens

            self._lens = Lens(self.model)
            self._lens.token_text = self.token_text
        return self._lens

    # ---- prompts ------------------------------------------------------------------------------
    def encode(self, prompt: Any, chat: bool = False, system: str | None = DEFAULT_SYSTEM) -> tuple[torch.Tensor, str]:
        """Prompt (text or chat messages) -> ids [1, P] on the model's device, and the prompt as text."""
        if isinstance(prompt, (list, tuple)):
            messages = list(prompt)
            if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise PromptError("a messages prompt must be a non-empty list of {'role': ..., 'content': ...} dicts")
            chat = True
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty: give some text (or a list of chat messages)")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        else:
            raise PromptError(f"the prompt must be a string or a list of chat messages, not {type(prompt).__name__}")
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptError(
                    f"{self.name} has no chat template, so chat=True (or a messages list) cannot be applied: "
                    "pass chat=False with a plain prompt, or set tokenizer.chat_template"
                )
            text = self._apply_template(messages, dropped_default_system=(
                isinstance(prompt, str) and system == DEFAULT_SYSTEM))
            ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            text = prompt
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] == 0:
            raise PromptError("the prompt encodes to no tokens")
        window = self.context_window
        if window is not None and ids.shape[1] >= window:
            raise PromptError(
                f"the prompt is {ids.shape[1]} tokens, but {self.name}'s context window is {window}: "
                "shorten the prompt so at least one token can be generated"
            )
        return ids.to(self.device), text

    def _apply_template(self, messages: list[dict], dropped_default_system: bool) -> str:
        """The chat template's text; templates that refuse a system role (Gemma) get the user turn alone
        when the system message was only decoderlab's default."""
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises TemplateError (or others) from inside the template
            if dropped_default_system and messages and messages[0]["role"] == "system":
                import warnings

                warnings.warn(f"{self.name}'s chat template refused the default system message ({err}); "
                              "sending the user message alone", stacklevel=3)
                return self._apply_template(messages[1:], dropped_default_system=False)
            raise PromptError(f"{self.name}'s chat template failed on these messages: {err}") from err

    def strategy(self, prompt_length: int, **words: Any) -> Strategy:
        """Resolve generate's words for this model (see `decoderlab.strategy.resolve`)."""
        return resolve(self.model, prompt_length, **words)

    # ---- generate ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: Any,
        *,
        chat: bool = False,
        system: str | None = DEFAULT_SYSTEM,
        record: Record | None = None,
        progress: bool | None = None,
        on_token: Callable[[int, str], None] | None = None,
        **strategy: Any,
    ) -> Trace:
        """Decode to a stop with everything recorded. Takes `model.generate`'s strategy words, plus
        `seed`, `logits_processor` (a list of transformers LogitsProcessors) and `chooser`.

        On Ctrl-C the trace so far is returned (stop_reason "interrupted"); on another error, the
        trace so far is attached to the exception as `err.trace`.
        """
        ids, text = self.encode(prompt, chat=chat, system=system)
        return self.generate_ids(ids, text, record=record, progress=progress, on_token=on_token, **strategy)

    def generate_ids(self, ids: torch.Tensor, prompt_text: str = "", *, record: Record | None = None,
                     progress: bool | None = None, on_token: Callable[[int, str], None] | None = None,
                     **strategy: Any) -> Trace:
        """`generate` from token ids [1, P] already encoded (the prompt text is kept for the trace)."""
        record = record or Record()
        window = self.context_window
        if ids.shape[1] == 0:
            raise PromptError("the prompt has no tokens")
        if window is not None and ids.shape[1] >= window:
            raise PromptError(f"the prompt is {ids.shape[1]} tokens, but {self.name}'s context window is {window}")
        strat = self.strategy(ids.shape[1], **strategy)
        record.check(self.model)
        recording = Recording(record)
        observers: list = [recording]
        bar = _progress_bar(strat.max_new_tokens, progress)
        stream = None
        if on_token is not None or bar is not None:
            def stream(step: int, token: torch.Tensor) -> None:
                if bar is not None:
                    bar.update(1)
                if on_token is not None:
                    on_token(step, self.token_text(int(token[0])))
        state = None
        try:
            with recording.attached(self.model):
                state = loop.prefill(self.model, ids, strat, observers)
                loop.run(self.model, state, strat, observers, max_length=self.context_window, on_token=stream)
        except KeyboardInterrupt:
            if state is None:
                raise
            state.stop_reason = "interrupted"
        except Exception as err:  # keep what was recorded
            if state is not None and recording.steps:
                state.stop_reason = f"error: {type(err).__name__}"
                err.trace = self.trace(recording, state, strat, prompt_text)  # type: ignore[attr-defined]
            raise
        finally:
            if bar is not None:
                bar.close()
        return self.trace(recording, state, strat, prompt_text)

    def session(self, prompt: Any, *, chat: bool = False, system: str | None = DEFAULT_SYSTEM,
                record: Record | None = None, **strategy: Any):
        """An interactive `Session`: step, choose, rewind and fork over one KV cache."""
        from .session import Session

        ids, text = self.encode(prompt, chat=chat, system=system)
        return Session(self, ids, text, record or Record(), strategy)

    def score(self, prompt: Any, continuation: str | Sequence[int], *, chat: bool = False,
              system: str | None = DEFAULT_SYSTEM, record: Record | None = None, **strategy: Any) -> Trace:
        """Teacher forcing: one forward over prompt + continuation; a trace whose steps are the given tokens.

        With chat=True the continuation is the assistant's answer. Strategy words (e.g. temperature)
        set the processors whose final probabilities are recorded.
        """
        record = record or Record()
        if record.attention or record.lens or record.prefill_attention:
            raise ValueError("score() records choices, candidates and processors; attention and lens are "
                             "recorded by generate() and sessions (use a session with choose(token=...) instead)")
        ids, text = self.encode(prompt, chat=chat, system=system)
        if isinstance(continuation, str):
            if not continuation:
                raise PromptError("the continuation to score is empty")
            cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
        else:
            cont = torch.as_tensor(list(continuation), dtype=torch.long)
        if cont.numel() == 0:
            raise PromptError("the continuation encodes to no tokens")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        bad = cont[(cont < 0) | (cont >= vocab)]
        if bad.numel():
            raise PromptError(f"token ids {bad.tolist()} are outside the vocabulary [0, {vocab})")
        cont = cont.to(self.device)
        full = torch.cat([ids[0], cont])[None]
        window = self.context_window
        if window is not None and full.shape[1] > window:
            raise PromptError(f"prompt + continuation is {full.shape[1]} tokens, past the context window of {window}")
        strategy.setdefault("max_new_tokens", int(cont.numel()))
        strat = self.strategy(ids.shape[1], **strategy)
        with torch.inference_mode():
            logits = self.model(input_ids=full, use_cache=False).logits[0, ids.shape[1] - 1 : -1].float()
        recording = Recording(record)
        for t in range(cont.numel()):
            prefix = full[:, : ids.shape[1] + t]
            scores, stages = loop.process(strat, prefix, logits[t : t + 1], recording.keep_stages)
            token = cont[t : t + 1]
            ctx = loop.StepContext(t, prefix, logits[t : t + 1], scores, stages, token,
                                   torch.zeros(1, dtype=torch.bool, device=self.device),
                                   torch.zeros(1, dtype=torch.bool, device=self.device))
            recording.on_step(ctx)
        state = loop.State(ids=full, cache=None, prompt_length=ids.shape[1], generators=[],
                           finished=torch.zeros(1, dtype=torch.bool), stop_reason="given")
        return self.trace(recording, state, strat, text, chooser="given")

    # ---- recording -> trace -------------------------------------------------------------------------
    def trace(self, recording: Recording, state: loop.State, strategy: Strategy, prompt_text: str,
              chooser: str | None = None, branch: int = 0, parent: int | None = None,
              fork_step: int | None = None) -> Trace:
        """Build a `Trace` from what a run recorded (arrays to the host once, here)."""
        arrays = {name: torch.stack(col).cpu().numpy() for name, col in recording.columns.items() if col}
        steps = recording.steps
        if recording.attention and any(a is not None for a in recording.attention[:steps]):
            arrays["attention"] = _pad_attention(recording.attention[:steps], state.prompt_length)
        if recording.residuals and any(r is not None for r in recording.residuals[:steps]):
            arrays["residual"] = _stack_filled(recording.residuals[:steps]).numpy()
        prompt_ids = state.ids[0, : state.prompt_length].cpu().numpy()
        seen = {int(i) for i in prompt_ids}
        for name in ("token_id", "cand_id"):
            if name in arrays:
                seen.update(int(i) for i in np.unique(arrays[name]))
        token_text = {i: self.token_text(i) for i in sorted(seen)}
        texts = [self._row_text(state, strategy, r) for r in range(state.rows)]
        num_layers = getattr(self.model.config.get_text_config(), "num_hidden_layers", 0)
        num_heads = getattr(self.model.config.get_text_config(), "num_attention_heads", 0)
        opts = recording.opts
        return Trace(
            prompt=prompt_text, prompt_ids=prompt_ids, arrays=arrays, token_text=token_text,
            model_name=self.name, strategy=strategy.describe(), processor_names=strategy.processor_names,
            stop_reason=state.stop_reason, texts=texts, chooser=chooser or strategy.chooser_name,
            attention_layers=list(opts.attention_layers) if opts.attention_layers is not None else list(range(num_layers)),
            attention_heads=list(opts.attention_heads) if opts.attention_heads is not None else list(range(num_heads)),
            prefill_attention={k: v.cpu().numpy() for k, v in recording.prefill_attention.items()},
            branch=branch, parent=parent, fork_step=fork_step, lens_top_k=opts.lens_top_k,
            lens_object=self.lens if "residual" in arrays else None,
        )

    def _row_text(self, state: loop.State, strategy: Strategy, row: int) -> str:
        gen = state.ids[row, state.prompt_length :].tolist()
        eos = set(strategy.eos_token_ids)
        for i, t in enumerate(gen):
            if t in eos:
                gen = gen[:i]
                break
        return self.tokenizer.decode(gen, skip_special_tokens=True)


def _model_name(model) -> str:
    """A readable name: the folder's name, the bundled model's own name for its cache folder."""
    from pathlib import Path

    from .models import DEFAULT_NAME

    source = str(getattr(model.config, "_name_or_path", "") or "")
    name = Path(source).name if source else type(model).__name__
    return DEFAULT_NAME if name.startswith(DEFAULT_NAME + "-") else name


def _stack_filled(items: list) -> torch.Tensor:
    like = next(x for x in items if x is not None)
    return torch.stack([x if x is not None else torch.zeros_like(like) for x in items]).cpu()


def _pad_attention(rows: list, prompt_length: int) -> np.ndarray:
    """Per-step rows [B, L, H, K_t] -> one array [S, B, L, H, K_max], zero beyond each step's context."""
    like = next(x for x in rows if x is not None)
    k_max = prompt_length + len(rows) - 1
    out = torch.zeros((len(rows), *like.shape[:-1], k_max), dtype=torch.float16)
    for s, r in enumerate(rows):
        if r is not None:
            out[s, ..., : r.shape[-1]] = r.cpu()
    return out.numpy()


def _progress_bar(total: int, progress: bool | None):
    """tqdm.auto (a notebook bar in Jupyter) with tokens/s; by default only for runs longer than 2 s."""
    if progress is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="decoding", delay=0 if progress else 2.0, leave=False,
                file=sys.stderr)


def load(
    path_or_id: str | None = None,
    *,
    dtype: Any = None,
    device: str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> LM:
    """Load a causal LM. No argument: the bundled SmolLM2-135M-Instruct (converted once, then cached)."""
    model, tokenizer, name = load_pretrained(path_or_id, dtype=dtype, device=device, device_map=device_map,
                                             trust_remote_code=trust_remote_code, **kwargs)
    return LM(model, tokenizer, name)
