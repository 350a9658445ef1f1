"""The command line streams tokens, prints the per-step table, saves, and explains bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import decoderlab as dl
from decoderlab import cli


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_explains_every_flag():
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--chat", "--max-new-tokens", "--top-k", "--top-p", "--temperature", "--seed", "--model", "--save"):
        assert flag in out.stdout


def test_table_lists_every_step(tiny_lms):
    trace = tiny_lms["llama"].generate("table", max_new_tokens=4, progress=False)
    text = cli.table(trace)
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["step", "token", "prob", "rank", "entropy"]
    assert len(lines) == 2 + trace.num_steps
    assert repr(trace.tokens[0]) in lines[2]


@pytest.mark.integration
def test_capital_of_france_offline(tmp_path):
    out = run("What is the capital of France?", "--chat", "--save", str(tmp_path / "run.parquet"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The capital of France is Paris.")
    assert "top alternatives" in out.stdout and "' Paris'" in out.stdout
    trace = dl.Trace.load(tmp_path / "run.parquet")
    assert trace.text == "The capital of France is Paris."


@pytest.mark.integration
def test_bad_input_is_a_clear_error():
    out = run("hello", "--top-p", "1.5")
    assert out.returncode == 2 and "top_p=1.5" in out.stderr and "Traceback" not in out.stderr
    out = run("hello", "--model", "/no/such/model")
    assert out.returncode == 2 and "/no/such/model" in out.stderr


@pytest.mark.integration
def test_unwritable_save_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = run("Hi", "--max-new-tokens", "2", "--save", str(blocker / "run.parquet"))
    assert out.returncode == 2 and "cannot save" in out.stderr and "Traceback" not in out.stderr
    assert "step" in out.stdout  # the table was printed before the save failed


@pytest.mark.integration
def test_beam_search_prints_the_best_sequence_and_every_beams_score():
    out = run("What is the capital of France?", "--chat", "--num-beams", "3", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    lm = dl.load()
    trace = lm.generate("What is the capital of France?", chat=True, num_beams=3, num_return_sequences=3,
                        max_new_tokens=12, progress=False)
    assert out.stdout.startswith(trace.text)
    listed = out.stdout.split("beams returned, best first")[1].strip().splitlines()[1:]
    assert len(listed) == 3
    for line, r in zip(listed, trace.runs.itertuples()):
        assert line.split()[:2] == [str(r.row), f"{r.score:.4f}"]



def test_strategy_words_are_parsed():
    assert cli.strategy_words("greedy") == {}
    assert cli.strategy_words("top_p=0.9") == {"top_p": 0.9, "do_sample": True}
    assert cli.strategy_words("top_k=50, temperature=0.7") == {"top_k": 50, "temperature": 0.7, "do_sample": True}
    assert cli.strategy_words("num_beams=4,early_stopping=never") == {"num_beams": 4, "early_stopping": "never"}
    with pytest.raises(ValueError, match="name=value"):
        cli.strategy_words("nucleus")


@pytest.mark.integration
def test_compare_prints_one_line_per_strategy():
    out = run("compare", "Write one sentence about the sea.", "--chat", "--strategy", "greedy", "--strategy",
              "top_p=0.9", "--seeds", "2", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["strategy", "runs", "length"]
    assert lines[1].split()[:2] == ["greedy", "1"] and lines[2].split()[:2] == ["top_p=0.9", "2"]
