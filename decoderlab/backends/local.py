"""`LM`: what users call (`generate`, `session`, `score`), above the loop; and `load()`.

It owns the model, the tokenizer and the prompt handling (raw text, chat template, messages),
checks bad input before anything runs, and hands the loop's recording to the one trace builder
(`builder.py`) with what a trace needs of this model (`model_info`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..engine import Strategy, load_pretrained, loop, resolve
from ..engine.tokens import TokenText
from ..errors import PromptError, SessionError, StrategyError
from ..record import Record, Recording, keep_large_allocations_apart
from ..trace import ModelInfo, Trace, from_beam_run, from_recording
from ..trace.sample_tree import SampleTree, check_sampling, sample_seeds
from .progress import progress_bar
from .session import Session

DEFAULT_SYSTEM = "You are a helpful assistant."



class LM:
    """A causal LM and its tokenizer, ready to decode step by step with everything recorded."""

    def __init__(self, model, tokenizer, name: str = ""):
        keep_large_allocations_apart()  # a long run's heap stays flat (record/heap.py says why)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or _model_name(model)
        self.token_text = TokenText(tokenizer)
        self._lens = None
        self.source: dict | None = None  # `load`'s arguments, where `load` made it (a study's workers load it so)

    def __repr__(self) -> str:
        placed = _placement(self.model)
        where = f"placement={placed!r}" if placed else f"device={self.device}"
        return f"LM({self.name!r}, {type(self.model).__name__}, {where}, dtype={self.model.dtype})"

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
            from ..engine.lens import Lens

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
        self._check_room(ids.shape[1])
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
        """Resolve generate's words for this model (see `engine.words.resolve`)."""
        return resolve(self.model, prompt_length, **words)

    def model_info(self, lens: bool = False) -> ModelInfo:
        """What a trace needs of this model (its lens only when residuals are recorded)."""
        cfg = self.model.config.get_text_config()
        return ModelInfo(
            name=self.name, token_text=self.token_text,
            decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            num_layers=getattr(cfg, "num_hidden_layers", 0) or 0, num_heads=getattr(cfg, "num_attention_heads", 0) or 0,
            lens=self.lens if lens else None,
        )

    def _check_room(self, length: int, what: str = "the prompt") -> None:
        """The one context-window check: a step needs fewer positions than the window holds."""
        if loop.window_full(length, self.context_window):
            raise PromptError(f"{what} is {length} tokens, but {self.name}'s context window is "
                              f"{self.context_window}: shorten it so at least one token can be generated")

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
        seeds: Sequence[int] | None = None,
        stream_row: int = 0,
        compile: bool = False,
        **strategy: Any,
    ) -> Trace:
        """Decode to a stop with everything recorded. Takes `model.generate`'s strategy words, plus
        `seed`, `logits_processor` (a list of transformers LogitsProcessors) and `chooser`.

        `seeds=[s1, s2, ...]` runs one row per seed as one batch (each row draws what `seed=s` draws
        alone, and stops at its own EOS); `on_token(step, text)` streams row `stream_row`. With
        `num_beams > 1` the rows are the returned beams and `on_token` is not called (a beam's tokens are
        known only once the search ends).
        `compile=True` takes the fast path on a GPU: a static KV cache and the decode step captured once as a CUDA
        graph, recording on (`decoderlab.engine.fast`); token-by-token strategies only (not beams, contrastive search, DoLa).
        On Ctrl-C the trace so far is returned (stop_reason "interrupted"); on another error, the
        trace so far is attached to the exception as `err.trace`.
        """
        ids, text = self.encode(prompt, chat=chat, system=system)
        return self.generate_ids(ids, text, record=record, progress=progress, on_token=on_token, seeds=seeds,
                                 stream_row=stream_row, compile=compile, **strategy)

    def generate_ids(self, ids: torch.Tensor, prompt_text: str = "", *, record: Record | None = None,
                     progress: bool | None = None, on_token: Callable[[int, str], None] | None = None,
                     seeds: Sequence[int] | None = None, stream_row: int = 0, compile: bool = False,
                     **strategy: Any) -> Trace:
        """`generate` from token ids [1, P] already encoded (the prompt text is kept for the trace)."""
        record = record or Record()
        if ids.shape[1] == 0:
            raise PromptError("the prompt has no tokens")
        self._check_room(ids.shape[1])
        rows = _check_seeds(seeds, strategy)
        if isinstance(stream_row, bool) or not isinstance(stream_row, int) or not 0 <= stream_row < rows:
            raise PromptError(f"stream_row={stream_row!r}: must be a row in [0, {rows})")
        strat = self.strategy(ids.shape[1], **strategy)
        record.check(self.model)
        if not isinstance(compile, bool):
            raise StrategyError(f"compile={compile!r}: must be True (the fast path) or False")
        if compile and not strat.rule.by_processors:
            raise StrategyError(f"compile=True with {strat.rule.name} decoding: the fast path captures one forward per "
                                "step, which beam search, contrastive search and DoLa do not have; leave compile off")
        if strat.num_beams > 1:
            if seeds is not None:
                raise StrategyError("seeds= with num_beams > 1: a beam search returns its own rows "
                                    "(num_return_sequences); give seed= for beam sampling")
            return self._beam_search(ids, prompt_text, strat, record)
        if not strat.rule.by_processors and seeds is not None:
            raise StrategyError(f"seeds= with {strat.rule.name} decoding: one run at a time (give seed=)")
        row_seeds = list(seeds) if seeds is not None else [strat.seed]
        room = strat.max_new_tokens if self.context_window is None else \
            max(0, min(strat.max_new_tokens, self.context_window - ids.shape[1]))
        recording = Recording(record, host=(rows, ids.shape[1]), expected_steps=room)
        observers: list = [recording]
        bar = progress_bar(strat.max_new_tokens, progress, rows)
        stream = None
        if on_token is not None or bar is not None:
            def stream(step: int, token: torch.Tensor, row_ids: torch.Tensor) -> None:
                if bar is not None:
                    bar.update(1)
                    if rows > 1:
                        bar.set_postfix(rows_running=len(row_ids), refresh=False)
                if on_token is not None:
                    hit = (row_ids == stream_row).nonzero()
                    if len(hit):
                        on_token(step, self.token_text(int(token[int(hit[0])])))
        # rows share the prompt's prefill (one forward, its cache repeated: `loop.prefill`), except where a forward's
        # capture (attention rows, lens residuals) must hold every row, or the fast path's cache has fixed rows
        share = rows > 1 and not compile and not record.captures_forward
        batch = ids.expand(rows, -1) if rows > 1 and not share else ids
        info = self.model_info(lens=record.lens)
        state = None
        try:
            decoder = self._captured_decoder(ids.shape[1], batch.shape[0], strat, observers, bar) if compile else None
            with recording.attached(self.model):
                state = loop.prefill(self.model, batch, strat, observers, seeds=row_seeds,
                                     keep_hidden=strat.rule.needs_hidden,
                                     cache=None if decoder is None else decoder.cache, rows=rows if share else None)
                state.forward = decoder
                loop.run(self.model, state, strat, observers, max_length=self.context_window, on_token=stream,
                         step_fn=strat.rule.step)
            if decoder is not None:  # for the next runs (a failed run's is not: its capture may have failed)
                from ..engine.fast import keep

                keep(decoder)
        except KeyboardInterrupt:
            if state is None:
                raise
            state.stop_reason = "interrupted"
        except Exception as err:  # keep what was recorded
            if state is not None and recording.steps:
                state.stop_reason = f"error: {type(err).__name__}"
                err.trace = from_recording(recording, state, strat, info, prompt_text,  # type: ignore[attr-defined]
                                           seeds=row_seeds)
            raise
        finally:
            if bar is not None:
                bar.close()
        return from_recording(recording, state, strat, info, prompt_text, seeds=row_seeds)

    def sample_tree(self, prompt: Any, n: int = 64, *, seed: int = 0, max_new_tokens: int = 32, chat: bool = False,
                    system: str | None = DEFAULT_SYSTEM, record: Record | None = None, progress: bool | None = None,
                    **strategy: Any) -> SampleTree:
        """`n` sampled continuations of `prompt` merged into a prefix tree, with counts and the model's
        probabilities at every node (`decoderlab.trace.sample_tree.SampleTree`).

        The runs are the rows of one batch that prefills the prompt once (`generate(seeds=...)`): run i is seeded
        with `seed + i` and draws the tokens `generate(prompt, seed=seed + i, ...)` draws alone with the same words.
        `do_sample=True` unless given; any sampling words (`temperature`, `top_p`, ...) apply to every run.
        """
        seeds = sample_seeds(n, seed, strategy)
        strategy.setdefault("do_sample", True)
        ids, text = self.encode(prompt, chat=chat, system=system)
        check_sampling(self.strategy(ids.shape[1], max_new_tokens=max_new_tokens, **strategy), len(seeds), strategy)
        trace = self.generate_ids(ids, text, record=record, progress=progress, seeds=seeds,
                                  max_new_tokens=max_new_tokens, **strategy)
        return SampleTree(trace)

    def _captured_decoder(self, prompt_length: int, rows: int, strat: Strategy, observers: list, bar: Any = None):
        """The fast path's forwards: a static cache for the prompt and every step's token (within the window), the
        one an earlier run left where it fits (`fast.decoder_for`). The progress bar, if any, says what the first
        steps wait for (compiling layer i/L, capturing)."""
        from ..engine.fast import cache_length, decoder_for

        decoding = None if bar is None else bar.desc

        def notice(text: str | None) -> None:
            bar.set_description_str(decoding if text is None else text)

        return decoder_for(self.model, cache_length(prompt_length + strat.max_new_tokens, self.context_window), rows,
                           observers, notice=None if bar is None else notice)

    def _beam_search(self, ids: torch.Tensor, prompt_text: str, strat: Strategy, record: Record) -> Trace:
        """`generate` with num_beams > 1: the returned sequences as rows, best first, and the tree."""
        generator = None
        if strat.seed is not None:
            generator = torch.Generator(device=ids.device)
            generator.manual_seed(int(strat.seed))
        recording = Recording(record)
        with recording.attached(self.model):
            run = strat.rule.search(self.model, ids, strat, [recording], generator=generator)
        return from_beam_run(run, recording, strat, self.model_info(lens=record.lens), prompt_text, ids[0].tolist())

    def session(self, prompt: Any, *, chat: bool = False, system: str | None = DEFAULT_SYSTEM,
                record: Record | None = None, **strategy: Any) -> Session:
        """An interactive `Session`: step, choose, rewind and fork over one KV cache (one row)."""
        if "seeds" in strategy:
            raise SessionError("a session steps one sequence: give seed=, not seeds= (or use generate(seeds=...))")
        ids, text = self.encode(prompt, chat=chat, system=system)
        strat = self.strategy(ids.shape[1], **strategy)
        if not strat.rule.by_processors:  # the rule as generate would pick it (the model's defaults included)
            raise SessionError(f"a session steps one sequence with processors and a chooser; {strat.rule.limits}")
        record = record or Record()
        return Session(self.model, ids, text, record, strat,
                       self.model_info(lens=record.lens), context_window=self.context_window,
                       encode_token=lambda t: self.tokenizer(t, add_special_tokens=False).input_ids)

    def score(self, prompt: Any, continuation: str | Sequence[int], *, chat: bool = False,
              system: str | None = DEFAULT_SYSTEM, record: Record | None = None, **strategy: Any) -> Trace:
        """Teacher forcing: one forward over prompt + continuation; a trace whose steps are the given tokens.

        With chat=True the continuation is the assistant's answer. Strategy words (e.g. temperature)
        set the processors whose final probabilities are recorded.
        """
        record = record or Record()
        if record.captures_forward:
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
        self._check_room(ids.shape[1] + cont.numel() - 1, "prompt + continuation (less its last token)")
        strategy.setdefault("max_new_tokens", int(cont.numel()))
        strat = self.strategy(ids.shape[1], **strategy)
        if not strat.rule.by_processors:
            raise StrategyError(f"score() scores given tokens with processors; {strat.rule.name} search chooses by its "
                                "own rule, so there is nothing of it to score: drop its words")
        recording = Recording(record)
        state = loop.teacher_force(self.model, ids, cont, strat, [recording])
        return from_recording(recording, state, strat, self.model_info(), text, chooser="given")


