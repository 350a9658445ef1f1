"""The command line streams tokens, prints the per-step table, saves, and explains bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import decoderlab as dl
from decoderlab import cli
from decoderlab.formats import format_prob


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_help_explains_every_flag():
    out = run("--help")
    assert out.returncode == 0
    for command in cli.COMMANDS:
        assert command in out.stdout
    out = run("generate", "--help")
    for flag in ("--chat", "--max-new-tokens", "--top-k", "--top-p", "--temperature", "--seed", "--model", "--save",
                 "--min-p", "--repetition-penalty"):
        assert flag in out.stdout


def test_every_command_and_flag_has_help():
    import argparse

    p = cli.parser()
    commands = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(cli.COMMANDS)
    listed = {c.dest for c in commands._choices_actions}
    assert listed == set(cli.COMMANDS), "every command shows in --help with a line of its own"
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"decoderlab {dl.__version__}"


def test_defaults_are_the_python_apis():
    import inspect

    args = cli.parser().parse_args(["generate", "hello"])
    assert cli.generate_words(args) == {}  # nothing passed: lm.generate's own defaults hold
    args = cli.parser().parse_args(["compare", "hello", "--strategy", "greedy"])
    defaults = inspect.signature(dl.compare).parameters
    assert args.max_new_tokens == defaults["max_new_tokens"].default
    assert list(range(args.seeds)) == list(defaults["seeds"].default)


def test_flags_become_generates_words():
    args = cli.parser().parse_args(["generate", "hi", "--min-p", "0.1", "--repetition-penalty", "1.3", "--seed", "4",
                                    "--max-new-tokens", "5", "--no-repeat-ngram-size", "2"])
    assert cli.generate_words(args) == {"min_p": 0.1, "repetition_penalty": 1.3, "seed": 4, "max_new_tokens": 5,
                                        "no_repeat_ngram_size": 2, "do_sample": True}
    args = cli.parser().parse_args(["generate", "hi", "--penalty-alpha", "0.6", "--top-k", "4", "--dola-layers", "2,4"])
    assert cli.generate_words(args) == {"penalty_alpha": 0.6, "top_k": 4, "dola_layers": [2, 4]}
    args = cli.parser().parse_args(["generate", "hi", "--num-beams", "3"])
    assert cli.generate_words(args) == {"num_beams": 3, "num_return_sequences": 3}


def test_a_prompt_without_a_command_is_generate():
    assert cli.main(["--model", "/no/such/model", "hello"]) == 2  # parsed as generate; the bad path is named


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


@pytest.mark.integration
def test_sampling_flags_make_generates_tokens():
    out = run("generate", "Name a colour.", "--chat", "--min-p", "0.05", "--repetition-penalty", "1.3", "--seed", "3",
              "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    lm = dl.load()
    trace = lm.generate("Name a colour.", chat=True, min_p=0.05, repetition_penalty=1.3, seed=3, do_sample=True,
                        max_new_tokens=8, progress=False)
    assert out.stdout.startswith(trace.text)
    assert "MinPLogitsWarper" in trace.processors.processor.unique()


@pytest.mark.integration
def test_score_prints_each_token_and_the_total():
    out = run("score", "The capital of France is", " Paris, a city.")
    assert out.returncode == 0, out.stderr
    trace = dl.load().score("The capital of France is", " Paris, a city.")
    total = trace.steps.logprob.sum()
    assert f"model log-probability {total:.4f}" in out.stdout
    rows = out.stdout.splitlines()[2:2 + trace.num_steps]
    assert [r.split()[0] for r in rows] == [str(i) for i in range(trace.num_steps)]
    for row, token, prob in zip(rows, trace.tokens, trace.steps.prob):
        assert repr(token) in row and format_prob(prob) in row


@pytest.mark.integration
def test_lab_starts_jupyterlab_on_the_notebooks(tmp_path):
    """`make lab` is `decoderlab lab notebooks`: JupyterLab answers, serving the notebooks folder."""
    import json
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "run"))
    proc = subprocess.Popen([sys.executable, "-m", "decoderlab", "lab", "notebooks", "--no-browser", f"--port={port}",
                             "--ServerApp.token=t", "--ServerApp.ip=127.0.0.1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, listing = time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents?token=t", timeout=2) as r:
                    listing = json.load(r)
                break
            except OSError:
                time.sleep(0.5)
        assert listing is not None, proc.stdout.read() if proc.poll() is not None else "no answer in 180 s"
        names = {item["name"] for item in listing["content"]}
        assert "01_step_through.ipynb" in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.integration
def test_attention_lens_and_html_flags_record_and_write(tmp_path):
    out = run("generate", "Hi", "--max-new-tokens", "3", "--attention", "--lens", "--save", str(tmp_path / "r.parquet"),
              "--html", str(tmp_path / "r.html"))
    assert out.returncode == 0, out.stderr
    trace = dl.Trace.load(tmp_path / "r.parquet")
    assert trace.num_steps == 3 and len(trace.attention_layers) > 0 and len(trace.lens) > 0
    assert "<html" in (tmp_path / "r.html").read_text(encoding="utf-8").lower()
