"""`APISession`: step through a generation on a server, force a token, rewind and branch.

What it shares with the local `Session` is `BranchingSession`'s (the tree, the checks, the frames), so the
widgets (`dl.explore`) and a user's code drive both the same way. What differs is what holds the state: a
local session keeps a KV cache, a server keeps nothing between requests, so each step is one request for
one token that continues from everything so far.

How a request continues the text, by what the server offers:
- text (llama-cpp-python, llama.cpp, vLLM with a text prompt): `/v1/completions` on the prompt plus the
  tokens so far. The server reads that text into tokens again, so where it has a tokenizer endpoint
  every token added is checked: the server must read the new text as exactly the session's tokens, or
  the token is refused (a forced " Par" before "is" would be read back as " Paris"), so a step always
  continues from the tokens the trace shows.
- assistant prefill (chat on llama.cpp and vLLM): the chat with a trailing assistant message holding
  the tokens so far (vLLM: `continue_final_message`). Not checked token by token.
A server that offers neither (OpenAI, Ollama; chat on llama-cpp-python, whose chat handler closes a
trailing assistant turn) gets a clear error naming what to do.

A sampling session sends seed + step with each step's request, so a step rewound and taken again
draws the same token.
"""
from __future__ import annotations

import random
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ..errors import NotSupported, SessionError
from ..record import Record
from ..trace import Trace
from .api_replies import TokenStep, chat_steps, completion_steps
from .branching import BranchingSession


class ServerLike(Protocol):
    """What a session needs of its backend (`backends.api.APIBackend` is one); a Protocol, so that this module,
    which `api.py` imports, does not import it back."""

    name: str
    model: str
    server: Any
    connection: Any
    top_k: int
    vocab: Any
    _no_logprobs: Any

    def describe(self, *args: Any, **kwargs: Any) -> Any: ...
    def messages(self, *args: Any, **kwargs: Any) -> Any: ...
    def request_words(self, *args: Any, **kwargs: Any) -> Any: ...
    def resolve(self, *args: Any, **kwargs: Any) -> Any: ...
    def tokenize(self, *args: Any, **kwargs: Any) -> Any: ...
    def trace_of(self, *args: Any, **kwargs: Any) -> Any: ...

__all__ = ["APISession"]


