"""The comparison benchmarks' own logic, on a tiny model: the seed's loop as copied (and its EOS switch), the long
prompt, the eager baseline that switches the model back; and the result file every benchmark writes (the docs render
it, so its keys must not drift). Their timings are measured in benchmarks/, never here."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_outputs  # noqa: E402
import bench_seed_loop  # noqa: E402
from _timing import EVERYTHING, first_difference, run_recorded  # noqa: E402


def greedy(model, ids, n):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_seed_loop_equals_generate_and_runs_past_eos(tiny_lms):
    lm = tiny_lms["llama"]
    ids = lm.tokenizer("The seed post decodes", return_tensors="pt").input_ids
    ref = greedy(lm.model, ids, 12)
    _, tokens = bench_seed_loop.seed_loop(lm, ids, 12)
    assert tokens == ref
    assert run_recorded(lm, ids, 12, EVERYTHING, read_lens=True)[1].token_ids == ref
    # the copy does stop at its tokenizer's EOS: NoEos is what makes it run N tokens
    stops = bench_seed_loop.NoEos(lm.tokenizer)
    stops.eos_token_id = ref[2]
    out = bench_seed_loop.CustomDecoder(lm.model, stops).generate(ids, max_length=ids.shape[1] + 12, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == ref[: ref.index(ref[2]) + 1]
    assert bench_seed_loop.NoEos(lm.tokenizer).decode(ref) == lm.tokenizer.decode(ref)


def test_long_prompt_has_exactly_the_tokens_asked(tokenizer):
    for length in (1, 57, 2048):
        ids = bench_outputs.long_prompt(tokenizer, length)
        assert ids.shape == (1, length)
        whole = tokenizer(bench_outputs.TEXT * 80, return_tensors="pt").input_ids
        assert torch.equal(ids[0], whole[0, :length])


def test_eager_baseline_returns_everything_and_switches_back(tiny_lms):
    lm = tiny_lms["llama"]
    cfg = lm.model.config
    assert cfg._attn_implementation == "sdpa"
    ids = lm.tokenizer("Attention weights need eager", return_tensors="pt").input_ids
    P, n = ids.shape[1], 5
    _, tokens, returned = bench_outputs.with_outputs(lm, ids, n)
    assert cfg._attn_implementation == "sdpa"
    assert tokens == greedy(lm.model, ids, n) == run_recorded(lm, ids, n, EVERYTHING, read_lens=True)[1].token_ids
    L, H, d, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size, cfg.vocab_size
    scores = n * V
    attentions = L * H * (P * P + sum(P + i for i in range(1, n)))  # the prompt's matrices, then one row a step
    hidden = (L + 1) * d * (P + n - 1)
    assert returned == 4 * (scores + attentions + hidden)  # float32


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


# ---- the result file every benchmark writes -------------------------------------------------------------------------
def test_result_file_has_every_key_and_round_trips_through_json(tmp_path, monkeypatch, capsys):
    import argparse
    import json

    import numpy as np

    import _results

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 400])
    _results.add_out_argument(ap)
    args = ap.parse_args(["--tokens", "8", "--out", str(tmp_path / "x" / "bench_x-cpu.json")])
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--tokens", "8", "--out", args.out])
    rows = [{"variant": "generate", "median s": np.float64(1.5), "tok/s": np.int64(5), "ratio": 1.0},
            {"variant": "Record() | all", "median s": 1.2, "tok/s": 6.7, "ratio": float("nan")}]
    path = _results.write(_results.ROOT / "benchmarks" / "bench_x.py", title="a title", settings=args,
                          columns=["variant", "median s", "tok/s", "ratio"], results=rows,
                          summary={"ratio_everything_on": np.float32(0.83), "met": np.bool_(True)}, notes="n")
    assert path == tmp_path / "x" / "bench_x-cpu.json" and "result file:" in capsys.readouterr().out
    data = json.loads(path.read_text(encoding="utf-8"))
    assert list(data) == list(_results.KEYS)  # every key, in the documented order
    assert json.loads(json.dumps(data)) == data
    assert data["benchmark"] == "bench_x" and data["title"] == "a title" and data["notes"] == "n"
    assert data["command"].endswith(f"benchmarks/bench_x.py --tokens 8 --out {args.out}")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", data["date"])
    assert set(data["machine"]) >= {"platform", "processor", "cpu_count", "gpu", "memory_gb"}
    assert set(data["versions"]) >= {"python", "torch", "transformers", "decoderlab"}
    assert data["settings"] == {"tokens": 8, "steps": [40, 400]}  # flat; where the file goes is no setting
    assert data["columns"] == ["variant", "median s", "tok/s", "ratio"]
    assert [list(r) for r in data["results"]] == [data["columns"]] * 2
    assert data["results"][0] == {"variant": "generate", "median s": 1.5, "tok/s": 5, "ratio": 1.0}
    assert data["results"][1]["ratio"] is None  # NaN is not JSON
    assert isinstance(data["results"][0]["tok/s"], int) and data["summary"]["met"] is True
    assert data["summary"]["ratio_everything_on"] == pytest.approx(0.83)


def test_result_file_names_and_rows_that_miss_a_column():
    import argparse

    import _results

    assert _results.result_path("benchmarks/bench_overhead.py") == _results.RESULTS / "bench_overhead.json"
    assert _results.result_path("bench_overhead.py", "cuda-llama-1b").name == "bench_overhead-cuda-llama-1b.json"
    assert _results.result_path("bench_overhead.py", "cpu", out="/tmp/o.json") == Path("/tmp/o.json")
    shape = argparse.Namespace(random_weights=".bench/llama-1b/", model=None)
    assert _results.label_for(shape, torch.device("cuda", 0), "auto") == "cuda-llama-1b-auto"
    assert _results.label_for(argparse.Namespace(random_weights=None, model=None), torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="columns"):
        _results.build("bench_x.py", title="t", settings={}, columns=["a", "b"], results=[{"a": 1}], summary={})
    assert _results.p90([0.1]) == 0.1 and _results.p90([float(i) for i in range(11)]) == pytest.approx(9.0)
