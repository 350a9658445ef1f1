"""`forks`: where two engines' greedy paths part, and why, checked against each engine's own `lm.generate` and against
hand computations (the float64 re-run, the engines' measured difference, the tolerance), on tiny random models and
on the default model against a real llama.cpp server.

What is checked against what: every fork step is the first step where the engines' own `generate` runs differ (ids
taken from those runs, never written here); a near-tie is re-derived by hand from the two runs' candidates and a
float64 copy of the model made in the test; each real difference is built honestly (chat on one side, a repetition
penalty on one side, a tokenizer with other merges, a tokenizer that adds a BOS, other weights).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time

import numpy as np
import pandas as pd
import pytest
import torch

import decoderlab as dl
from decoderlab.analysis.forks import COLUMNS, SIDE_COLUMNS, Engine, ForksError, forks
from decoderlab.views.display import escape
from decoderlab.views.forks_view import CSS_CLASSES, ForksView, fork_panel, forks_html

from conftest import make_tiny

PROMPTS = ["Hello there", "The capital of France is", "Once upon a time", "What is 2+2?"]
TOKENS = 12


def first_difference(x: list, y: list) -> int | None:
    return next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)


def pd_na(x) -> bool:
    return x is pd.NA or (isinstance(x, float) and math.isnan(x))


def by_id(trace, step: int) -> dict[int, float]:
    """A step's candidates as {token id: log p} (the raw distribution), read from the trace's own frame."""
    c = trace.candidates[trace.candidates.step == step]
    return {int(i): math.log(p) for i, p in zip(c.token_id, c.prob)}


def float64_copy(model):
    m = copy.deepcopy(model).to(torch.float64)
    m.set_attn_implementation("eager")
    return m


@torch.no_grad()
def float64_logprobs(m64, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(m64(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)


@pytest.fixture(scope="module")
def dtypes(tokenizer):
    """One tiny model in float32 and in bfloat16, and their forks over PROMPTS."""
    model = make_tiny("llama", tokenizer)
    a = dl.LM(model, tokenizer, name="tiny")
    b = dl.LM(copy.deepcopy(model).to(torch.bfloat16), tokenizer, name="tiny")
    return a, b, forks(a, b, PROMPTS, max_new_tokens=TOKENS, progress=False)


# ---- a near-tie, by hand ------------------------------------------------------------------------------------------
def test_float32_and_bfloat16_part_where_their_own_runs_part(dtypes):
    a, b, result = dtypes
    assert list(result.frame.columns) == COLUMNS and len(result) == len(PROMPTS)
    assert result.names == ("tiny · float32 · sdpa", "tiny · bfloat16 · sdpa") and result.reference == "a"
    for i, prompt in enumerate(PROMPTS):
        alone_a = a.generate(prompt, max_new_tokens=TOKENS, progress=False)
        alone_b = b.generate(prompt, max_new_tokens=TOKENS, progress=False)
        ta, tb = result.traces(i)
        assert ta.token_ids == alone_a.token_ids and tb.token_ids == alone_b.token_ids
        row = result.frame.iloc[i]
        k = first_difference(alone_a.token_ids, alone_b.token_ids)
        assert row.forked == (k is not None)
        if k is None:
            assert row.kind == "same" and pd_na(row.fork_step) and row.common_prefix == TOKENS
            assert result.side_by_side(i).empty
            continue
        assert row.fork_step == k and row.common_prefix == k
        assert row.token_a == alone_a.tokens[k] and row.token_b == alone_b.tokens[k]
        assert row.logprob_a == pytest.approx(float(alone_a.steps.logprob[k]), abs=1e-6)
        assert row.logprob_b == pytest.approx(float(alone_b.steps.logprob[k]), abs=1e-6)
    assert result.frame.forked.any(), "the prompts were chosen so that bfloat16 parts from float32 somewhere"


def test_the_near_tie_is_the_hand_computed_one_and_float64_confirms_it(dtypes):
    """For every fork: float64's pick, its top-2 gap and the pair's gap from a float64 copy made here; the engines'
    measured difference and the tolerance from the two runs' candidates; and the verdict from those numbers."""
    a, b, result = dtypes
    m64 = float64_copy(a.model)
    near = 0
    for i in np.flatnonzero(result.frame.forked.to_numpy()):
        row = result.frame.iloc[i]
        ta, tb = result.traces(int(i))
        k = int(row.fork_step)
        ia, ib = ta.token_ids[k], tb.token_ids[k]
        lp = float64_logprobs(m64, [int(t) for t in ta.prompt_ids] + ta.token_ids[:k])
        top = torch.topk(lp, 2)
        assert row.float64_token == a.token_text(int(top.indices[0]))
        assert row.float64_gap == pytest.approx(float(top.values[0] - top.values[1]), abs=1e-9)
        assert row.float64_pair_gap == pytest.approx(float(lp[ia] - lp[ib]), abs=1e-9)
        diffs = []
        for s in range(k + 1):
            ca, cb = by_id(ta, s), by_id(tb, s)
            diffs += [abs(ca[t] - cb[t]) for t in set(ca) & set(cb) if not (s == k and t in (ia, ib))]
        assert row.delta == pytest.approx(max(diffs), abs=1e-9)
        own = by_id(ta, k)
        eps = max(abs(v - float(lp[t])) for t, v in own.items() if t not in (ia, ib))
        tolerance = 2 * max(max(diffs), eps)
        assert row.tolerance == pytest.approx(tolerance, rel=1e-9)
        gaps = [row.logprob_a - by_id(ta, k)[ib], row.logprob_b - by_id(tb, k)[ia], abs(float(lp[ia] - lp[ib]))]
        assert row.other_logprob_a == pytest.approx(by_id(ta, k)[ib])
        assert row.other_logprob_b == pytest.approx(by_id(tb, k)[ia])
        expected = "near-tie" if all(g <= tolerance for g in gaps) else "real difference: logits"
        assert row.kind == expected and row.scores == "raw"
        near += expected == "near-tie"
        side = result.side_by_side(int(i))
        assert list(side.columns) == SIDE_COLUMNS
        pick = side[side.float64_pick]
        assert len(pick) == 1 and pick.token.iat[0] == row.float64_token and pick.rank_float64.iat[0] == 0
        chosen_a, chosen_b = side[side.chosen_a].iloc[0], side[side.chosen_b].iloc[0]
        assert chosen_a.token == row.token_a and chosen_b.token == row.token_b
        assert chosen_a.logprob_float64 == pytest.approx(float(lp[ia]), abs=1e-12)
        assert chosen_b.logprob_a == pytest.approx(by_id(ta, k)[ib], abs=1e-9)
    assert near, "float32 against bfloat16 parts at near-ties on these prompts"


