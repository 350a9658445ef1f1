"""Talking to an OpenAI-compatible server: the official `openai` client, its retries, and clear errors.

Why a module of its own: everything that can go wrong on the wire (a server that is not running, a
timeout, a refused key, a model name the server does not serve, 429 and 5xx) is turned here, once,
into a decoderlab error that names the server and says what to do. The `openai` client does the
retrying: for 429, 5xx and dropped connections it backs off exponentially (honouring `retry-after`),
at most `max_retries` times, so decoderlab adds no retry loop of its own.

Which server it is decides what its numbers mean (see `SERVERS`): `/v1/models` names the owner
(`llamacpp`, `vllm`, `library` for Ollama, `openai`/`system` for OpenAI; llama-cpp-python says `me`).

The API key lives only inside the `openai` client: never in a repr, an error message or a trace.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ..errors import (APIError, AuthenticationFailed, MissingExtraError, RateLimited, RequestRefused, ServerFailed,
                     ServerTimeout, ServerUnreachable, UnknownModel)

__all__ = ["Server", "SERVERS", "server_for", "Connection"]


@dataclass(frozen=True)
class Server:
    """What a kind of server gives, and what its logprobs mean."""

    name: str
    logprobs: str  # what the returned logprobs are, in words (the trace says it)
    max_top_logprobs: int | None = None  # None: no limit known
    extra_words: dict = field(default_factory=dict)  # generate's word -> the server's own (sent in extra_body)
    tokenize: tuple[str, str] | None = None  # (endpoint, the body's text word) that gives this model's token ids
    text_prompts: bool = True  # /v1/completions with a text prompt (special tokens read as such)
    prefill: dict | None = None  # extra_body that continues a trailing assistant message; None: cannot
    echo_scores: bool = False  # /v1/completions with echo=True and logprobs scores a given text


LLAMA_WORDS = {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repeat_penalty"}
SERVERS: dict[str, Server] = {s.name: s for s in [
    Server("llama-cpp-python", "raw log-softmax (llama-cpp-python: before temperature and the sampler; tokens with "
           "equal text merge in the alternatives)", None, LLAMA_WORDS, tokenize=("/extras/tokenize", "input"), echo_scores=True),
    Server("llama.cpp", "raw softmax (llama.cpp's chat logprobs: before the sampler chain)", None, LLAMA_WORDS,
           tokenize=("/tokenize", "content"), prefill={}),
    Server("vllm-raw", "raw (vLLM --logprobs-mode raw_logprobs, declared by dl.connect(logprobs='raw'))", 20,
           {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}, tokenize=("/tokenize", "prompt"),
           prefill={"continue_final_message": True, "add_generation_prompt": False}),
    Server("vllm-processed", "processed (vLLM --logprobs-mode processed_logprobs, declared by "
           "dl.connect(logprobs='processed'): after temperature, penalties and top-k/top-p)", 20,
           {"top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty"}, tokenize=("/tokenize", "prompt"),
           prefill={"continue_final_message": True, "add_generation_prompt": False}),
    Server("ollama", "unknown (Ollama: computation point undocumented)", 20, text_prompts=False),
    Server("openai", "unknown (OpenAI: computation point undocumented)", 20, text_prompts=False),
    Server("unknown", "unknown (an OpenAI-compatible server decoderlab does not know)", None, text_prompts=False),
]}
OWNERS = {"me": "llama-cpp-python", "llamacpp": "llama.cpp", "vllm": "vllm", "library": "ollama", "ollama": "ollama",
          "openai": "openai", "system": "openai", "openai-internal": "openai"}


def server_for(owner: str | None, declared: str | None, base_url: str) -> Server:
    """The server kind from `/v1/models`' owner and the user's `logprobs=` declaration."""
    name = OWNERS.get(owner or "", "unknown")
    if "api.openai.com" in base_url:
        name = "openai"
    if name == "vllm":
        name = "vllm-processed" if declared == "processed" else "vllm-raw"
    server = SERVERS[name]
    if declared is not None and name not in ("vllm-raw", "vllm-processed"):
        what = {"raw": "raw log-softmax", "processed": "processed (after the sampler)"}[declared]
        server = replace(server, logprobs=f"{what} (declared by dl.connect(logprobs={declared!r}))")
    return server


class Connection:
    """One server and model behind the official `openai` client; every call goes through `call`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 60.0,
                 max_retries: int = 2, **client_kwargs: Any):
        try:
            from openai import OpenAI
        except ImportError:
            raise MissingExtraError("dl.connect talks to servers through the official `openai` client, which is not "
                                    "installed: pip install 'decoderlab[api]' (or pip install openai)") from None

        self.base_url = str(base_url).rstrip("/")
        self.model = model
        key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"  # local servers ignore it
        self.client = OpenAI(base_url=self.base_url, api_key=key, timeout=timeout, max_retries=max_retries,
                             **client_kwargs)
        self.timeout, self.max_retries = timeout, max_retries

    def __repr__(self) -> str:
        return f"Connection({self.base_url!r}, model={self.model!r})"

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        """`fn(**kwargs)` (an `openai` client method), its failures as decoderlab errors naming `what`."""
        import openai

        try:
            return fn(**kwargs)
        except openai.APIError as err:
            raise self.error(what, err) from None

    def post(self, path: str, body: dict, what: str) -> Any:
        """A POST to an endpoint the `openai` client has no method for (a server's tokenizer), as JSON."""
        return self.call(what, self.client.post, path=_relative(self.base_url, path), body=body, cast_to=object)

    def owner(self) -> str | None:
        """Who `/v1/models` says owns the model; an `UnknownModel` error when it is not served."""
        models = self.call("listing the models", self.client.models.list)
        served = {m.id: getattr(m, "owned_by", None) for m in models.data}
        if self.model not in served:
            raise UnknownModel(f"{self.base_url} does not serve a model named {self.model!r}; it serves "
                               f"{sorted(served)}: pass one of them as model=")
        return served[self.model]

    def error(self, what: str, err: Exception) -> APIError:
        """An `openai` exception as the decoderlab error that says what to do."""
        import openai

        where = f"{what} at {self.base_url} (model {self.model!r})"
        retried = f" after {self.max_retries} retries with backoff" if self.max_retries else ""
        if isinstance(err, openai.APITimeoutError):
            return ServerTimeout(f"{where}: no answer within {self.timeout:g} s{retried}; the server may be busy or "
                                 "the request too long: pass a larger timeout= to dl.connect")
        if isinstance(err, openai.APIConnectionError):
            return ServerUnreachable(f"{where}: cannot connect ({_cause(err)}){retried}; is the server running and "
                                     "is base_url right (it usually ends in /v1)?")
        status = getattr(err, "status_code", None)
        said = _server_message(err)
        if status in (401, 403):
            return AuthenticationFailed(f"{where}: the server refused the API key ({status}: {said}); pass api_key= "
                                        "to dl.connect or set OPENAI_API_KEY")
        if status == 404:
            return UnknownModel(f"{where}: not found (404: {said}); check model= (the server's /v1/models lists "
                                "what it serves) and base_url=")
        if status == 429:
            return RateLimited(f"{where}: rate limited (429: {said}){retried}, each waiting as retry-after asked; "
                               "wait and try again, or pass max_retries= to dl.connect")
        if status is not None and status >= 500:
            return ServerFailed(f"{where}: the server failed ({status}: {said}){retried}; see the server's log")
        if status in (400, 422):
            return RequestRefused(f"{where}: the server refused the request ({status}: {said})")
        return APIError(f"{where}: {type(err).__name__}: {said}")


def _relative(base_url: str, path: str) -> str:
    """An endpoint outside the /v1 prefix (`/extras/tokenize`, `/tokenize`) as a full URL."""
    root = base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url
    return root + path


def _cause(err: Exception) -> str:
    cause = err.__cause__ or err.__context__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def _server_message(err: Exception) -> str:
    """What the server said, cut short (never the request: it carries no key, but it may be long)."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        said = inner.get("message", inner) if isinstance(inner, dict) else inner
    else:
        said = getattr(err, "message", None) or str(err)
    text = str(said)
    return text if len(text) <= 300 else text[:300] + "…"
