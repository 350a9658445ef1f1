"""Models behind an OpenAI-compatible API, tested against a real llama.cpp server (llama-cpp-python's, started here
on the bundled SmolLM2 GGUF) and against transformers on the same file.

What is checked against what: the server's own answers (a one-shot generation against the same tokens stepped
one request at a time, streamed against not streamed, sampling with top_k=1 against greedy, the server's
tokenizer against the session's ids), and transformers on the de-quantised weights (the cross-engine
comparison, with the tolerance measured here and explained in docs/api.md). Protocol failures a llama.cpp
server never produces (429, 5xx, a timeout, a reply without logprobs) are served by a small real HTTP server
in this file, through the real `openai` client. A server that cannot be built or started fails these tests.
"""
from __future__ import annotations

import http.server
import json
import logging
import math
import threading
import time

import numpy as np
import pandas as pd
import pytest

import decoderlab as dl
from decoderlab.backends import api_client
from decoderlab import cli
from decoderlab import errors
from decoderlab.backends.api import APIBackend
from decoderlab.backends.api_client import Connection

from api_server import free_port, start

pytestmark = [pytest.mark.integration, pytest.mark.server]

SECRET = "sk-decoderlab-test-SECRET-5a7c"
QUESTION = "What is the capital of France?"
PROMPTS = [QUESTION, "Write one sentence about the sea.", "Name three primary colours."]


@pytest.fixture(scope="session")
def server():
    s = start("smollm2")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def api(server):
    return dl.connect(base_url=server.base_url, model=server.model)


@pytest.fixture(scope="session")
def chat_prompt(smol):
    """The bundled model's chat template as text (llama-cpp-python continues text, not a chat)."""
    return smol.encode(QUESTION, chat=True)[1]


