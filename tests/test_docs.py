"""The documentation: the site builds with `--strict`, its examples run, and the benchmark results hook renders.

How the examples in `docs/` are tested:

- Every ```python block of every page under `docs/` runs (`test_page_examples_run`): a page's blocks in order, in
  one namespace, as a reader would paste them, on the default model (SmolLM2), in a temporary folder. Long runs are
  cut short (`SHRINK`: `max_new_tokens` at most 8, fewer seeds; 8 where no
  `max_new_tokens` is given). A new page's blocks are picked up by themselves.
- A block whose line just before the fence is the HTML comment `<!-- example not run: REASON -->` is not run.
  Readers do not see the comment. Use it only for examples that need what a test machine lacks: a GPU, several
  GPUs, an OpenAI-compatible server.
- Some examples are also run on a tiny model with assertions on what they give (`block_after(page, heading)`
  finds the first block under a heading): moving one of them means moving its heading with it.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import pytest

import decoderlab as dl

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

NOT_RUN = re.compile(r"<!--\s*example not run:\s*(.+?)\s*-->")
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
# What makes a page's examples quick on two CPU cores; each keeps the example's meaning.
SHRINK = [
    (re.compile(r"max_new_tokens=(\d+)"), lambda m: f"max_new_tokens={min(int(m.group(1)), 8)}"),
    (re.compile(r"max_length=(\d+)"), lambda m: f"max_length={min(int(m.group(1)), 72)}"),
    (re.compile(r"seeds=range\((\d+)\)"), lambda m: f"seeds=range({min(int(m.group(1)), 2)})"),
    (re.compile(r"\bdl\.load\(\)"), lambda m: "_default_lm"),
]


# ---- the pages' python blocks --------------------------------------------------------------------------------------
def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


def python_blocks(page: Path) -> list[tuple[str, str | None]]:
    """(code, reason it is not run or None) for every ```python block of a page, in order."""
    text = page.read_text(encoding="utf-8")
    blocks = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = NOT_RUN.search(before)
        blocks.append((m.group(1), skip.group(1) if skip else None))
    return blocks


def shrink(code: str) -> str:
    for pattern, repl in SHRINK:
        code = pattern.sub(repl, code)
    return code


def block_after(page: str, heading: str) -> str:
    """The first ```python block after `heading` in docs/`page`."""
    text = (DOCS / page).read_text(encoding="utf-8")
    start = text.index(heading)
    return FENCE.search(text, start).group(1)


RUNNABLE = [p for p in pages() if any(reason is None for _, reason in python_blocks(p))]


def test_every_page_with_examples_is_found():
    names = {p.relative_to(DOCS).as_posix() for p in RUNNABLE}
    assert {"index.md", "strategies.md", "record.md", "sessions.md", "compare.md", "errors.md"} <= names


def test_examples_not_run_say_why_and_are_few():
    """Only hardware or a server excuses an example; everything else runs."""
    skipped = [(p.name, reason) for p in pages() for _, reason in python_blocks(p) if reason is not None]
    for page, reason in skipped:
        assert re.search(r"GPU|server", reason), f"{page}: an example is not run for {reason!r}"
    assert {page for page, _ in skipped} <= {"api.md", "gpu.md", "scale.md"}, skipped


@pytest.mark.integration
@pytest.mark.parametrize("page", RUNNABLE, ids=[p.relative_to(DOCS).as_posix() for p in RUNNABLE])
def test_page_examples_run(page, smol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save write here
    # runs that give no max_new_tokens take the model's: short here (generate's default is 20)
    monkeypatch.setattr(smol.model.generation_config, "max_new_tokens", 8, raising=False)
    saved = dict(dl.STEP_RECORDERS)  # a page may register recorders: they leave with the test
    namespace = {"_default_lm": smol, "__name__": "__docs__"}
    try:
        for i, (code, reason) in enumerate(python_blocks(page)):
            if reason is not None:
                continue
            source = shrink(code)
            try:
                exec(compile(source, f"{page.relative_to(DOCS)} (block {i + 1})", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{page.name}, python block {i + 1}, fails:\n{source}") from err
    finally:
        dl.STEP_RECORDERS.clear()
        dl.STEP_RECORDERS.update(saved)


# ---- examples with assertions, on tiny models ----------------------------------------------------------------------
def test_ban_words_processor_example(tiny_lms):
    code = block_after("strategies.md", "## Your own decoding rule")
    lm = tiny_lms["llama"]
    plain = lm.generate("What is the capital of France?", chat=True, max_new_tokens=3, progress=False)
    namespace = {"lm": lm}
    # ban whatever the tiny model says first, to see the rule act
    code = code.replace('[" Paris", "Paris"]', repr([plain.tokens[0]]))
    code = code.replace("chat=True,", "chat=True, max_new_tokens=3, progress=False,")
    exec(compile(code, "docs/strategies.md", "exec"), namespace)
    trace = namespace["trace"]
    assert plain.token_ids[0] not in trace.token_ids
    removed = trace.processors.query("mass_removed > 0")
    assert 0 in removed.step.tolist()
    assert removed.processor.unique().tolist() == ["BanWords"]


def test_rows_example(tiny_lms):
    code = block_after("strategies.md", "## Rows: several seeds").replace(
        "do_sample=True,", "do_sample=True, max_new_tokens=5, progress=False,")
    namespace = {"lm": tiny_lms["llama"]}
    exec(compile(code, "docs/strategies.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.runs.seed.tolist() == [1, 2, 3]
    assert trace.row(1).text == trace.texts[1]


def test_schema_table_lists_every_array():
    from decoderlab.record.schema import SCHEMA

    text = (DOCS / "record.md").read_text(encoding="utf-8")
    text = text[text.index("## The trace schema"):]  # the Record table above has rows named like arrays
    for name, field in SCHEMA.items():
        row = re.search(rf"^\| `{name}`[^|]*\| ([^|]+) \| ([^|]+) \|", text, re.M)
        assert row, f"docs/record.md's schema table lacks {name}"
        assert row.group(1).strip() == ", ".join(field.dims) and row.group(2).strip() == field.dtype, name


def test_from_tokens_example():
    code = block_after("record.md", "## Traces from other sources").replace('trace.to_html("t.html")', "trace.to_html()")
    namespace = {"dl": dl}
    exec(compile(code, "docs/record.md", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.tokens == [" The", " cat", " sat"]
    assert trace.candidates.token.tolist() == [" The", " A", " dog", " cat", " sat", " ran"]


def test_what_if_example(tiny_lms):
    """The what-if block, as written, on a tiny model (the page uses SmolLM2)."""
    code = block_after("compare.md", "## What-if at one step").replace("seed=1,", "seed=1, progress=False,")
    namespace = {"lm": tiny_lms["llama"], "dl": dl}
    exec(compile(code, "docs/compare.md", "exec"), namespace)
    trace, w = namespace["trace"], namespace["w"]
    assert list(w.summary["strategy"]) == ["as run", "greedy", "top-k 5", "min-p 0.1", "penalty 1.3"]
    assert w.summary.iloc[0]["run_token_prob"] == pytest.approx(trace.steps["final_prob"][5], rel=5e-3)
    assert w.summary.set_index("strategy").loc["top-k 5", "kept"] == 5


# ---- the site ------------------------------------------------------------------------------------------------------
def test_site_builds_strictly(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip('mkdocs is not installed: pip install -e ".[docs]"')
    env = {k: v for k, v in os.environ.items() if k != "DECODERLAB_RESULTS_DIR"}
    env.update(NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "reference" / "lm" / "index.html").exists()


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with mkdocs: pip install -e \".[docs]\"")

    class Loader(yaml.SafeLoader):  # mkdocs.yml may carry !!python tags; the nav is plain
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    nav = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=Loader)["nav"]

    def files(item):
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for v in item.values():
                yield from files(v)
        elif isinstance(item, list):
            for v in item:
                yield from files(v)

    assert set(files(nav)) == {p.relative_to(DOCS).as_posix() for p in pages()}


# ---- the benchmark results hook ------------------------------------------------------------------------------------
def results_hook():
    spec = importlib.util.spec_from_file_location("docs_results_hook", DOCS / "hooks" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result_file(folder: Path, name: str, **overrides) -> Path:
    data = {"benchmark": name.split(".")[0], "title": f"{name} title", "command": f"python benchmarks/{name}.py --x 1",
            "date": "2026-12-01T10:00:00", "machine": {"cpu": "2 cores", "gpu": None},
            "versions": {"torch": "2.13.0", "transformers": "5.2"}, "settings": {"tokens": 256},
            "columns": ["run", "seconds", "tokens", "ratio"],
            "results": [{"ratio": 1.0, "run": "model.generate", "seconds": 17.4712, "tokens": 25600},
                        {"run": "Record() | all", "seconds": 0.000123, "tokens": 256, "ratio": 0.93612}],
            "summary": {"ratio": 0.936, "bar met": True}, "notes": "Measured on a quiet machine."}
    data.update(overrides)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_results_marker_renders_each_matching_file(tmp_path):
    hook = results_hook()
    result_file(tmp_path, "bench_x")
    result_file(tmp_path, "bench_x_gpu", title="on a GPU")
    result_file(tmp_path, "bench_y", title="not wanted")
    page, missing = hook.replace_markers("before\n\n<!-- results: bench_x* -->\n\nafter", tmp_path)
    assert missing == []
    assert page.index("bench_x title") < page.index("on a GPU") and "not wanted" not in page
    assert page.startswith("before") and page.rstrip().endswith("after") and "<!--" not in page
    assert "| run | seconds | tokens | ratio |" in page  # the columns' order, not the rows' key order
    assert "| model.generate | 17.5 | 25,600 | 1.00 |" in page
    assert "| Record() \\| all | 1.23e-04 | 256 | 0.936 |" in page  # a pipe in a cell is escaped
    assert "- ratio: **0.936**" in page and "- bar met: **yes**" in page
    assert "Measured on a quiet machine." in page
    small = re.search(r"<small>(.*?)</small>", page).group(1)
    for text in ("<code>python benchmarks/bench_x.py --x 1</code>", "2026-12-01T10:00:00", "cpu: 2 cores",
                 "gpu: –", "torch: 2.13.0", "tokens: 256"):
        assert text in small


def test_results_marker_leaves_out_files_marked_with_a_bang(tmp_path):
    hook = results_hook()
    result_file(tmp_path, "bench_widgets")
    result_file(tmp_path, "bench_widgets_compare")
    result_file(tmp_path, "bench_widgets_browser")
    page, _ = hook.replace_markers("<!-- results: bench_widgets* !bench_widgets_browser* -->", tmp_path)
    assert "bench_widgets title" in page and "bench_widgets_compare title" in page
    assert "bench_widgets_browser" not in page


def test_results_marker_matching_no_file_warns(tmp_path, caplog):
    hook = results_hook()
    result_file(tmp_path, "bench_x")
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.results"):
        page, missing = hook.replace_markers("<!-- results: bench_nothing* -->", tmp_path, where="benchmarks.md")
    assert missing == ["bench_nothing*"]
    assert any("bench_nothing*" in r.getMessage() and r.levelno == logging.WARNING and r.name.startswith("mkdocs")
               for r in caplog.records)  # mkdocs counts warnings of its loggers: --strict fails
    assert "No result file matches" in page


def test_results_file_that_cannot_be_read_warns(tmp_path, caplog):
    hook = results_hook()
    (tmp_path / "bench_bad.json").write_text("{not json", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="mkdocs.hooks.results"):
        page, missing = hook.replace_markers("<!-- results: bench_bad -->", tmp_path)
    assert missing == [] and "could not be read" in page
    assert any("bench_bad.json" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("value, text", [(None, "–"), (float("nan"), "–"), (True, "yes"), (1234567, "1,234,567"),
                                         (12345.6, "12,346"), (382.24, "382.2"), (1.0, "1.00"), (0.93612, "0.936"),
                                         (14.65, "14.7"), (0.0, "0"), (0.00012345, "1.23e-04"), ("text", "text")])
def test_results_numbers_are_formatted(value, text):
    assert results_hook().format_value(value) == text


def test_the_pages_markers_name_the_benchmarks():
    """Each benchmark's results appear on a page: the markers the docs hold."""
    texts = [p.read_text() for p in pages()]
    markers = {m.strip() for t in texts for m in re.findall(r"<!--\s*results:\s*(.*?)\s*-->", t)}
    # A benchmark without a result file for this version is named, with its command, in a note that says so
    unmeasured = {m for t in texts
                  for note in re.findall(r'!!! note "No result file for this version yet"\n((?: {4}.*\n?)+)', t)
                  for m in re.findall(r"benchmarks/(bench_\w+)\.py", note)}
    expected = {"bench_overhead": "bench_overhead*", "bench_compare": "bench_compare*", "bench_memory": "bench_memory*",
                "bench_outputs": "bench_outputs*", "bench_seed_loop": "bench_seed_loop*",
                "bench_widgets": "bench_widgets* !bench_widgets_browser*",
                "bench_widgets_browser": "bench_widgets_browser*", "bench_fast": "bench_fast*",
                "bench_study": "bench_study*"}
    for script, marker in expected.items():
        assert marker in markers or script in unmeasured, f"{script}: neither a results marker nor a note"
    assert {"bench_overhead*", "bench_compare*", "bench_fast*", "bench_memory*", "bench_outputs*",
            "bench_seed_loop*", "bench_widgets* !bench_widgets_browser*", "bench_study*"} <= markers  # the files kept in the repository
