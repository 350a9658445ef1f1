"""dl.study on a local Ray of two workers: every run equals the same run made alone with lm.generate, the folder is
plain Parquet, a failing prompt is recorded and the study goes on, and a study started again skips what is written."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import ray

import decoderlab as dl
from tests.conftest import make_tiny

STRATEGIES = {"greedy": {}, "top-k": dict(do_sample=True, top_k=20, temperature=0.9),
              "top-p": dict(do_sample=True, top_p=0.9, repetition_penalty=1.2)}
GOOD = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "Roses are red,",
        "In 1969, the first", "A haiku about the sea:"]
TOO_LONG = "word " * 400  # past the tiny model's 256 positions: this prompt fails, the others go on
PROMPTS = GOOD[:3] + [TOO_LONG] + GOOD[3:]
RUN = dict(seeds=[0, 1], max_new_tokens=10, workers=2, progress=False)


@pytest.fixture(scope="module")
def tiny_folder(tokenizer, tmp_path_factory):
    """A tiny Llama saved as a transformers folder: what each worker loads (dl.load(folder))."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with two CPUs, as `dl.study` starts one (here once for the module)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def made(tiny_folder, local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "first"
    return out, dl.study(str(tiny_folder), PROMPTS, STRATEGIES, out=out, **RUN)


def test_every_run_is_the_run_made_alone(made, tiny_folder):
    _, st = made
    lm = dl.load(tiny_folder)
    runs = st.runs
    assert len(runs) == len(GOOD) * (1 + 2 + 2)  # greedy once, each sampler once per seed
    assert set(runs["prompt"]) == set(GOOD)
    for r in runs.itertuples():
        seed = None if pd.isna(r.seed) else int(r.seed)
        alone = lm.generate(r.prompt, max_new_tokens=10, seed=seed, progress=False, **STRATEGIES[r.strategy])
        assert list(r.token_ids) == alone.token_ids, (r.strategy, r.seed, r.prompt)
        steps = st.steps[(st.steps["prompt_index"] == r.prompt_index) & (st.steps["strategy"] == r.strategy)
                         & (st.steps["seed"].astype("Float64").fillna(-1) == (-1 if seed is None else seed))]
        assert steps["token_id"].tolist() == alone.token_ids
        np.testing.assert_allclose(steps["logprob"].to_numpy(), alone.steps["logprob"].to_numpy(), atol=1e-5)


def test_a_failing_prompt_is_recorded_and_the_others_run(made):
    _, st = made
    fails = st.failures
    assert fails["prompt_index"].tolist() == [PROMPTS.index(TOO_LONG)]
    assert "context" in fails["error"].iloc[0].lower() or "position" in fails["error"].iloc[0].lower()
    assert st.summary["failed_prompts"].eq(1).all() and st.summary["prompts"].eq(len(GOOD)).all()
    assert st.why_failed().sum() == 1
    assert "1 failed" in repr(st) and f"{len(PROMPTS)} of {len(PROMPTS)} prompts done" in repr(st)


def test_summary_is_compares_summary_over_the_same_runs(made, tiny_folder):
    _, st = made
    lm = dl.load(tiny_folder)
    cmp = dl.compare(lm, GOOD, STRATEGIES, seeds=[0, 1], max_new_tokens=10, progress=False)
    want, got = cmp.summary, st.summary
    assert list(got.columns) == list(want.columns[:3]) + ["prompts", "failed_prompts"] + list(want.columns[3:])
    assert got["strategy"].tolist() == want["strategy"].tolist() and got["runs"].tolist() == want["runs"].tolist()
    numbers = [c for c in want.columns if c not in ("model", "strategy", "runs")]
    # the same tokens; float32 logprobs summed by workers with other thread counts: equal within 1e-4
    np.testing.assert_allclose(got[numbers].to_numpy(float), want[numbers].to_numpy(float), rtol=1e-4, atol=1e-6)
    fig = dl.plots.compare(st)  # the comparison's plots read a study's runs too
    assert len(fig.axes) == 5


def test_the_folder_is_plain_parquet(made):
    """pandas and pyarrow read the datasets without decoderlab; each prompt is one file; nothing half-written."""
    out, st = made
    steps = pd.read_parquet(out / "steps")
    assert len(steps) == len(st.steps) == st.runs["length"].sum()
    runs = ds.dataset(out / "runs", format="parquet").to_table().to_pandas()
    assert len(runs) == len(st.runs) + 1 and runs["error"].notna().sum() == 1
    assert len(pd.read_parquet(out / "candidates")) == len(st.candidates) > len(steps)
    assert sorted(os.listdir(out / "runs")) == [f"prompt-{i:06d}.parquet" for i in range(len(PROMPTS))]
    assert not [f for d in ("steps", "candidates", "runs") for f in os.listdir(out / d) if f.startswith(".")]
    assert pd.read_parquet(out / "prompts.parquet")["prompt"].tolist() == PROMPTS