def _placement(model) -> str | None:
    """How a model sharded over several devices (accelerate's device_map) was placed, as "layers 0-7 cuda:0,
    8-15 cuda:1, head cuda:1"; None for a model on one device."""
    devices = {p.device for p in model.parameters()}
    if len(devices) < 2:
        return None
    from ..engine.lens import decoder_layers

    runs: list[list] = []  # [first layer, last layer, device]
    for i, layer in enumerate(decoder_layers(model)):
        device = next(layer.parameters()).device
        if runs and runs[-1][2] == device:
            runs[-1][1] = i
        else:
            runs.append([i, i, device])
    parts = [f"{a}-{b} {d}" if a != b else f"{a} {d}" for a, b, d in runs]
    return f"layers {', '.join(parts)}, head {model.get_output_embeddings().weight.device}"


def _model_name(model) -> str:
    """A readable name: the folder's name, the bundled model's own name for its cache folder."""
    from pathlib import Path

    from ..engine.models import DEFAULT_NAME

    source = str(getattr(model.config, "_name_or_path", "") or "")
    name = Path(source).name if source else type(model).__name__
    return DEFAULT_NAME if name.startswith(DEFAULT_NAME + "-") else name


def _check_seeds(seeds: Sequence[int] | None, words: dict) -> int:
    """How many rows `seeds` asks for (1 without it); a clear error for a bad list."""
    if seeds is None:
        return 1
    if "seed" in words:
        raise StrategyError("give seed= (one run) or seeds= (one row per seed), not both")
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__iter__"):
        raise StrategyError(f"seeds={seeds!r}: must be a list of whole numbers, one per row")
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise StrategyError(f"seeds={seeds!r}: must be a non-empty list of whole numbers, one per row")
    return len(seeds)


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
    lm = LM(model, tokenizer, name)
    lm.source = dict(path_or_id=path_or_id, dtype=dtype, device=device, device_map=device_map,  # what loads it again
                     trust_remote_code=trust_remote_code, **kwargs)
    return lm