# ---- real differences, built honestly -----------------------------------------------------------------------------
def test_a_repetition_penalty_on_one_side_is_a_strategy_difference(tiny_lms):
    lm = tiny_lms["llama"]
    prompts = ["The the the the", "a b a b a b"]
    result = forks(lm, (lm, {"repetition_penalty": 1.3}), prompts, max_new_tokens=TOKENS, progress=False)
    for i, prompt in enumerate(prompts):
        plain = lm.generate(prompt, max_new_tokens=TOKENS, progress=False)
        penalised = lm.generate(prompt, max_new_tokens=TOKENS, repetition_penalty=1.3, progress=False)
        k = first_difference(plain.token_ids, penalised.token_ids)
        assert k is not None, "a tiny model repeats itself on these prompts, and the penalty moves it"
        row = result.frame.iloc[i]
        assert row.fork_step == k and row.token_b == penalised.tokens[k]
        assert int(penalised.steps["rank"][k]) != 0  # the processor moved b's choice off the raw top-1
        assert row.kind == "real difference: strategy settings"
        assert "repetition_penalty: – vs 1.3" in row.why and "RepetitionPenaltyLogitsProcessor" in row.why


def test_chat_on_one_side_or_another_system_message_is_a_template_difference(tiny_lms):
    lm = tiny_lms["llama"]
    prompt = "Hello there"
    result = forks(lm, (lm, {"chat": True}), [prompt], max_new_tokens=6, progress=False)
    row = result.frame.iloc[0]
    k = first_difference(lm.generate(prompt, max_new_tokens=6, progress=False).token_ids,
                         lm.generate(prompt, chat=True, max_new_tokens=6, progress=False).token_ids)
    assert row.fork_step == k and row.kind == "real difference: chat template"
    assert row.why == "engine a reads the prompt as plain text, engine b through its chat template"
    pirate = forks((lm, {"system": "You are a pirate."}), lm, [prompt], chat=True, max_new_tokens=6, progress=False)
    k = first_difference(lm.generate(prompt, chat=True, system="You are a pirate.", max_new_tokens=6,
                                     progress=False).token_ids,
                         lm.generate(prompt, chat=True, max_new_tokens=6, progress=False).token_ids)
    assert pirate.frame.fork_step[0] == k
    assert pirate.frame.kind[0] == "real difference: chat template" and "system messages differ" in pirate.frame.why[0]


