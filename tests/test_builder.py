"""A trace from token strings and logprobs alone (no model, no tokenizer): frames with NA where nothing was
recorded, and every view works on it. Also the schema check of `build_trace` and `Trace.load`."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import decoderlab as dl
from decoderlab.trace.builder import from_tokens
from decoderlab.record.schema import SCHEMA, SchemaError, check_arrays, schema_frame
from decoderlab.errors import TraceFileError

TOKENS = [" The", " cat", " sat", "."]
LOGPROBS = [-0.1, -1.5, -0.7, -2.3]
TOP = [[(" The", -0.1), (" A", -2.5)], [(" dog", -0.9), (" cat", -1.5), (" cow", -2.0)],
       [(" sat", -0.7), (" ran", -1.0)], [("!", -0.5), (" on", -1.8)]]


def api_like():
    return from_tokens(TOKENS, LOGPROBS, TOP, prompt="Say something:", model_name="server-model",
                       chooser="server", stop_reason="max_new_tokens")


def test_steps_frame_has_what_was_given_and_na_for_the_rest():
    tr = api_like()
    steps = tr.steps
    assert steps.token.tolist() == TOKENS
    assert steps.logprob.tolist() == pytest.approx(LOGPROBS)
    assert steps.prob.tolist() == pytest.approx([math.exp(x) for x in LOGPROBS])
    # the chosen token's rank among the given alternatives; at the last step it is not among them
    assert steps["rank"].tolist()[:3] == [0, 1, 0]
    assert steps["rank"].isna().tolist() == [False, False, False, True]
    for col in ("entropy", "final_prob", "final_logprob", "final_entropy"):
        assert steps[col].isna().all(), col
    assert steps.final_rank.isna().all()
    assert not steps.forced.any()
    assert tr.text == " The cat sat."
    assert steps.why[0] == "chosen by server (p=0.905, rank 0)"
    assert steps.why[3].endswith("rank –)")  # not among the alternatives: unknown, said so


def test_candidates_frame_interns_text_and_drops_missing_alternatives():
    tr = api_like()
    cands = tr.candidates
    assert cands.groupby("step").size().tolist() == [2, 3, 2, 2]  # no padded entries
    step1 = cands[cands.step == 1]
    assert step1.token.tolist() == [" dog", " cat", " cow"]
    assert step1.chosen.tolist() == [False, True, False]
    assert step1.prob.tolist() == pytest.approx([math.exp(-0.9), math.exp(-1.5), math.exp(-2.0)])
    assert cands.logit.isna().all() and cands.final_prob.isna().all()
    # equal text, one id: " cat" the candidate and " cat" the chosen token
    assert int(step1.token_id[step1.chosen].iloc[0]) == int(tr.steps.token_id[1])


def test_rows_of_unequal_length():
    tr = from_tokens([[" a", " b", " c"], [" x"]], [[-0.1, -0.2, -0.3], [-1.0]])
    assert tr.rows == 2
    assert tr.runs.length.tolist() == [3, 1]
    assert tr.steps.groupby("row").size().tolist() == [3, 1]
    assert tr.row(1).tokens == [" x"]
    assert tr.texts == [" a b c", " x"]


def test_views_work_on_a_trace_without_a_model(tmp_path):
    from decoderlab import plots

    tr = api_like()
    for fig in (plots.distribution(tr, 1), plots.probability_timeline(tr), plots.candidates_heatmap(tr)):
        assert fig.axes, "a figure with axes"
        fig.savefig(tmp_path / "f.png")
    page = tr.to_html()
    assert "server-model" in page and "cat" in page
    back = dl.Trace.load(tr.save(tmp_path / "api.parquet"))
    pd.testing.assert_frame_equal(back.steps, tr.steps)
    pd.testing.assert_frame_equal(back.candidates, tr.candidates)


def test_show_widget_on_a_trace_without_a_model():
    pytest.importorskip("ipywidgets")
    view = dl.show(api_like())
    assert view.trace.num_steps == 4
    view.select(1)
    assert "cat" in view.step_label.value


def test_schema_check_names_the_array():
    good = {"token_id": np.zeros((3, 1), np.int64), "logprob": np.zeros((3, 1), np.float32)}
    check_arrays(good)
    with pytest.raises(SchemaError, match="'token_id' is missing"):
        check_arrays({"logprob": good["logprob"]})
    with pytest.raises(SchemaError, match="'logprob' is float64"):
        check_arrays({**good, "logprob": np.zeros((3, 1))})
    with pytest.raises(SchemaError, match="'logprob' has shape"):
        check_arrays({**good, "logprob": np.zeros((4, 1), np.float32)})
    with pytest.raises(SchemaError, match="'cand_id' has 2 dimensions"):
        check_arrays({**good, "cand_id": np.zeros((3, 1), np.int64)})
    check_arrays({**good, "my_score": np.zeros((3, 1, 7))})  # a user's recorder: only (step, row) is checked
    assert set(schema_frame().name) == set(SCHEMA)


def test_load_refuses_files_that_contradict_the_schema(tmp_path):
    import json

    import pyarrow.parquet as pq

    tr = api_like()
    path = tr.save(tmp_path / "t.parquet")
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"decoderlab"])

    def write(meta_change, name):
        m = json.loads(json.dumps(meta))
        meta_change(m)
        out = tmp_path / name
        pq.write_table(table.replace_schema_metadata({b"decoderlab": json.dumps(m).encode()}), out)
        return out

    newer = write(lambda m: m.update(format=99), "newer.parquet")
    with pytest.raises(TraceFileError, match="format 99"):
        dl.Trace.load(newer)
    wrong = write(lambda m: m["arrays"]["logprob"].update(dtype="float64"), "dtype.parquet")
    with pytest.raises(TraceFileError, match="'logprob' is float64"):
        dl.Trace.load(wrong)
    short = write(lambda m: m["arrays"]["token_id"].update(shape=[9, 1]), "shape.parquet")
    with pytest.raises(TraceFileError, match="token_id"):
        dl.Trace.load(short)
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(TraceFileError):
        dl.Trace.load(tmp_path / "junk.parquet")


def test_local_and_built_traces_share_one_layout(tiny_lms):
    """Every array a local run records is declared in the schema, with the declared dtype."""
    tr = tiny_lms["llama"].generate("Hello", max_new_tokens=3, progress=False,
                                    record=dl.Record(logits=True, attention=True, lens=True))
    tr.lens  # computes the lens arrays from the residuals
    for name, arr in tr.arrays.items():
        assert name in SCHEMA, f"{name} is recorded but not declared"
        assert arr.dtype == np.dtype(SCHEMA[name].dtype), name
