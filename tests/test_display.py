"""`decoderlab.views.display` and `decoderlab.formats`: the one place for what the plots, the HTML page and the
widgets share.

Checked here: each shared helper does what the views rely on; formats.py and display.py load nothing heavy;
the view modules import each other one way only; and the views' former private copies are gone.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decoderlab import plots
from decoderlab.views import display, figures
from decoderlab.views import html
from decoderlab.views import trace_view as widgets
from decoderlab.views.display import (char_escape, escape, format_prob, is_invisible, prob_colour, short_processor,
                                strategy_summary, token_label)
from decoderlab.trace.trace import Trace

PACKAGE = Path(display.__file__).resolve().parent
VIEWS = ("display", "plots", "html", "trace_view")


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
    """Importing formats.py and display.py loads neither matplotlib, torch, ipywidgets, numpy nor pandas."""
    code = ("import sys, importlib.util\n"
            "import decoderlab.views.display as mod\n"
            "assert mod.prob_colour(1.0) == '#67a9cf'\n"
            "print(sorted(m for m in ('matplotlib', 'ipywidgets') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    for name in ("display.py", "../formats.py"):  # the modules themselves import only the standard library
        body = ast.parse((PACKAGE / name).read_text(encoding="utf-8")).body  # what runs (not TYPE_CHECKING's)
        imported = {a.name.split(".")[0] for n in body if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in body if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert imported <= {"__future__", "html", "math", "unicodedata", "functools", "typing"}, (name, imported)


def _imports(module: str) -> set[str]:
    """The view modules `module` imports anywhere (inside functions too), except under TYPE_CHECKING."""
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
    return found


def test_view_modules_import_one_way():
    graph = {p.stem: _imports(p.stem) for p in PACKAGE.glob("*.py")}
    assert graph["display"] == set()
    assert graph["plots"] == {"display", "figures", "fonts", "layer_plots"}
    # plots only inside the function that draws the PNG; panels (numpy and display) for the commit strip
    assert graph["html"] == {"display", "panels", "plots"}
    assert "trace_view" not in graph["html"] | graph["plots"] and "html" not in graph["trace_view"]
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
    assert figures.PROB_SCALE is display.PROB_SCALE
    assert "prob_color" not in widgets.__all__ and not hasattr(widgets, "prob_color")
    twins = {plots: ("_rows_alive", "_short_processor", "_fmt_p"),
             html: ("_e", "_fmt", "_alive_steps", "_strategy_summary"),
             widgets: ("_label", "_fmt_p", "_esc", "_short_processor")}
    for module, names in twins.items():
        assert not [n for n in names if hasattr(module, n)], module.__name__
    for module in (plots, html, widgets):  # views read a trace through its frames and accessors only
        assert not re.search(r"\.arrays\b", Path(module.__file__).read_text(encoding="utf-8")), module.__name__


def test_visible_text_defuses_terminal_escapes_and_bidi_overrides():
    from decoderlab.views.display import visible_text

    hostile = "ok\x1b[2J\x1b]0;owned\x07 \u202eevil\u202c\nnext\tcol 😀\u200d🔥 中"
    out = visible_text(hostile)
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\u202c" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\x07" in out
    assert "\nnext\tcol" in out and "😀\u200d🔥 中" in out  # newlines, tabs, emoji sequences and CJK as they are
    assert visible_text("plain text") == "plain text"
