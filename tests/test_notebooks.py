"""The notebooks: stored without outputs, and each runs top to bottom on the default model.

Why: notebooks rot silently when the API moves, and outputs committed by accident bloat the repo and
go stale. Executing with nbclient (no browser) checks every cell's Python; test_browser.py checks
what the front end shows. The kernel is the `python3` spec that this venv's Jupyter resolves to this
interpreter, and a probe cell proves it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 300


# Lines a notebook prints that check what it shows (a round trip, a cross-check): running without errors is not
# enough, the check must come out True.
CHECKS = {
    "03_attention_and_lens": ["row length = prompt length + step: True"],
    "07_sampler_playground": ["what-if from a forward agrees with the recorded logits: True",
                              "generate with the playground's words:"],
    "08_beam_tree": ["returned rows' scores = their finished candidates' normalised scores: True"],
    "09_save_and_share": ["every frame round-trips: True", "TraceFileError:"],
    "10_score_and_recorders": ["scored again, same probabilities: True", "margin saved and loaded: True"],
    "11_dola_and_contrastive": ["DoLa's layer is the candidate with the largest divergence at every step: True",
                                "contrastive chose the highest score at every step: True"],
    "13_beyond_the_anchors": ["commit layer = where the last run of top-1 layers begins: True",
                              "knobs agree with what_if: True", "fork step = where the two runs first differ: True",
                              "path of seed 5 = its run alone: True"],
    "12_sessions_rewind_fork": ["forced token's probability matches lm.score: True",
                                "rewound and stepped again, same tokens: True", "SessionError:"],
}


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_step_through.ipynb", "02_distributions.ipynb", "03_attention_and_lens.ipynb",
                     "04_custom_decoder.ipynb", "05_compare_strategies.ipynb",
                     "06_api_models.ipynb", "07_sampler_playground.ipynb", "08_beam_tree.ipynb",
                     "09_save_and_share.ipynb", "10_score_and_recorders.ipynb",
                     "11_dola_and_contrastive.ipynb", "12_sessions_rewind_fork.ipynb",
                     "13_beyond_the_anchors.ipynb"]
    assert set(CHECKS) <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    spec = nb["metadata"].get("kernelspec", {})
    assert spec.get("name") == "python3" and spec.get("display_name") == "Python 3", spec
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs: run `python tools/strip_notebooks.py`"
    assert nb["cells"][0]["cell_type"] == "markdown"
    code = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    assert "%matplotlib inline" in code


@pytest.fixture(scope="module")
def kernel_env():
    """The kernel inherits these: offline, and one math thread (two threads on two cores stall at times)."""
    saved = dict(os.environ)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.browser
@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_env, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.prefix)"))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(tmp_path)}})  # cwd: nothing lands in the repo
    t0 = time.time()
    client.execute()
    print(f"\n[timing] {path.name}: {time.time() - t0:.1f}s")

    streams = [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code" for o in c.outputs]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, o in streams if o.output_type == "error"]
    assert not errors, errors
    tracebacks = [(i, o.text) for i, o in streams
                  if o.output_type == "stream" and o.name == "stderr" and "Traceback" in o.text]
    assert not tracebacks, tracebacks
    probe = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream")
    assert Path(probe.split("KERNEL", 1)[1].strip()) == Path(sys.prefix), f"not this venv's kernel: {probe}"
    widgets = [o for _, o in streams if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets, "the notebook should display a widget (dl.show or dl.explore)"
    printed = "".join(o.text for _, o in streams if o.output_type == "stream" and o.name == "stdout")
    missing = [line for line in CHECKS.get(path.stem, []) if line not in printed]
    assert not missing, f"{path.name} did not print {missing}"