# ---- generate ---------------------------------------------------------------------------------------------------
def test_generate_chat_greedy(api):
    trace = api.generate(QUESTION, chat=True, max_new_tokens=16)
    assert trace.text == "The capital of France is Paris."
    assert trace.stop_reason == "eos" and trace.chooser == "greedy"
    steps, cands = trace.steps, trace.candidates
    assert (steps["rank"] == 0).all()  # greedy: the chosen token is the most likely alternative
    top = cands[cands["rank"] == 0].set_index("step")
    assert np.allclose(top.loc[steps.step, "prob"].to_numpy(), steps.prob.to_numpy(), rtol=1e-6)
    assert cands.groupby("step").size().eq(20).all()  # Record's default top_k, sorted, unique texts
    assert (cands.groupby("step")["prob"].apply(lambda p: bool((np.diff(p.to_numpy()) <= 0).all()))).all()
    assert trace.strategy["request"]["temperature"] == 0.0
    assert trace.strategy["request"]["extra_body"] == {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


def test_token_ids_are_the_models(api, smol):
    """Texts are resolved by the server's tokenizer: the ids are SmolLM2's, as transformers numbers them."""
    trace = api.generate(QUESTION, chat=True, max_new_tokens=8)
    local = smol.generate(QUESTION, chat=True, max_new_tokens=8, progress=False)
    assert local.token_ids == trace.token_ids + [2]  # the server does not return the EOS token it stopped at
    cands = trace.candidates
    assert [smol.token_text(i) for i in cands.token_id] == cands.token.tolist()


def test_what_the_numbers_mean_is_said(api):
    trace = api.generate(QUESTION, chat=True, max_new_tokens=6)
    meaning = trace.strategy["logprobs"]
    assert meaning.startswith("raw log-softmax (llama-cpp-python")
    assert meaning in repr(trace)
    assert meaning in trace.to_html() or meaning.replace("'", "&#x27;") in trace.to_html()
    assert "lower bound from the top 20" in trace.strategy["entropy"]
    assert trace.steps.final_prob.isna().all()  # the server says nothing of its sampler's distribution


def test_entropy_is_the_top_k_lower_bound_and_the_missing_mass_is_kept(api):
    trace = api.generate("Write one sentence about the sea.", chat=True, max_new_tokens=8, record=dl.Record(top_k=5))
    missing = trace.array("top_k_missing_mass")[:, 0]
    for step, group in trace.candidates.groupby("step"):
        p = group.prob.to_numpy()
        rest = max(0.0, 1 - p.sum())
        assert missing[step] == pytest.approx(rest, abs=1e-6)
        bound = -(p * np.log(p)).sum() - (rest * math.log(rest) if rest > 0 else 0)
        assert trace.steps.entropy[step] == pytest.approx(bound, rel=1e-5)


@pytest.mark.parametrize("chat", [True, False])
def test_stream_gives_the_same_trace(api, chat):
    prompt = QUESTION if chat else "The capital of France is"
    api.generate(prompt, chat=chat, max_new_tokens=12)  # the server's cache as it will be for both requests below
    plain = api.generate(prompt, chat=chat, max_new_tokens=12)
    seen: list[tuple[int, str]] = []
    streamed = api.generate(prompt, chat=chat, max_new_tokens=12, stream=True, on_token=lambda s, t: seen.append((s, t)))
    assert seen == list(enumerate(plain.tokens))
    assert streamed.tokens == plain.tokens and streamed.stop_reason == plain.stop_reason
    assert streamed.steps.equals(plain.steps) and streamed.candidates.equals(plain.candidates)


def test_the_servers_numbers_depend_on_its_cache(api, chat_prompt):
    """llama-cpp-python reuses the KV cache of the previous request's common prefix: a prompt evaluated in one
    batch and one whose last token is evaluated alone after a cached prefix give different logits (docs/api.md
    states this, and the cross-engine tolerance allows for it)."""
    api.generate("Unrelated text to clear the cache", max_new_tokens=1)
    batch = api.generate(chat_prompt, max_new_tokens=12)  # the prompt evaluated as one batch
    again = api.generate(chat_prompt, max_new_tokens=12)  # its last token evaluated alone after a cached prefix
    assert batch.tokens == again.tokens
    gap = abs(batch.steps.logprob[0] - again.steps.logprob[0])
    assert 0 < gap < 0.2, gap


def test_sampling_words_reach_the_server(api):
    greedy = api.generate("Once upon a time", max_new_tokens=12)
    one = api.generate("Once upon a time", max_new_tokens=12, do_sample=True, top_k=1, seed=3)  # top_k=1 is greedy
    assert one.tokens == greedy.tokens and one.chooser == "sample"
    a = api.generate("Once upon a time", max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    b = api.generate("Once upon a time", max_new_tokens=12, do_sample=True, temperature=1.5, seed=7)
    assert a.tokens == b.tokens  # the server's seed
    assert a.strategy["request"]["temperature"] == 1.5 and a.strategy["seed"] == 7
    assert api.samples({"do_sample": True}) and not api.samples({})


def test_bad_words_and_records_are_refused_before_any_request():
    dead = Connection(f"http://127.0.0.1:{free_port()}/v1", "smollm2", max_retries=0)  # nothing listens there
    api = APIBackend(dead, api_client.SERVERS["llama-cpp-python"])
    for record in (dl.Record(attention=True), dl.Record(lens=True), dl.Record(logits=True)):
        with pytest.raises(errors.NotSupported, match="top-k logprobs only"):
            api.generate(QUESTION, chat=True, record=record)
    with pytest.raises(dl.StrategyError, match="num_beams"):
        api.generate(QUESTION, num_beams=4)
    with pytest.raises(dl.StrategyError, match="top_p"):
        api.generate(QUESTION, do_sample=True, top_p=1.5)
    openai_like = APIBackend(dead, api_client.SERVERS["openai"])
    with pytest.raises(dl.StrategyError, match="takes no top_k"):
        openai_like.generate(QUESTION, chat=True, do_sample=True, top_k=5)
    with pytest.raises(errors.NotSupported, match="at most 20"):
        openai_like.generate(QUESTION, chat=True, record=dl.Record(top_k=50))
    with pytest.raises(errors.NotSupported, match="chat=True"):
        openai_like.generate(QUESTION)  # no text completions there
    with pytest.raises(errors.NotSupported, match="prompt's logprobs"):
        openai_like.score("The capital of France is", " Paris")


# ---- sessions ---------------------------------------------------------------------------------------------------
def test_session_steps_match_generate(api, chat_prompt):
    """One request per token gives what one request for all of them gives, number for number, when the server's
    cache starts the same (see test_the_servers_numbers_depend_on_its_cache)."""
    api.generate("Unrelated text to clear the cache", max_new_tokens=1)
    whole = api.generate(chat_prompt, max_new_tokens=10)
    api.generate("Unrelated text to clear the cache", max_new_tokens=1)
    s = api.session(chat_prompt, max_new_tokens=10)
    rows = s.step(4)
    assert rows.token.tolist() == whole.tokens[:4]
    s.run()
    assert s.trace.tokens == whole.tokens and s.done == (whole.stop_reason == "eos")
    assert np.allclose(s.trace.steps.logprob, whole.steps.logprob, atol=1e-6, rtol=0)
    assert s.trace.candidates.drop(columns="branch").equals(whole.candidates.drop(columns="branch"))
    assert list(s.trace.steps.columns) == list(whole.steps.columns)


def test_session_forced_token_continues_from_it(api, chat_prompt, smol):
    s = api.session(chat_prompt, max_new_tokens=12)
    s.step(4)  # "The capital of France"
    cands = s.candidates(5)
    row = s.choose(rank=1).iloc[0]
    assert row.forced and row.token == cands.token[1] and row.prob == pytest.approx(cands.prob[1])
    after = s.step(3)
    # the next tokens are what the server gives for that very text, in one request
    direct = api.generate(chat_prompt + "".join(s.trace.tokens[:5]), max_new_tokens=3)
    assert after.token.tolist() == direct.tokens
    s.rewind(4)
    assert " Lyon" not in s.candidates(20).token.tolist()
    forced = s.choose(token=" Lyon").iloc[0]  # not among the alternatives: read by the server's tokenizer
    assert forced.token == " Lyon" and int(forced.token_id) == 38034  # SmolLM2's id, as transformers has it
    assert math.isnan(forced.prob)  # the server did not say how likely it was
    local = smol.session(QUESTION, chat=True)
    local.step(4)
    assert list(local.choose(token=forced.token).columns) == list(s.trace.steps.columns)  # the same frames


def test_session_refuses_a_token_the_server_would_read_otherwise(api):
    s = api.session("The capital of France is", max_new_tokens=8)
    s.choose(token=" Par")
    with pytest.raises(dl.SessionError, match="read the text as other tokens"):
        s.choose(token="is")  # " Par" + "is" reads back as " Paris"
    assert s.steps == 1 and s.trace.tokens == [" Par"]


def test_session_rewind_fork_and_tree(api):
    s = api.session("Once upon a time", max_new_tokens=8, do_sample=True, seed=11)
    first = s.step(5).token.tolist()
    s.rewind(2)
    assert s.step(3).token.tolist() == first[2:]  # seed + step: the same draws again
    b = s.fork(at=3)
    b.choose(rank=2)
    assert s.trace.tokens == first and b.trace.tokens[:3] == first[:3]
    tree = s.tree
    assert tree.branch.tolist() == [0, 1] and tree.fork_step.isna().tolist() == [True, False]
    assert int(tree.fork_step[1]) == 3 and tree.steps.tolist() == [5, 4]
    assert b.trace.fork_step == 3 and b.trace.parent == 0
    assert b.trace.steps.forced.tolist() == [False, False, False, True]
    assert s.branch_of(1) is b
    explorer = dl.explore(b)  # the session explorer drives an API session as it drives a local one
    explorer.next()
    second = int(b.candidates(3).token_id[1])
    explorer.force(second)
    assert b.steps == 6 and b.trace.steps.forced.tolist()[-1] and b.trace.token_ids[-1] == second
    # the candidate buttons show the server's raw probability where it gives no final one (never "nan")
    cands = b.candidates(explorer.k)
    labels = [w.description for w in explorer.candidates.children]
    assert labels and not any("nan" in label for label in labels)
    assert [float(label.split()[-1]) for label in labels] == pytest.approx(cands.prob.tolist(), abs=0.0006)


def test_session_on_a_chat_is_refused_clearly(api):
    with pytest.raises(errors.NotSupported, match="cannot continue a chat"):
        api.session(QUESTION, chat=True)


# ---- score ------------------------------------------------------------------------------------------------------
def test_score_matches_transformers(api, smol):
    """The echo is re-aligned (llama-cpp-python pairs a token with the next position's distribution when the model
    adds no BOS); the result matches transformers within the cross-engine tolerance, and a token outside the
    server's top k has NA (here " little", rank 20 in transformers), never a number from the wrong position."""
    for prompt, cont in (("The capital of France is", " Paris. It is a city"),
                         ("Once upon a time", " there was a little girl who lived in a village")):
        served, local = api.score(prompt, cont), smol.score(prompt, cont)
        assert served.tokens == local.tokens and served.chooser == "given"
        known = served.steps.logprob.notna().to_numpy()
        assert (local.steps["rank"].to_numpy()[~known] >= 20).all()
        diff = np.abs(served.steps.logprob.to_numpy() - local.steps.logprob.to_numpy())[known]
        assert known.sum() >= len(known) - 1 and diff.max() < 0.25 and diff.mean() < 0.1, diff


# ---- views and files --------------------------------------------------------------------------------------------
def test_views_and_files_work_on_api_traces(api, tmp_path):
    from decoderlab import plots

    trace = api.generate(QUESTION, chat=True, max_new_tokens=10)
    loaded = dl.Trace.load(trace.save(tmp_path / "api.parquet"))
    assert loaded.steps.drop(columns="why").equals(trace.steps.drop(columns="why"))
    assert loaded.candidates.equals(trace.candidates) and loaded.strategy == trace.strategy
    assert np.array_equal(loaded.array("top_k_missing_mass"), trace.array("top_k_missing_mass"))
    page = trace.to_html(tmp_path / "api.html")
    assert "Paris" in page and "llama-cpp-python" in page
    view = dl.show(trace)
    assert view is not None
    plots.probability_timeline(trace)
    plots.distribution(trace, 2)
    with pytest.raises(ValueError, match="no attention"):
        trace.attention_weights(0)


def test_cli_against_the_server(server, capsys):
    code = cli.main(["--base-url", server.base_url, "--model", server.model, QUESTION, "--chat",
                     "--max-new-tokens", "12"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("The capital of France is Paris.")
    assert "raw log-softmax (llama-cpp-python" in out
    assert "step" in out and "' Paris'" in out


# ---- errors -----------------------------------------------------------------------------------------------------
def test_a_stopped_server_and_a_wrong_model(server):
    with pytest.raises(errors.UnknownModel, match="serves \\['smollm2'\\]"):
        dl.connect(base_url=server.base_url, model="gpt-5")
    port = free_port()
    t0 = time.perf_counter()
    with pytest.raises(errors.ServerUnreachable, match=f"127.0.0.1:{port}.*is the server running"):
        dl.connect(base_url=f"http://127.0.0.1:{port}/v1", model="smollm2", max_retries=1)
    assert time.perf_counter() - t0 < 10  # bounded retries


def test_a_refused_key_and_the_key_never_shows(tmp_path, caplog):
    guarded = start("smollm2", api_key=SECRET)
    try:
        with pytest.raises(errors.AuthenticationFailed, match="OPENAI_API_KEY") as refused:
            dl.connect(base_url=guarded.base_url, model="smollm2", api_key="sk-wrong-key")
        assert "sk-wrong-key" not in str(refused.value)
        caplog.set_level(logging.DEBUG)
        api = dl.connect(base_url=guarded.base_url, model="smollm2", api_key=SECRET)
        trace = api.generate(QUESTION, chat=True, max_new_tokens=4)
        session = api.session("Once upon a time", max_new_tokens=3)
        session.step(2)
        shown = [repr(api), repr(api.connection), repr(trace), repr(session), caplog.text, trace.to_html(),
                 json.dumps(trace.strategy), (trace.save(tmp_path / "t.parquet")).read_bytes().decode("latin-1")]
        assert trace.num_steps == 4
        assert not [s for s in shown if SECRET in s]
    finally:
        guarded.stop()


class Scripted(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that answers what a test scripts: for what llama.cpp never answers (429, 5xx, ...)."""

    script: list = []
    posts: list = []

    def log_message(self, *args):  # quiet
        pass

    def _send(self, status: int, body, headers: dict | None = None) -> None:
        headers = dict(headers or {})
        if headers.pop("stream", None):  # a list of chunks, sent as server-sent events
            data = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in body).encode() + b"data: [DONE]\n\n"
            kind = "text/event-stream"
        else:
            data, kind = json.dumps(body).encode(), "application/json"
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "openai"}]})

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        Scripted.posts.append(time.perf_counter())
        status, body, headers, delay = Scripted.script.pop(0) if len(Scripted.script) > 1 else Scripted.script[0]
        time.sleep(delay)
        try:
            self._send(status, body, headers)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (the timeout test)
            pass


def chat_reply(tokens: list[tuple[str, float, list]], logprobs: bool = True) -> dict:
    content = [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in top]}
               for t, lp, top in tokens]
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "stub",
            "choices": [{"index": 0, "finish_reason": "length",
                         "message": {"role": "assistant", "content": "".join(t for t, _, _ in tokens)},
                         "logprobs": {"content": content} if logprobs else None}]}


# vLLM's order: the sampled token first, then the top k (which may hold it again)
VLLM_LIKE = [(" sea", -1.2, [(" sea", -1.2), (" ocean", -0.5), (" sea", -1.2), (" waves", -2.0)]),
             (" is", -0.1, [(" is", -0.1), (" was", -2.5)])]


@pytest.fixture
def scripted():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Scripted.posts = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_429_honours_retry_after_and_replies_are_reordered(scripted):
    Scripted.script = [(429, {"error": {"message": "slow down"}}, {"retry-after": "1"}, 0),
                       (200, chat_reply(VLLM_LIKE), {}, 0)]
    api = dl.connect(base_url=scripted, model="stub", max_retries=2)
    trace = api.generate("hi", chat=True, max_new_tokens=2, record=dl.Record(top_k=3))
    assert len(Scripted.posts) == 2 and Scripted.posts[1] - Scripted.posts[0] >= 0.95
    step0 = trace.candidates[trace.candidates.step == 0]
    assert step0.token.tolist() == [" ocean", " sea", " waves"]  # re-sorted, de-duplicated
    assert trace.steps["rank"].tolist() == [1, 0]
    assert "unknown (OpenAI" in trace.strategy["logprobs"]


def test_429_and_5xx_give_up_after_bounded_retries(scripted):
    Scripted.script = [(429, {"error": {"message": "slow down"}}, {"retry-after": "0"}, 0)]
    api = dl.connect(base_url=scripted, model="stub", max_retries=1)
    with pytest.raises(errors.RateLimited, match="after 1 retries"):
        api.generate("hi", chat=True)
    assert len(Scripted.posts) == 2
    Scripted.posts = []
    Scripted.script = [(503, {"error": {"message": "overloaded"}}, {}, 0)]
    with pytest.raises(errors.ServerFailed, match="503: overloaded"):
        dl.connect(base_url=scripted, model="stub", max_retries=2).generate("hi", chat=True)
    assert len(Scripted.posts) == 3


def test_timeout_and_a_reply_without_logprobs(scripted):
    Scripted.script = [(200, chat_reply(VLLM_LIKE), {}, 2.0)]
    with pytest.raises(errors.ServerTimeout, match="timeout="):
        dl.connect(base_url=scripted, model="stub", timeout=0.5, max_retries=0).generate("hi", chat=True)
    Scripted.script = [(200, chat_reply(VLLM_LIKE, logprobs=False), {}, 0)]
    with pytest.raises(errors.NoLogprobs, match="without logprobs"):
        dl.connect(base_url=scripted, model="stub").generate("hi", chat=True)


@pytest.mark.parametrize("stream", [False, True])
def test_a_logprob_that_cannot_be_stops_with_the_steps_before(scripted, stream):
    """A server that gives the chosen token a NaN logprob (JSON's NaN, which Python's json reads): a NumericError
    naming the step and the server, with the steps before it in .trace (streamed or not)."""
    tokens = [(" sea", -1.2, [(" sea", -1.2)]), (" is", -0.1, [(" is", -0.1)]), (" calm", float("nan"), [])]
    if stream:
        chunks = [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                   "choices": [{"index": 0, "delta": {"content": t}, "finish_reason": None,
                                "logprobs": chat_reply([(t, lp, top)])["choices"][0]["logprobs"]}]}
                  for t, lp, top in tokens]
        chunks[-1]["choices"][0]["finish_reason"] = "length"
        Scripted.script = [(200, chunks, {"stream": "1"}, 0)]
    else:
        Scripted.script = [(200, chat_reply(tokens), {}, 0)]
    with pytest.raises(dl.NumericError, match="step 2: .* logprob of NaN") as caught:
        dl.connect(base_url=scripted, model="stub").generate("hi", chat=True, max_new_tokens=3, stream=stream)
    assert caught.value.step == 2 and caught.value.processor == "server"
    assert caught.value.trace.tokens == [" sea", " is"]


# ---- two engines, one file --------------------------------------------------------------------------------------
def cross_engine_report(cmp, first_steps: int = 8) -> tuple[list[dict], dict]:
    """Per prompt: where the engines' greedy tokens first differ, and each engine's gap there (its logprob of its
    own token minus of the other's); over the first `first_steps` steps both engines took the same path: top-5
    agreement and the differences of the probabilities both list."""
    per_prompt, same_set, overlap, dprob, dlogprob, dchosen = [], [], [], [], [], []
    for prompt in cmp.prompts:
        t, l = (cmp.trace("greedy", prompt=prompt, model=m) for m in ("transformers", "llama.cpp"))
        first = next((k for k, (a, b) in enumerate(zip(t.tokens, l.tokens)) if a != b), None)
        row = {"prompt": prompt, "first_divergence": first, "steps": min(t.num_steps, l.num_steps)}
        if first is not None:
            for name, tr, own, other in (("transformers", t, t.tokens[first], l.tokens[first]),
                                         ("llama.cpp", l, l.tokens[first], t.tokens[first])):
                c = tr.candidates[tr.candidates.step == first].set_index("token")["prob"]
                c = c[~c.index.duplicated()]  # texts a tokenizer has twice (pieces of a character): the likelier
                row[f"{name}_tokens"] = (own, other)
                row[f"{name}_gap"] = float(np.log(c[own]) - np.log(c[other])) if other in c else float("inf")
        per_prompt.append(row)
        shared = first if first is not None else row["steps"]
        n = min(shared, first_steps)
        dchosen += list(np.abs(t.steps.logprob[:n].to_numpy() - l.steps.logprob[:n].to_numpy()))
        for step in range(min(shared, first_steps)):
            ct, cl = (tr.candidates[tr.candidates.step == step].set_index("token")["prob"] for tr in (t, l))
            ct, cl = ct[~ct.index.duplicated()], cl[~cl.index.duplicated()]
            top_t, top_l = set(ct.index[:5]), set(cl.index[:5])
            same_set.append(top_t == top_l)
            overlap.append(len(top_t & top_l) / 5)
            both = sorted(top_t & top_l)
            dprob += list(np.abs(ct[both].to_numpy() - cl[both].to_numpy()))
            dlogprob += list(np.abs(np.log(ct[both].to_numpy()) - np.log(cl[both].to_numpy())))
    summary = {"steps_compared": len(same_set), "top5_same_set": float(np.mean(same_set)),
               "top5_overlap": float(np.mean(overlap)), "max_abs_dprob": float(np.max(dprob)),
               "mean_abs_dprob": float(np.mean(dprob)), "max_abs_dlogprob": float(np.max(dlogprob)),
               "mean_abs_dlogprob": float(np.mean(dlogprob)), "chosen_max_abs_dlogprob": float(np.max(dchosen)),
               "chosen_mean_abs_dlogprob": float(np.mean(dchosen))}
    return per_prompt, summary


def test_two_engines_on_one_file(api, smol):
    """`dl.compare` across engines: transformers (de-quantised float32 weights) against llama.cpp (Q4_1 weights)
    on the same GGUF, greedy. Tolerances measured here (docs/api.md, "Two engines, one file"): the engines' raw
    probabilities of the tokens both list in their top 5 differ by at most 0.1, their logprobs by 0.09 nats on
    average; the sets agree in most steps; and where greedy answers part, it is at a near-tie in both engines
    (each engine's own gap between the two tokens is under 0.25 nats), the only place a difference that small
    can flip a choice."""
    cmp = dl.compare({"transformers": smol, "llama.cpp": api}, PROMPTS, {"greedy": {}}, chat=True,
                     max_new_tokens=48, progress=False)
    assert cmp.models == ["transformers", "llama.cpp"] and len(cmp.run_list) == 6
    per_prompt, summary = cross_engine_report(cmp, first_steps=48)
    print("\n[cross-engine]", *per_prompt, summary, sep="\n")
    divergence = cmp.divergence.set_index("prompt")
    for row in per_prompt:
        assert row["steps"] >= 7
        first = divergence.first_divergence[row["prompt"]]
        assert (pd.isna(first) and row["first_divergence"] is None) or first == row["first_divergence"]
        if row["first_divergence"] is not None:
            assert 0 <= row["transformers_gap"] < 0.25 and 0 <= row["llama.cpp_gap"] < 0.25, row
    assert summary["steps_compared"] >= 40
    assert summary["max_abs_dprob"] < 0.1 and summary["mean_abs_dprob"] < 0.02
    assert summary["mean_abs_dlogprob"] < 0.15 and summary["chosen_mean_abs_dlogprob"] < 0.1
    assert summary["top5_overlap"] >= 0.9 and summary["top5_same_set"] >= 0.6
    first = cmp.trace("greedy", prompt=QUESTION, model="llama.cpp").candidates
    assert first[first.step == 0].token.tolist()[:3] == ["The", "La", "Le"]


def test_a_server_that_dies_mid_stream_leaves_the_steps_received():
    """A real server killed while it streams: a clear error, and the tokens that arrived are kept (err.trace)."""
    doomed = start("smollm2")
    received = []

    def on_token(step, text):
        received.append(text)
        if step == 2:
            doomed.process.kill()

    try:
        api = dl.connect(base_url=doomed.base_url, model="smollm2", max_retries=0)
        with pytest.raises(errors.APIError, match="stream") as info:
            api.generate("Once upon a time there was", max_new_tokens=200, on_token=on_token)
        trace = info.value.trace
        assert trace is not None and trace.num_steps == len(received) >= 3
        assert trace.tokens == received and trace.stop_reason.startswith("error:")
    finally:
        doomed.stop()