def other_merges(tokenizer, text: str):
    """SmolLM2's tokenizer without the merges that make `text`'s words: the same vocabulary, other segmentation."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    words = set(tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids))
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if "".join(m) not in words]
    out = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  eos_token=tokenizer.eos_token, bos_token=tokenizer.bos_token)
    assert out.get_vocab() == tokenizer.get_vocab() and out(text).input_ids != tokenizer(text).input_ids
    return out


def test_another_tokenizer_and_another_prompt_encoding_are_named(tokenizer, tiny_lms, smol_dir):
    from transformers import AutoTokenizer

    lm = tiny_lms["llama"]
    prompt = "Hello there"
    split = dl.LM(lm.model, other_merges(tokenizer, prompt), name="tiny")
    bos = dl.LM(lm.model, AutoTokenizer.from_pretrained(smol_dir, add_bos_token=True), name="tiny")
    assert bos.encode(prompt)[0][0].tolist() == [tokenizer.bos_token_id] + lm.encode(prompt)[0][0].tolist()
    for other, what in ((split, "tokenizer"), (bos, "prompt encoding")):
        result = forks(lm, Engine(other, name="other"), [prompt], max_new_tokens=8, progress=False)
        k = first_difference(lm.generate(prompt, max_new_tokens=8, progress=False).token_ids,
                             other.generate(prompt, max_new_tokens=8, progress=False).token_ids)
        assert k is not None and result.frame.fork_step[0] == k
        assert result.frame.kind[0] == f"real difference: {what}"


def test_other_weights_are_a_real_difference_in_the_logits(tokenizer, tiny_lms):
    lm, other = tiny_lms["llama"], dl.LM(make_tiny("llama", tokenizer, seed=1), tokenizer, name="other")
    result = forks(lm, other, ["Hello there"], max_new_tokens=4, progress=False)
    row = result.frame.iloc[0]
    ta, tb = result.traces(0)
    k = first_difference(ta.token_ids, tb.token_ids)
    assert row.fork_step == k and row.kind == "real difference: logits"
    lp = float64_logprobs(float64_copy(lm.model), [int(t) for t in ta.prompt_ids] + ta.token_ids[:k])
    assert abs(float(lp[ta.token_ids[k]] - lp[tb.token_ids[k]])) > row.tolerance  # by hand: no tie in float64


def test_compiled_and_eager_do_not_part(tiny_lms):
    """The same model with compile=True (on a CPU: the static-cache steps the GPU captures) against eager."""
    lm = tiny_lms["llama"]
    prompts = PROMPTS[:2]
    result = forks(lm, (lm, {"compile": True}), prompts, max_new_tokens=TOKENS, progress=False)
    assert result.names == ("tiny-llama · float32 · sdpa", "tiny-llama · float32 · sdpa · compile=True")
    for i, prompt in enumerate(prompts):
        eager = lm.generate(prompt, max_new_tokens=TOKENS, progress=False)
        compiled = lm.generate(prompt, max_new_tokens=TOKENS, compile=True, progress=False)
        assert eager.token_ids == compiled.token_ids == result.traces(i)[1].token_ids
        row = result.frame.iloc[i]
        assert row.kind == "same" and not row.forked and row.common_prefix == TOKENS
        assert row.delta < 1e-4  # float32 both ways: the engines differ by rounding only
    assert "near-tie" not in repr(result)


# ---- bad input ------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error(tiny_lms):
    lm = tiny_lms["llama"]
    assert issubclass(ForksError, dl.DecoderlabError) and issubclass(ForksError, ValueError)
    cases = [((lm, "not a model", ["hi"]), {}, "engine b is a str"),
             ((lm, (lm, {"do_sample": True}), ["hi"]), {}, "do_sample=True"),
             ((lm, (lm, {"seed": 3}), ["hi"]), {}, "seed is set by forks"),
             ((lm, (lm, {"num_beams": 2}), ["hi"]), {}, "decoding token by token"),
             ((lm, lm, []), {}, "at least one prompt"),
             ((lm, lm, ["hi"]), {"max_new_tokens": 0}, "max_new_tokens=0"),
             ((lm, lm, ["hi"]), {"reference": "c"}, "must name a local engine")]
    for args, kwargs, message in cases:
        with pytest.raises(ForksError, match=message):
            forks(*args, **kwargs)
    with pytest.raises(dl.StrategyError):
        forks(lm, (lm, {"top_p": 3.0}), ["hi"])
    with pytest.raises(dl.PromptError):
        forks(lm, lm, [""], progress=False)
    result = forks(lm, lm, ["hi"], max_new_tokens=2, progress=False)
    with pytest.raises(KeyError, match="give a position"):
        result.traces(5)


# ---- the views -------------------------------------------------------------------------------------------------
def test_the_view_answers_a_pick_at_once_and_opens_each_trace(dtypes, timing):
    *_, result = dtypes
    view = ForksView(result)
    found = {c for w in _walk(view) for c in getattr(w, "_dom_classes", ())}
    assert set(CSS_CLASSES) <= found
    forked = [int(i) for i in np.flatnonzero(result.frame.forked.to_numpy())]
    assert view.selected == forked[0]
    times = []
    for i in [*range(len(result)), *range(len(result))]:
        start = time.perf_counter()
        view.picker.value = i
        times.append(time.perf_counter() - start)
        assert view.selected == i and view.panel.value == fork_panel(result, i)
        assert f'data-i="{i}"' in view.style.value
    timing("forks view: a prompt picked, median", statistics.median(times))
    assert max(times) < 0.2
    view.select(forked[0])
    row = result.frame.iloc[forked[0]]
    assert escape(row.token_a) in view.panel.value and escape(row.token_b) in view.panel.value
    opened = view.open_trace("b")
    assert opened.trace is result.traces(forked[0])[1] and opened.step == row.fork_step


def _walk(widget):
    yield widget
    for child in getattr(widget, "children", ()):
        yield from _walk(child)


def test_the_page_is_static_and_escapes_what_it_shows(dtypes):
    a, b, _ = dtypes
    result = forks(a, Engine(b, name="<b>bfloat16</b> & co"), PROMPTS[:2], max_new_tokens=TOKENS, progress=False)
    page = forks_html(result)
    assert page.startswith("<!DOCTYPE html>") and 'http-equiv="Content-Security-Policy"' in page
    assert "<script" not in page.lower() and "<b>bfloat16" not in page
    assert "&lt;b&gt;bfloat16&lt;/b&gt; &amp; co" in page
    for i in range(len(result)):
        row = result.frame.iloc[i]
        assert f"<h2>Prompt {i}</h2>" in page and escape(row.kind) in page
        if row.forked:
            assert escape(row.token_a) in page and escape(row.token_b) in page


# ---- a local model against a server on the same weights ------------------------------------------------------
@pytest.mark.integration
@pytest.mark.server
def test_the_default_model_against_llama_cpp_parts_only_at_near_ties(smol):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    from api_server import start

    server = start("smollm2")
    try:
        api = dl.connect(base_url=server.base_url, model=server.model)
        prompts = ["Write one sentence about the sea.", "What is the capital of France?"]
        result = forks(smol, api, prompts, chat=True, max_new_tokens=12, progress=False)
        plain = forks(smol, api, ["The capital of France is"], max_new_tokens=12, progress=False)
        for got, chat, texts in ((result, True, prompts), (plain, False, ["The capital of France is"])):
            for i, prompt in enumerate(texts):
                local, remote = got.traces(i)
                assert local.tokens == smol.generate(prompt, chat=chat, max_new_tokens=12, progress=False).tokens
                # the server's run is its own trace (llama.cpp's cache moves its numbers between requests, docs/api.md)
                ends = [*remote.tokens, "⟨end⟩"] if remote.stop_reason == "eos" else remote.tokens
                mine = [*local.tokens[:-1], "⟨end⟩"] if local.stop_reason == "eos" else local.tokens
                k = first_difference(mine, ends)
                row = got.frame.iloc[i]
                assert (pd_na(row.fork_step) and k is None) or row.fork_step == k
                assert row.kind in ("same", "near-tie"), row.why  # the same weights: they part only at near-ties
                if k is not None:  # within the engines' measured difference on both sides and in float64
                    assert abs(row.float64_pair_gap) <= row.tolerance
                    assert row.logprob_a - row.other_logprob_a <= row.tolerance
        assert result.frame.forked.any() and plain.frame.kind[0] == "near-tie"
    finally:
        server.stop()