class APISession(BranchingSession):
    """A generation on a server, stepped one request per token. Every branch is an `APISession`."""

    def __init__(self, backend: ServerLike, prompt: Any, *, chat: bool = False, system: str | None = None,
                 record: Record | None = None, seed: int | None = None, max_new_tokens: int = 20,
                 _parent: "APISession | None" = None, **words: Any):
        self.backend = backend
        if _parent is not None:
            self._copy_from(_parent)
            return
        self.k = backend.top_k(record)
        self.params, self.words = backend.request_words(words, seed, max_new_tokens)
        if self.words["do_sample"] and seed is None:
            self.words["seed"] = random.randrange(2**31)  # so that a rewound step draws the same token again
        self.messages, self.prompt_text = backend.messages(prompt, chat, system)
        self.mode = self._continuation()
        self.prompt_ids = backend.tokenize(self.prompt_text) if self.mode == "text" else None
        self.tokens: list[TokenStep] = []
        self.forced: list[int] = []
        self.ended = False  # the server stopped (EOS) after the last token
        self._next: tuple[TokenStep | None, str | None] | None = None  # the next step's reply, once asked
        self._plant()

    def _copy_from(self, other: "APISession") -> None:
        for name in ("k", "params", "words", "messages", "prompt_text", "mode", "prompt_ids", "ended", "_next"):
            setattr(self, name, getattr(other, name))
        self.tokens, self.forced = list(other.tokens), list(other.forced)
        self._graft(other)

    def _continuation(self) -> str:
        """'text' or 'prefill': how a request continues from the tokens so far (a clear error if neither)."""
        server = self.backend.server
        if self.messages is None:
            return "text"
        if server.prefill is not None:
            return "prefill"
        hint = (" pass the chat template's text as the prompt with chat=False (for the bundled model: "
                "dl.load().encode(prompt, chat=True)[1])" if server.text_prompts else "")
        raise NotSupported(f"a session on {self.backend.name} cannot continue a chat: the server takes neither "
                           f"token-id prompts nor a trailing assistant message to continue;{hint}")

    # ---- where we are ---------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Tokens generated so far on this branch."""
        return len(self.tokens)

    @property
    def done(self) -> bool:
        """Whether the server stopped (EOS) after the last token."""
        return self.ended

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def _describe(self) -> str:
        return f"{self.backend.name!r}, {super()._describe()}"

    def _build_trace(self) -> Trace:
        sampled = "sample" if self.words["do_sample"] else "greedy"
        how = {"text": "text completion of the prompt and the tokens so far" + (
                   ", each token checked against the server's tokenizer" if self.prompt_ids is not None else ""),
               "prefill": "chat with a trailing assistant message holding the tokens so far"}[self.mode]
        strategy = self.backend.describe(self.words, self._request(), self.k, self._endpoint())
        strategy["continuation"] = how
        trace = self.backend.trace_of(self.tokens, prompt=self.prompt_text, chooser=sampled, strategy=strategy,
                                      stop="eos" if self.ended else None, forced=self.forced)
        trace.branch, trace.parent, trace.fork_step = self.branch, self.parent, self.fork_step
        return trace

    def candidates(self, k: int | None = None) -> pd.DataFrame:
        """The next step's top-k tokens (raw probabilities; the server tells no final ones), before anything is
        chosen. Asks the server once; the step that follows uses the same reply."""
        step, _ = self._ask()
        alts = (step.alternatives if step is not None else [])[: k or self.k]
        vocab = self.backend.resolve([t for t, _ in alts])
        return pd.DataFrame({"step": self.steps, "rank": range(len(alts)), "token_id": [vocab[t] for t, _ in alts],
                             "token": [t for t, _ in alts], "logit": np.nan,
                             "prob": [float(np.exp(lp)) for _, lp in alts], "final_prob": np.nan})

    # ---- asking the server ------------------------------------------------------------------------------------
    def _endpoint(self) -> str:
        return "/v1/completions" if self.mode == "text" else "/v1/chat/completions"

    def _request(self) -> dict:
        """This step's request words: one token, the session's words, seed + step when sampling."""
        params = {**self.params, "max_tokens": 1}
        if self.words["do_sample"]:
            params["seed"] = int(self.words["seed"]) + self.steps
        return params

    def _ask(self) -> tuple[TokenStep | None, str | None]:
        """The next step's reply (the token the server chose and its alternatives; None when it stopped)."""
        if self._next is not None:
            return self._next
        conn, backend = self.backend.connection, self.backend
        params = self._request()
        if self.mode == "text":
            reply = conn.call("stepping", conn.client.completions.create, model=backend.model,
                              prompt=self.prompt_text + self.text, logprobs=self.k, **params)
            choice = reply.choices[0]
            steps = completion_steps(choice.logprobs, self.k)
        else:
            extra = {**params.pop("extra_body", {}), **backend.server.prefill}
            messages = list(self.messages) + ([{"role": "assistant", "content": self.text}] if self.tokens else [])
            reply = conn.call("stepping", conn.client.chat.completions.create, model=backend.model,
                              messages=messages, logprobs=True, top_logprobs=self.k, extra_body=extra, **params)
            choice = reply.choices[0]
            steps = chat_steps(getattr(choice.logprobs, "content", None), self.k)
        if not steps and choice.finish_reason != "stop":
            raise backend._no_logprobs("a step")
        self._next = (steps[0] if steps else None, choice.finish_reason)
        return self._next

    def _add(self, step: TokenStep, forced: bool) -> None:
        """Append a token, after checking that the server will read the text back as these very tokens."""
        if self.prompt_ids is not None:
            vocab = self.backend.resolve([t.text for t in self.tokens] + [step.text])
            want = self.prompt_ids + [vocab[t.text] for t in self.tokens] + [vocab[step.text]]
            got = self.backend.tokenize(self.prompt_text + self.text + step.text)
            if got != want:
                at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                raise SessionError(
                    f"after {step.text!r} at step {self.steps} the server would read the text as other tokens (from "
                    f"position {at}: ids {got[at:at + 3]} instead of {want[at:at + 3]}), and {self.backend.server.name} "
                    "takes no token ids: the next step would not continue from these tokens. Choose another token, "
                    "or rewind")
        if forced:
            self.forced.append(self.steps)
        self.tokens.append(step)
        self._next = None
        self._trace = None

    # ---- moving -----------------------------------------------------------------------------------------------
    def _step(self, n: int) -> None:
        for _ in range(n):
            if self.ended:
                break
            step, finish = self._ask()
            if step is None:
                self.ended, self._trace = finish == "stop", None
                break
            self._add(step, forced=False)

    def _run(self) -> None:
        while not self.ended and self.steps < self.words["max_new_tokens"]:
            self._step(1)

    def _choose(self, rank: int | None, token: str | int | None) -> None:
        """`token` is its text, or an id this session has seen. Text is looked up among the alternatives, then
        with a leading space, then read by the server's tokenizer, which must read it as one token. Recorded
        with the server's logprob where the token is among the alternatives (else NA: the server did not say)."""
        step, _ = self._ask()
        alts = step.alternatives if step is not None else []
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(alts):
                raise SessionError(f"rank={rank!r}: must be a whole number in [0, {len(alts)}) (the server gave "
                                   f"{len(alts)} alternatives)")
            text = alts[rank][0]
        else:
            text = self._token_text(token, alts)
        self._add(TokenStep(text, dict(alts).get(text), list(alts)), forced=True)

    def _token_text(self, token: str | int, alts: list[tuple[str, float]]) -> str:
        if isinstance(token, int) and not isinstance(token, bool):
            texts = [t for t, i in self.backend.vocab.items() if i == token]
            if not texts:
                raise SessionError(f"token id {token} is not one this session has seen: pass the token's text")
            return texts[0]
        if not isinstance(token, str) or not token:
            raise SessionError(f"token={token!r}: give a non-empty string or a token id")
        texts = [t for t, _ in alts]
        for text in (token, " " + token) if not token[0].isspace() else (token,):
            if text in texts:
                return text
        ids = self.backend.tokenize(token)
        if ids is not None and len(ids) != 1:
            raise SessionError(f"{token!r} is {len(ids)} tokens for {self.backend.name} ({ids}), not one: choose one "
                               "of them")
        return token

    def _rewind(self, to: int) -> None:
        if to == self.steps and not self.ended:
            return
        del self.tokens[to:]
        self.forced = [s for s in self.forced if s < to]
        self.ended, self._next, self._trace = False, None, None

    def _child(self) -> "APISession":
        return APISession(self.backend, None, _parent=self)