def test_a_study_started_again_skips_what_is_written(made, tiny_folder, tmp_path):
    import shutil

    first, st = made
    out = tmp_path / "again"
    shutil.copytree(first, out)
    (out / "runs" / "prompt-000001.parquet").unlink()  # stopped before prompt 1's runs file was renamed into place
    (out / "steps" / ".prompt-000005.parquet.0123.tmp").write_bytes(b"half")
    kept = {p: p.stat().st_mtime_ns for p in (out / "runs").iterdir()}
    again = dl.study(str(tiny_folder), PROMPTS, STRATEGIES, out=out, **RUN)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the other prompts were not run again
    assert (out / "runs" / "prompt-000001.parquet").exists() and not list((out / "steps").glob(".*"))
    pd.testing.assert_frame_equal(again.runs, st.runs)
    with pytest.raises(dl.StudyError, match="different study.*max_new_tokens"):
        dl.study(str(tiny_folder), PROMPTS, STRATEGIES, out=out, **{**RUN, "max_new_tokens": 11})


def test_bad_input_is_named_before_anything_runs(tiny_lms, tmp_path):
    with pytest.raises(dl.StudyError, match="cannot be loaded again"):
        dl.study(tiny_lms["llama"], GOOD, STRATEGIES, out=tmp_path / "a")
    with pytest.raises(dl.StudyError, match="at least one prompt"):
        dl.study(None, [], STRATEGIES, out=tmp_path / "b")
    with pytest.raises(dl.StudyError, match="prompt 1 is a int"):
        dl.study(None, ["a", 3], STRATEGIES, out=tmp_path / "c")
    with pytest.raises(dl.StrategyError, match="seed= is set by dl.study"):
        dl.study(None, GOOD, {"x": dict(seed=1)}, out=tmp_path / "d")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "notes.txt").write_text("mine")
    with pytest.raises(dl.StudyError, match="not empty"):
        dl.study(None, GOOD, STRATEGIES, out=tmp_path / "e")
    with pytest.raises(dl.StudyError, match="no study"):
        dl.open_study(tmp_path / "e")
    frame = pd.DataFrame({"text": GOOD})
    with pytest.raises(dl.StudyError, match="no column 'prompt'"):
        dl.study(None, frame, STRATEGIES, out=tmp_path / "f")


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(dl.MissingExtraError, match=r"decoderlab\[scale\]"):
        dl.study(None, GOOD[:1], {"greedy": {}}, out=tmp_path / "s")


def _ray_worker_pids() -> list[int]:
    """The processes of the study's model replicas: Ray titles an actor's process `ray::Worker...`."""
    from pathlib import Path

    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::Worker"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_a_killed_worker_loses_nothing_and_writes_no_duplicates(tiny_folder, tiny_lms, local_ray, tmp_path):
    """A replica's process killed mid-study (SIGKILL, as the OOM killer or a lost node would): Ray restarts it and
    the prompt it held runs again, so every prompt's runs are written once and equal the runs made alone."""
    import signal
    import threading
    import time

    prompts = [f"Story number {i} begins:" for i in range(24)]
    out = tmp_path / "killed"
    kw = dict(seeds=[0], max_new_tokens=24, workers=2, progress=False)
    done: dict = {}
    thread = threading.Thread(target=lambda: done.setdefault(
        "study", dl.study(str(tiny_folder), prompts, {"greedy": {}}, out=out, **kw)))
    thread.start()
    killed, written_then = None, None
    deadline = time.time() + 240
    while killed is None and thread.is_alive() and time.time() < deadline:
        written = list((out / "runs").glob("prompt-*.parquet")) if (out / "runs").exists() else []
        pids = _ray_worker_pids()
        if written and pids:
            os.kill(pids[0], signal.SIGKILL)
            killed, written_then = pids[0], len(written)
        time.sleep(0.02)
    thread.join(600)
    assert killed is not None and written_then < len(prompts), "the worker was not killed while the study ran"
    study = done["study"]
    if len(study.failures):  # a prompt that lost its worker twice is recorded as failed: the same call runs it again
        study = dl.study(str(tiny_folder), prompts, {"greedy": {}}, out=out, **kw)
    runs = study.runs
    assert len(study.failures) == 0 and sorted(runs.prompt) == sorted(prompts)  # each prompt once, none lost
    files = sorted(p.name for p in (out / "runs").iterdir())
    assert len(files) == len(prompts) == len(set(files))
    lm = dl.load(str(tiny_folder))
    for prompt in prompts[:3] + prompts[-2:]:
        alone = lm.generate(prompt, max_new_tokens=24, progress=False)
        assert runs[runs.prompt == prompt].text.iloc[0] == alone.text
