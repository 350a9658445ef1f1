"""Models behind an OpenAI-compatible API (OpenAI, vLLM, llama.cpp, llama-cpp-python, Ollama) as traces.

    api = dl.connect(base_url="http://127.0.0.1:8000/v1", model="smollm2")
    trace = api.generate("What is the capital of France?", chat=True, max_new_tokens=32)

Why: many models a researcher studies are reachable only through such a server, and large ones are
served by engines built for it. decoderlab serves nothing itself: it asks with the official `openai`
client for the tokens and their top-k logprobs, and builds the same `Trace` as a local run, through
the same builder. What the protocol cannot give (attention, the logit lens, logits beyond the top k)
is refused before any request; what the numbers mean (raw or processed, and by whom) is written in the
trace (`trace.strategy["logprobs"]`), because it differs by server and a client cannot see it.

`generate`'s words keep `LM.generate`'s meaning: greedy unless `do_sample=True` (greedy is sent as
temperature 0), `max_new_tokens` is `max_tokens`, and words the protocol lacks (`top_k`, `min_p`,
`repetition_penalty`) go in `extra_body` to servers that take them; where a server's own default
would act (llama.cpp's top_k=40, min_p=0.05, repeat_penalty=1.1), the neutral value is sent.
"""
from __future__ import annotations

import urllib.parse
from typing import Any, Callable, Sequence

from .api_client import Connection, Server, server_for
from .api_replies import ENTROPY_NOTE, TokenStep, build, chat_steps, completion_steps, numeric_fault
from ..errors import APIError, NoLogprobs, NotSupported, NumericError, PromptError, ServerFailed, StrategyError
from .local import DEFAULT_SYSTEM
from ..record import Record
from ..trace.trace import Trace

__all__ = ["connect", "APIBackend"]

WORDS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
NEUTRAL = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}  # where a word does nothing
LLAMA_SERVERS = ("llama-cpp-python", "llama.cpp")  # their defaults act: send the neutral values
UNRESOLVED = 1 << 40  # ids for texts the server's tokenizer does not read as one token
STOPS = {"stop": "eos", "length": "max_new_tokens"}


def connect(base_url: str, model: str, api_key: str | None = None, *, logprobs: str | None = None,
            server: str | None = None, timeout: float = 60.0, max_retries: int = 2,
            **client_kwargs: Any) -> "APIBackend":
    """A model behind an OpenAI-compatible server, as a backend with `generate`, `session` and `score`.

    `api_key` defaults to `OPENAI_API_KEY` (local servers need none). `logprobs="raw"|"processed"`
    declares what the server's logprobs are where a client cannot tell (vLLM's `--logprobs-mode`);
    `server=` names the kind when `/v1/models` does not ("llama-cpp-python", "llama.cpp", "vllm",
    "ollama", "openai"). Other keyword arguments go to `openai.OpenAI`. Asks `/v1/models` once, so a
    server that is not running or a model it does not serve is a clear error here.
    """
    if logprobs not in (None, "raw", "processed"):
        raise ValueError(f"logprobs={logprobs!r}: must be 'raw', 'processed' or None (what the server's logprobs "
                         "are, where it cannot say: vLLM's --logprobs-mode)")
    conn = Connection(base_url, model, api_key, timeout=timeout, max_retries=max_retries, **client_kwargs)
    owner = conn.owner()
    if server is not None:
        known = {"llama-cpp-python": "me", "llama.cpp": "llamacpp", "vllm": "vllm", "ollama": "library",
                 "openai": "openai"}
        if server not in known:
            raise ValueError(f"server={server!r}: must be one of {sorted(known)} (or None: found from /v1/models)")
        owner = known[server]
    backend = APIBackend(conn, server_for(owner, logprobs, conn.base_url))
    backend.source = dict(base_url=base_url, model=model, api_key=api_key, logprobs=logprobs, server=server,
                          timeout=timeout, max_retries=max_retries, **client_kwargs)  # what connects again (a study)
    return backend


