"""`decoderlab.display`: the one place for what the plots, the HTML page and the widgets share.

Checked here: each shared helper does what the views rely on; display.py loads nothing heavy; the
view modules import each other one way only; and the views' former private copies are gone.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decoderlab import display, html, plots, widgets
from decoderlab.display import (char_escape, escape, format_prob, is_invisible, prob_colour, short_processor,
                                strategy_summary, token_label)
from decoderlab.trace import Trace

PACKAGE = Path(display.__file__).resolve().parent
VIEWS = ("display", "plots", "html", "widgets")


# ---- the helpers ---------------------------------------------------------------------------------------
def test_prob_colour_spans_the_scale_and_clamps():
    assert [prob_colour(p) for p in (0.0, 0.5, 1.0)] == list(display.PROB_SCALE)
    assert prob_colour(0.25) == "#f3c0ac"  # halfway between red and white
    assert prob_colour(7) == prob_colour(1.0) and prob_colour(-1) == prob_colour(0.0)
    assert prob_colour(None) == prob_colour(float("nan")) == prob_colour(0.0)
    assert prob_colour(np.float32(0.75)) == prob_colour(0.75)


@pytest.mark.parametrize("p, text", [(0.7311, "0.731"), (1.0, "1.000"), (0.0, "0.000"), (0.001, "0.001"),
                                     (3.2e-05, "3.2e-05"), (None, "–"), (float("nan"), "–"),
                                     (np.float64(0.25), "0.250")])
def test_format_prob(p, text):
    assert format_prob(p) == text


def test_escape_makes_any_value_safe_inside_attributes():
    assert escape('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"
    assert escape(None) == "None" and escape(3) == "3"


@pytest.mark.parametrize("name, short", [("TopKLogitsWarper", "TopK"), ("TemperatureLogitsWarper", "Temperature"),
                                         ("RepetitionPenaltyLogitsProcessor", "RepetitionPenalty"),
                                         ("BanWordsProcessor", "BanWords"), ("BanWords", "BanWords"),
                                         ("Warper", "Warper")])
def test_short_processor(name, short):
    assert short_processor(name) == short


def test_the_per_character_mark_is_shared_by_labels_and_running_text():
    assert [is_invisible(ch) for ch in ("\x1b", "\u200b", "\ue000", "\u2028", "\u200d", "a", " ", "\u00a0")] == [
        True, True, True, True, False, False, False, False]
    assert [char_escape(ch) for ch in ("\x1b", "\u200b", "\U000e0001")] == ["\\x1b", "\\u200b", "\\U000e0001"]
    assert token_label("a\x1bb\u200b") == "a\\x1bb\\u200b"  # the label writes the same escape ...
    frag = html._visible_text("a\x1bb")  # ... as the HTML's running text
    assert frag == 'a<span class="dlh-mark">\\x1b</span>b'


def test_strategy_summary_names_the_chooser_and_what_acted():
    tr = Trace(prompt="p", prompt_ids=np.array([0]), arrays={}, token_text={0: "p"}, chooser="sample",
               strategy={"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 1.0, "repetition_penalty": 1.0,
                         "max_new_tokens": 8, "seed": 3, "eos_token_id": [2], "chooser": "greedy"})
    assert strategy_summary(tr) == ("chooser: sample · do_sample=True · temperature=0.7 · top_k=20 · "
                                    "max_new_tokens=8 · seed=3")  # neutral top_p and penalty left out
    scored = Trace(prompt="p", prompt_ids=np.array([0]), arrays={}, token_text={0: "p"}, chooser="given")
    assert strategy_summary(scored) == "chooser: given"


# ---- one module, loaded alone ---------------------------------------------------------------------------
def test_display_loads_nothing_heavy():
    """display.py, run as a file outside the package: it must import only the standard library."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('display_alone', {str(PACKAGE / 'display.py')!r})\n"
            "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
            "assert mod.prob_colour(1.0) == '#67a9cf'\n"
            "print(sorted(m for m in ('matplotlib', 'torch', 'ipywidgets', 'numpy', 'pandas', 'decoderlab')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _imports(module: str) -> set[str]:
    """The decoderlab modules `module` imports anywhere (inside functions too), except under TYPE_CHECKING."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("decoderlab."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("decoderlab."))
    return found


def test_view_modules_import_one_way():
    graph = {p.stem: _imports(p.stem) for p in PACKAGE.glob("*.py")}
    assert graph["display"] == set()
    assert graph["plots"] == {"display"}
    assert graph["html"] == {"display", "plots"}  # plots only inside the function that draws the PNG
    assert "widgets" not in graph["html"] | graph["plots"] and "html" not in graph["widgets"]
    for view in VIEWS:  # no module that a view reaches imports it back
        seen, todo = set(), list(graph[view])
        while todo:
            m = todo.pop()
            if m not in seen and m in graph:
                seen.add(m)
                todo.extend(graph[m])
        assert view not in seen, f"{view} is imported back by a module it imports"


def test_one_definition_each():
    assert plots.token_label is token_label  # re-exported: users call plots.token_label
    assert plots.PROB_SCALE is display.PROB_SCALE
    assert "prob_color" not in widgets.__all__ and not hasattr(widgets, "prob_color")
    twins = {plots: ("_rows_alive", "_short_processor", "_fmt_p"),
             html: ("_e", "_fmt", "_alive_steps", "_strategy_summary"),
             widgets: ("_label", "_fmt_p", "_esc", "_short_processor")}
    for module, names in twins.items():
        assert not [n for n in names if hasattr(module, n)], module.__name__
    for module in (plots, html, widgets):  # views read a trace through its frames and accessors only
        assert not re.search(r"\.arrays\b", Path(module.__file__).read_text(encoding="utf-8")), module.__name__


def test_visible_text_defuses_terminal_escapes_and_bidi_overrides():
    from decoderlab.display import visible_text

    hostile = "ok\x1b[2J\x1b]0;owned\x07 \u202eevil\u202c\nnext\tcol 😀\u200d🔥 中"
    out = visible_text(hostile)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\u202c" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\x07" in out
    assert "\nnext\tcol" in out and "😀\u200d🔥 中" in out  # newlines, tabs, emoji sequences and CJK as they are
    assert visible_text("plain text") == "plain text"
