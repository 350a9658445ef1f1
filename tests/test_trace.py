"""Trace frames are tidy and documented; save/load round-trips losslessly through parquet."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import decoderlab as dl
from decoderlab.record.schema import CANDIDATE_COLUMNS, PROCESSOR_COLUMNS, STEP_COLUMNS


@pytest.fixture(scope="module")
def sampled(tiny_lms):
    return tiny_lms["llama"].generate("Frames are tidy", max_new_tokens=8, do_sample=True, top_k=30, top_p=0.8,
                                      temperature=0.9, seed=2, progress=False,
                                      record=dl.Record(top_k=7, logits=True, attention=True, lens=True))


def test_frame_columns_and_shapes(sampled):
    n = sampled.num_steps
    assert list(sampled.choices.columns) == STEP_COLUMNS and len(sampled.choices) == n
    lens = ["commit_layer"] if sampled.has_lens else []
    assert list(sampled.steps.columns) == STEP_COLUMNS + lens and len(sampled.steps) == n
    assert list(sampled.candidates.columns) == CANDIDATE_COLUMNS and len(sampled.candidates) == n * 7
    assert list(sampled.processors.columns) == PROCESSOR_COLUMNS
    assert sampled.processors.processor.unique().tolist() == ["TemperatureLogitsWarper", "TopKLogitsWarper",
                                                              "TopPLogitsWarper"]
    assert sampled.tokens == sampled.steps.token.tolist()
    assert sampled.strategy["top_k"] == 30 and sampled.strategy["seed"] == 2 and sampled.strategy["do_sample"]


def test_steps_agree_with_logits(sampled):
    logits = sampled.arrays["logits"][:, 0].astype(np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    chosen = np.array(sampled.token_ids)
    np.testing.assert_allclose(sampled.steps.logprob, lp[np.arange(len(chosen)), chosen], atol=5e-3)
    assert np.isclose(sampled.steps.prob, np.exp(sampled.steps.logprob)).all()
    # each step's candidates are the top-k raw logits in order; at most one is marked chosen
    for s, group in sampled.candidates.groupby("step"):
        assert group.token_id.tolist() == list(np.argsort(-logits[s], kind="stable")[:7]) or \
            np.allclose(np.sort(group.logit.values)[::-1], group.logit.values)
        assert group.chosen.sum() <= 1


def test_processor_mass_removed_matches_hand_computation(tiny_lms):
    import torch

    lm = tiny_lms["qwen2"]
    trace = lm.generate("Top-k removes mass", max_new_tokens=3, do_sample=True, top_k=5, seed=0, progress=False)
    proc = trace.processors
    # recompute step 0 from float32 logits of a fresh prefill
    ids, _ = lm.encode("Top-k removes mass")
    strat = lm.strategy(ids.shape[1], do_sample=True, top_k=5)
    from decoderlab.engine import loop

    state = loop.prefill(lm.model, ids, strat)
    raw = state.next_logits[0]
    p = torch.softmax(raw, -1)
    expected = 1 - torch.topk(p, 5).values.sum().item()
    row = proc[(proc.step == 0) & (proc.processor == "TopKLogitsWarper")]
    assert row.mass_removed.iloc[0] == pytest.approx(expected, rel=1e-4)
    assert proc[proc.processor == "TopKLogitsWarper"].prob_after.between(0, 1).all()


def test_rank_changed_by_repetition_penalty(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("la la la la la la", max_new_tokens=6, repetition_penalty=5.0, progress=False)
    proc = trace.processors
    assert set(proc.processor) == {"RepetitionPenaltyLogitsProcessor"}
    assert (proc.rank_changed == (proc.rank_before != proc.rank_after)).all()
    assert (trace.steps.final_rank == 0).all()  # greedy picks the top of the final distribution


def test_save_load_round_trip_is_lossless(sampled, tmp_path):
    path = sampled.save(tmp_path / "run.parquet")
    back = dl.Trace.load(path)
    for name, arr in sampled.arrays.items():
        if name == "residual":
            continue
        assert back.arrays[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back.arrays[name], arr, err_msg=name)
    for frame in ("steps", "candidates", "processors", "lens", "lens_stats"):
        pd.testing.assert_frame_equal(getattr(back, frame), getattr(sampled, frame))
    pd.testing.assert_frame_equal(back.attention_frame(steps=[1, 5]), sampled.attention_frame(steps=[1, 5]))
    assert back.text == sampled.text and back.prompt == sampled.prompt and back.strategy == sampled.strategy
    assert back.stop_reason == sampled.stop_reason and back.model_name == sampled.model_name


def test_load_rejects_other_parquet(tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="not a decoderlab trace"):
        dl.Trace.load(tmp_path / "x.parquet")


def test_empty_trace_frames(tiny_lms):
    s = tiny_lms["llama"].session("Nothing yet")
    t = s.trace
    assert t.num_steps == 0 and t.steps.empty and list(t.steps.columns) == STEP_COLUMNS
    assert t.candidates.empty and t.text == ""


def test_tokens_keep_partial_utf8_visible(tokenizer):
    from decoderlab.engine.tokens import TokenText

    text = TokenText(tokenizer)
    ids = tokenizer("你好，世界 🌍", add_special_tokens=False).input_ids
    pieces = [text(i) for i in ids]
    assert all(p for p in pieces)
    assert all("\ufffd" not in p for p in pieces)
    joined = "".join(pieces)
    assert "\\x" in joined or joined == "你好，世界 🌍"
    assert text(tokenizer(" hello", add_special_tokens=False).input_ids[0]) == " hello"
    assert text(tokenizer("\n", add_special_tokens=False).input_ids[0]) == "\n"


# ---- saved traces: every frame and every piece of metadata survives; a hostile file is refused --------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from decoderlab.trace.builder import from_tokens  # noqa: E402

# token text as tokenizers decode it: newlines, NUL, bidi marks and overrides, emoji, CJK, the replacement character
# of a partial UTF-8 byte, and lone surrogates
TOKEN_TEXT = st.text(alphabet=st.one_of(st.characters(codec="utf-8"),
                                        st.sampled_from(["\n", "\x00", "\u200f", "\u202e", "\ufffd", "😀", "中",
                                                         "\ud800", "\t", " "])),
                     min_size=0, max_size=6)


@st.composite
def random_traces(draw):
    rows = draw(st.integers(1, 3))
    toks = [draw(st.lists(TOKEN_TEXT, min_size=0, max_size=6)) for _ in range(rows)]
    if not any(toks):
        toks[0] = ["x"]
    lp = [[draw(st.floats(-30, 0)) for _ in r] for r in toks]
    k = draw(st.integers(0, 3))
    top = [[[(draw(TOKEN_TEXT), draw(st.floats(-30, 0))) for _ in range(k)] for _ in r] for r in toks]
    prompt_tokens = draw(st.lists(TOKEN_TEXT, max_size=3))
    arrays = {}
    steps = max(len(r) for r in toks)
    if draw(st.booleans()):  # attention rows, the oldest steps' maybe dropped under a memory budget
        kept = draw(st.integers(0, steps))
        shape = (kept, rows, draw(st.integers(1, 2)), draw(st.integers(1, 2)), len(prompt_tokens) + steps - 1)
        seed = draw(st.integers(0, 2**16))
        arrays["attention"] = np.random.default_rng(seed).random(shape).astype(np.float16)
    tr = from_tokens(toks, lp, top if k else None, prompt=draw(TOKEN_TEXT), prompt_tokens=prompt_tokens,
                     model_name=draw(TOKEN_TEXT), stop_reason=draw(st.sampled_from(["eos", None])),
                     strategy={"temperature": draw(st.floats(0.1, 2)), "note": draw(TOKEN_TEXT)}, arrays=arrays)
    tr.memory_budget = draw(st.one_of(st.none(), st.integers(1, 2**40)))
    return tr


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tr=random_traces())
def test_save_load_round_trips_every_frame_and_field(tmp_path, tr):
    back = dl.Trace.load(tr.save(tmp_path / "t.parquet"))
    for frame in ("steps", "candidates", "runs"):
        pd.testing.assert_frame_equal(getattr(back, frame), getattr(tr, frame))
    for name in ("prompt", "model_name", "strategy", "stop_reason", "texts", "token_text", "seeds", "row_stop_reasons",
                 "processor_names", "chooser", "branch", "parent", "fork_step", "memory_budget", "attention_dropped"):
        assert getattr(back, name) == getattr(tr, name), name
    np.testing.assert_array_equal(back.prompt_ids, tr.prompt_ids)
    assert set(back.arrays) == set(tr.arrays)
    for name, arr in tr.arrays.items():
        assert back.arrays[name].dtype == arr.dtype, name
        np.testing.assert_array_equal(back.arrays[name], arr, err_msg=name)


def test_attention_of_the_newest_steps_only():
    """A trace whose attention covers its last steps (the oldest dropped under Record(memory_budget=...)): the frames
    flag the steps without rows, the accessors index by step, and arrays that contradict the schema are refused."""
    from decoderlab.record.schema import SchemaError, check_arrays

    att = np.random.default_rng(0).random((2, 1, 1, 2, 2 + 4 - 1)).astype(np.float16)  # steps 2, 3 of 4
    tr = from_tokens(["a", "b", "c", "d"], prompt_tokens=["p", "q"], arrays={"attention": att},
                     attention_layers=[0], attention_heads=[0, 1])
    assert tr.attention_dropped == 2 and tr.steps.has_attention.tolist() == [False, False, True, True]
    np.testing.assert_array_equal(tr.attention_weights(3), att[1, 0, :, :, :5].astype(np.float32))
    assert sorted(tr.attention.step.unique()) == [2, 3]
    with pytest.raises(dl.errors.AttentionDroppedError, match="step 1 has no attention rows: the rows of steps 0-1"):
        tr.attention_weights(1)
    with pytest.raises(dl.errors.AttentionDroppedError):
        tr.attention_frame(steps=[0, 3])
    no_attention = from_tokens(["a", "b"])
    assert no_attention.attention_dropped == 0 and not no_attention.steps.has_attention.any()
    ids = np.zeros((4, 1), np.int64)
    for bad in (np.zeros((5, 1, 1, 2, 5), np.float16), np.zeros((2, 2, 1, 2, 5), np.float16)):
        with pytest.raises(SchemaError, match="'attention' has shape"):
            check_arrays({"token_id": ids, "attention": bad})
    with pytest.raises(SchemaError, match="'logprob' has shape"):  # only attention may hold fewer steps
        check_arrays({"token_id": ids, "logprob": np.zeros((2, 1), np.float32)})


def test_loading_never_unpickles(tmp_path):
    """A crafted file whose arrays and metadata carry pickles: refused with a TraceFileError, the payload never run."""
    import json
    import pickle

    import pyarrow.parquet as pq

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    tr = from_tokens(["a", "b"], [-0.1, -0.2])
    path = tr.save(tmp_path / "t.parquet")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"decoderlab"])
    blob = pickle.dumps(np.array([Payload()], dtype=object))
    buf = __import__("io").BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    crafted = [
        ({b"decoderlab": json.dumps(meta).encode(), b"decoderlab.prefill_attention.0": buf.getvalue()}, "npy"),
        ({b"decoderlab": json.dumps({**meta, "arrays": {**meta["arrays"], "token_id": {"dtype": "object",
                                                                                       "shape": [2, 1]}}}).encode()},
         "object dtype"),
        ({b"decoderlab": blob}, "pickled metadata"),
        ({b"decoderlab": json.dumps({**meta, "arrays": None}).encode()}, "damaged metadata"),
        ({b"decoderlab": json.dumps([1, 2]).encode()}, "not a record"),
    ]
    for i, (metadata, why) in enumerate(crafted):
        out = tmp_path / f"crafted{i}.parquet"
        pq.write_table(table.replace_schema_metadata(metadata), out)
        with pytest.raises(dl.TraceFileError):
            dl.Trace.load(out)
        assert not marker.exists(), why
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(dl.TraceFileError, match="cannot be read"):
        dl.Trace.load(truncated)