class APIBackend:
    """One model on one server: `generate`, `session`, `score`, and what `dl.compare` needs (`name`, `samples`)."""

    def __init__(self, connection: Connection, server: Server):
        self.connection = connection
        self.server = server
        self.vocab: dict[str, int] = {}  # token text -> id, shared by this backend's traces
        self._special_prefix: list[int] | None = None
        self.source: dict | None = None  # `connect`'s arguments, where `connect` made it

    @property
    def model(self) -> str:
        return self.connection.model

    @property
    def name(self) -> str:
        """How comparisons and traces name this backend."""
        return f"{self.model} ({self.server.name})"

    @property
    def base_url(self) -> str:
        """The server's address as traces keep it: without user:password@ or a query."""
        parts = urllib.parse.urlsplit(self.connection.base_url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rsplit("@", 1)[-1], parts.path, "", ""))

    def __repr__(self) -> str:
        return f"APIBackend({self.base_url!r}, model={self.model!r}, server={self.server.name!r})"

    def samples(self, words: dict) -> bool:
        """Whether `generate` with these words samples (then `dl.compare` runs it once per seed)."""
        return bool(words.get("do_sample", False))

    # ---- requests ---------------------------------------------------------------------------------------
    def top_k(self, record: Record | None) -> int:
        """The alternatives to ask for; a clear error, before any request, for what a server cannot give."""
        record = record or Record()
        asked = [w for w in ("attention", "lens", "logits", "prefill_attention") if getattr(record, w)]
        if asked or record.extra:
            what = ", ".join(f"{w}=True" for w in asked) or f"extra={list(record.extra)}"
            raise NotSupported(f"Record({what}): {self.name} answers with tokens and their top-k logprobs only; "
                               "attention, the logit lens and full logits need the model itself (dl.load)")
        limit = self.server.max_top_logprobs
        if limit is not None and record.top_k > limit:
            raise NotSupported(f"Record(top_k={record.top_k}): {self.server.name} returns at most {limit} alternatives "
                               f"per token (vLLM: raise it with --max-logprobs); pass Record(top_k={limit})")
        return record.top_k

    def request_words(self, words: dict, seed: int | None, max_new_tokens: int) -> tuple[dict, dict]:
        """generate's words -> (the request's parameters, the strategy as the trace records it)."""
        from transformers import GenerationConfig

        from ..engine.words import check_words

        unknown = sorted(set(words) - set(WORDS))
        if unknown:
            raise StrategyError(f"unknown strategy word(s) {unknown} for {self.name}: an API server takes "
                                f"{', '.join(WORDS)}, seed and max_new_tokens")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise StrategyError(f"seed={seed!r}: must be a whole number or None")
        check_words(GenerationConfig(), {**words, "max_new_tokens": max_new_tokens}, only_given=True)
        sample = bool(words.get("do_sample", False))
        params: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": 0.0}
        if sample:
            params.update(temperature=float(words.get("temperature", 1.0)), top_p=float(words.get("top_p", 1.0)))
        if seed is not None:
            params["seed"] = seed
        acting = {w: words[w] for w in ("top_k", "min_p") if sample and w in words}
        if "repetition_penalty" in words:
            acting["repetition_penalty"] = words["repetition_penalty"]
        extra = {}
        for word, value in acting.items():
            if word not in self.server.extra_words:
                raise StrategyError(f"{word}={value!r}: {self.server.name} takes no {word} (the OpenAI protocol has "
                                    "none): drop it, or use a server that does (llama.cpp, vLLM)")
            extra[self.server.extra_words[word]] = value
        if self.server.name in LLAMA_SERVERS:
            for word, value in NEUTRAL.items():
                extra.setdefault(self.server.extra_words[word], value)
        if extra:
            params["extra_body"] = extra
        strategy = {"do_sample": sample, **{w: v for w, v in words.items() if w != "do_sample" and (sample or w ==
                    "repetition_penalty")}, "max_new_tokens": max_new_tokens, "seed": seed}
        return params, strategy

    def describe(self, strategy: dict, params: dict, k: int, endpoint: str) -> dict:
        """The trace's strategy: generate's words, what was sent, and what the numbers mean."""
        return {**strategy, "server": self.server.name, "base_url": self.base_url, "endpoint": endpoint,
                "logprobs": self.server.logprobs, "entropy": ENTROPY_NOTE.format(k=k), "top_logprobs": k,
                "request": dict(params)}

    def messages(self, prompt: Any, chat: bool, system: str | None) -> tuple[list[dict] | None, str]:
        """(chat messages, or None for a raw text prompt; the prompt as the trace shows it)."""
        if isinstance(prompt, (list, tuple)):
            if not prompt or not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
                raise PromptError("a messages prompt must be a non-empty list of {'role': ..., 'content': ...} dicts")
            messages = [dict(m) for m in prompt]
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty: give some text (or a list of chat messages)")
            if not chat:
                if not self.server.text_prompts:
                    raise NotSupported(f"{self.server.name} has no text completions for decoderlab to use: pass "
                                       "chat=True (or a list of messages)")
                return None, prompt
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        else:
            raise PromptError(f"the prompt must be a string or a list of chat messages, not {type(prompt).__name__}")
        return messages, "\n".join(f"{m['role']}: {m['content']}" for m in messages)

    # ---- generate -----------------------------------------------------------------------------------------
    def generate(self, prompt: Any, *, chat: bool = False, system: str | None = DEFAULT_SYSTEM,
                 record: Record | None = None, progress: bool | None = None,
                 on_token: Callable[[int, str], None] | None = None, stream: bool = False, seed: int | None = None,
                 max_new_tokens: int = 20, **words: Any) -> Trace:
        """Decode on the server; the trace of its tokens and top-k logprobs.

        `stream=True` streams as the `openai` client does, calling `on_token(step, text)` as tokens come;
        the trace at the end is the same. A plain string with `chat=False` goes to `/v1/completions`.
        """
        k = self.top_k(record)
        params, strategy = self.request_words(words, seed, max_new_tokens)
        messages, shown = self.messages(prompt, chat, system)
        stream = stream or on_token is not None
        if messages is None:
            endpoint, create = "/v1/completions", self.connection.client.completions.create
            request = dict(prompt=prompt, logprobs=k)
        else:
            endpoint, create = "/v1/chat/completions", self.connection.client.chat.completions.create
            request = dict(messages=messages, logprobs=True, top_logprobs=k)
        reply = self.connection.call("generating", create, model=self.model, stream=stream, **request, **params)
        describe = self.describe(strategy, params, k, endpoint)
        chooser = "sample" if strategy["do_sample"] else "greedy"
        if stream:
            try:
                steps, finish = self._read_stream(reply, messages is None, k, on_token, progress, max_new_tokens)
                if finish is None:  # the connection closed before the server said why it stopped
                    broken = ServerFailed(f"streaming at {self.base_url} (model {self.model!r}): the stream ended "
                                          f"after {len(steps)} tokens without a finish reason (did the server stop?); "
                                          "the steps received are kept in the error's .trace")
                    broken.received = steps
                    raise broken
            except APIError as err:  # the steps received before the stream broke off are kept
                received = getattr(err, "received", None)
                if received:
                    err.trace = self._partial_trace(received, shown, chooser, describe, f"error: {type(err).__name__}")
                raise
        else:
            choice = reply.choices[0]
            steps = (completion_steps(choice.logprobs, k) if messages is None
                     else chat_steps(getattr(choice.logprobs, "content", None), k))
            finish = choice.finish_reason
            if not steps and _reply_text(choice):
                raise self._no_logprobs(endpoint)
        bad = numeric_fault(steps)
        if bad is not None:
            step, what = bad
            err = NumericError(f"step {step}: {self.name} at {self.base_url} gave the chosen token {steps[step].text!r} "
                               f"a logprob of {what}; the server's numbers went wrong (check its model file and "
                               "sampling settings). The steps before it are kept in the error's .trace",
                               step=step, processor="server")
            err.trace = self._partial_trace(steps[:step], shown, chooser, describe, "error: NumericError")
            raise err
        return self.trace_of(steps, prompt=shown, chooser=chooser, strategy=describe, stop=STOPS.get(finish, finish))

    def _read_stream(self, chunks, legacy: bool, k: int, on_token, progress, total: int) -> tuple[list, str | None]:
        """Steps and the finish reason from a streamed reply, calling `on_token` for each token as it comes."""
        import httpx
        import openai

        from .progress import progress_bar

        bar = progress_bar(total, progress)
        steps: list[TokenStep] = []
        finish, saw_text = None, False
        try:
            for chunk in chunks:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                new = (completion_steps(choice.logprobs, k) if legacy
                       else chat_steps(getattr(choice.logprobs, "content", None), k))
                saw_text = saw_text or bool(choice.text if legacy else getattr(choice.delta, "content", None))
                for step in new:
                    if on_token is not None:
                        on_token(len(steps), step.text)
                    steps.append(step)
                    if bar is not None:
                        bar.update(1)
                finish = choice.finish_reason or finish
        except (openai.APIError, httpx.HTTPError) as err:  # httpx's own: a connection cut mid-stream
            failure = (self.connection.error("streaming", err) if isinstance(err, openai.APIError) else
                       ServerFailed(f"streaming at {self.base_url} (model {self.model!r}): the stream broke off after "
                                    f"{len(steps)} tokens ({type(err).__name__}: {err}); the steps received are "
                                    "kept in the error's .trace"))
            failure.received = steps  # generate builds the partial trace from them
            raise failure from None
        finally:
            if bar is not None:
                bar.close()
        if saw_text and not steps:
            raise self._no_logprobs("the stream")
        return steps, finish

    def _no_logprobs(self, where: str) -> NoLogprobs:
        return NoLogprobs(f"{self.name} at {self.base_url} answered {where} without logprobs: the server ignores "
                          "logprobs=True (Ollama before 0.12.11 does; vLLM needs --max-logprobs >= top_k); upgrade or "
                          "configure the server")

    # ---- tokens and ids ---------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int] | None:
        """The server's token ids for `text` (special-token text read as such), without the BOS its tokenizer
        adds; None when the server has no tokenizer endpoint."""
        if self.server.tokenize is None:
            return None
        prefix = self.special_prefix()
        ids = self._tokenize_raw(text)
        return ids[len(prefix):] if ids[: len(prefix)] == prefix else ids

    def special_prefix(self) -> list[int]:
        """What the server's tokenizer puts before any text (a BOS token, or nothing)."""
        if self._special_prefix is None:
            self._special_prefix = self._tokenize_raw("") if self.server.tokenize is not None else []
        return self._special_prefix

    def _tokenize_raw(self, text: str) -> list[int]:
        path, key = self.server.tokenize
        reply = self.connection.post(path, {key: text, "model": self.model}, "tokenizing")
        return [int(i) for i in reply["tokens"]]

    def resolve(self, texts: Sequence[str]) -> dict[str, int]:
        """Token texts -> ids, the same for every trace of this backend: this model's own ids where the server has
        a tokenizer endpoint (asked once per text; a text it does not read as exactly one token gets an id from
        2**40 up), else numbers in the order texts were first seen. Returns the mapping for `texts`."""
        taken = set(self.vocab.values())
        for text in dict.fromkeys(texts):
            if text in self.vocab:
                continue
            ids = self.tokenize(text)
            if ids is None:
                i = len(self.vocab)
            elif len(ids) == 1 and ids[0] not in taken:
                i = ids[0]
            else:
                i = UNRESOLVED + sum(v >= UNRESOLVED for v in taken)
            self.vocab[text] = i
            taken.add(i)
        return {t: self.vocab[t] for t in texts}

    def trace_of(self, steps: Sequence[TokenStep], *, prompt: str, chooser: str, strategy: dict, stop: str | None,
                 forced: Sequence[int] = ()) -> Trace:
        """Steps -> a trace, token texts resolved to ids first."""
        texts = [s.text for s in steps] + [t for s in steps for t, _ in s.alternatives]
        return build(steps, vocab=self.resolve(texts), prompt=prompt, model_name=self.name, chooser=chooser,
                     strategy=strategy, stop_reason=stop, forced=forced)

    def _partial_trace(self, steps: Sequence[TokenStep], prompt: str, chooser: str, strategy: dict,
                       stop: str) -> Trace:
        """The steps received before a failure; their texts interned to ids of their own where the server can no
        longer tokenize them."""
        try:
            return self.trace_of(steps, prompt=prompt, chooser=chooser, strategy=strategy, stop=stop)
        except APIError:
            return build(steps, vocab=None, prompt=prompt, model_name=self.name, chooser=chooser,
                         strategy={**strategy, "token_ids": "interned from the text (the server was gone)"},
                         stop_reason=stop)

    # ---- score -------------------------------------------------------------------------------------------------
    def score(self, prompt: str, continuation: str, *, record: Record | None = None) -> Trace:
        """The server's logprobs of `continuation` after `prompt` (one request: echo with logprobs).

        Served where the server returns a prompt's logprobs (llama-cpp-python); elsewhere a clear error
        (llama.cpp answers "Only no echo is supported"). A trace whose steps are the given tokens.
        """
        k = self.top_k(record)
        if not self.server.echo_scores:
            raise NotSupported(f"score(): {self.server.name} does not return a prompt's logprobs (echo with "
                               "logprobs); score with dl.load on the model itself, or on llama-cpp-python's server")
        for what, text in (("prompt", prompt), ("continuation", continuation)):
            if not isinstance(text, str) or not text:
                raise PromptError(f"score(): the {what} must be non-empty text, got {text!r}")
        reply = self.connection.call("scoring", self.connection.client.completions.create, model=self.model,
                                     prompt=prompt + continuation, max_tokens=1, echo=True, logprobs=k,
                                     temperature=0.0)
        steps = self.echoed(reply.choices[0].logprobs, len(prompt), len(prompt + continuation), k)
        strategy = {"do_sample": False, "server": self.server.name, "base_url": self.base_url,
                    "endpoint": "/v1/completions (echo)", "logprobs": self.server.logprobs,
                    "entropy": ENTROPY_NOTE.format(k=k), "top_logprobs": k}
        return self.trace_of(steps, prompt=prompt, chooser="given", strategy=strategy, stop=None)

    def echoed(self, logprobs: Any, start: int, end: int, k: int) -> list[TokenStep]:
        """The echoed tokens between characters `start` and `end`, each with the distribution it came from.

        llama-cpp-python 0.3.36 pairs echoed token i with the distribution *after* it when its model adds
        no BOS token (SmolLM2); the distribution that chose token i is then entry i - 1, where the token's
        logprob is known only if it is among the top k (else NaN). With a BOS, entries are aligned.
        """
        if logprobs is None or not logprobs.tokens:
            raise self._no_logprobs("the echo")
        shifted = not self.special_prefix()  # no BOS: the misaligned case (checked against transformers)
        offsets, tokens = logprobs.text_offset, logprobs.tokens
        if start not in offsets:
            raise PromptError(f"score(): the server reads a token across the end of the prompt (characters "
                              f"{start - 5}..{start + 5}): end the prompt where a token ends (before a space)")
        steps = []
        for i, (offset, text) in enumerate(zip(offsets, tokens)):
            if offset < start or offset >= end:
                continue
            if not shifted:
                alts = completion_steps(logprobs, k, start=i)[0]
                steps.append(TokenStep(text, alts.logprob, alts.alternatives))
                continue
            top = completion_steps(logprobs, k, start=i - 1)[0].alternatives if i > 0 else []
            steps.append(TokenStep(text, dict(top).get(text), top))
        return steps

    # ---- sessions -----------------------------------------------------------------------------------------------
    def session(self, prompt: Any, *, chat: bool = False, system: str | None = DEFAULT_SYSTEM,
                record: Record | None = None, seed: int | None = None, max_new_tokens: int = 20,
                **words: Any):
        """Step through a generation on the server: `step`, `choose(rank= | token=)`, `rewind`, `fork`."""
        from .api_session import APISession

        return APISession(self, prompt, chat=chat, system=system, record=record, seed=seed,
                          max_new_tokens=max_new_tokens, **words)


def _reply_text(choice: Any) -> str:
    message = getattr(choice, "message", None)
    return (getattr(message, "content", None) if message is not None else getattr(choice, "text", None)) or ""
