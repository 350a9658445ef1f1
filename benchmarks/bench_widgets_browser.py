"""How fast the widgets answer a click in a browser: bench_widgets.py's actions, timed in headless Chromium driving
JupyterLab, from the click (or key press) in the page until the page shows the new content.

    .venv/bin/python benchmarks/bench_widgets_browser.py [--steps 40] [--repeats 15] [--open-repeats 5]
    .venv/bin/python benchmarks/bench_widgets_browser.py --only show explore playground compare

Why a second benchmark: bench_widgets.py times what the kernel spends; a reader also waits for the messages to
reach JupyterLab and for the browser to draw them (the session explorer's "next token" took 333 ms in a browser
for 136 ms in Python). The page, the server and the kernel share this machine's cores, as they do for a reader.

How: JupyterLab (tests/browser_support.py's throw-away server) opens a notebook this script writes, which builds
the default model's trace view, session explorer, sampler playground and comparison view as bench_widgets.py does.
For each action, a MutationObserver in the page watches the widget's content (its panels, labels, token buttons);
the clock starts at the input event's own timestamp (the key press, the click, the select's change) and
stops at the last change of the watched content, once the content shows what the action must show (a check per
action: the step label names the new step, the status says "decoded", a panel changed, ...) and nothing has
changed for `--settle-ms`. Each group of views (show, explore, playground, compare) is timed with only its own
views on the page (a page's other widgets slow its drawing). "first change" is the first change anywhere in the
widget (the slider moving, the explorer's "working…"): when the page shows that it is working. Opening a view is
timed from running its cell.
Each action is warmed up twice, then repeated `--repeats` times (opening: `--open-repeats`); median, p90, worst.
The budget: median <= 200 ms, worst <= 400 ms. Needs Debian's chromium and the playwright package (never
`playwright install`); writes benchmarks/results/bench_widgets_browser-chromium.json (`--out`). With
DL_BENCH_DEBUG=1 it prints each action's times and which watched part changed when (where the time goes).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _results import add_out_argument, p90, write  # noqa: E402
from browser_support import CHROMIUM, CHROMIUM_ARGS, KERNEL_IDLE, missing_requirements, start_lab  # noqa: E402

BUDGET_MEDIAN_MS, BUDGET_WORST_MS = 200, 400
PROMPT = "Tell me a long story about a lighthouse keeper and a storm."  # bench_widgets.py's
NOTEBOOK = "bench_widgets_browser.ipynb"
GROUPS = ("show", "explore", "playground", "compare")

# ---- the page's clock -------------------------------------------------------------------------------------------
# arm(): watch a cell's widget; the promise it leaves in window.__dlPending resolves with the times (ms after the
# input event) once the check holds and the watched content has been still for `settle` ms (and the kernel idle).
ARM = r"""([cellIndex, rootSel, watch, checkBody, marks, arg, settle, timeout, runCell, sameOk]) => {
  const nb = window.jupyterapp.shell.currentWidget;
  const cell = nb.content.widgets[cellIndex].node;
  const root = () => rootSel ? cell.querySelector(rootSel) : cell;
  const read = () => watch.map(s => { const e = cell.querySelector(s); return e ? e.innerHTML : null; });
  const check = new Function('root', 'arg', 'before', checkBody);
  const markFns = Object.fromEntries(Object.entries(marks).map(([k, b]) => [k, new Function('root', 'arg', b)]));
  const kernel = () => nb.sessionContext.session && nb.sessionContext.session.kernel;
  const before = read();
  if (!runCell && check(root(), arg, before)) throw new Error('the check holds before the action: ' + checkBody);
  const st = {start: null, first: null, lastChange: null, okAt: null, marks: {}, seen: before.slice(), log: [],
              busy: null, idleAt: null};
  // the kernel's busy -> idle after the input: it has answered (for a move whose answer looks the same as before)
  const k0 = kernel();
  const onStatus = (_, status) => {
    if (st.start === null) return;
    if (status !== 'idle') st.busy = performance.now(); else if (st.busy !== null) st.idleAt = performance.now();
  };
  if (k0) k0.statusChanged.connect(onStatus);
  const onInput = e => { if (st.start === null) st.start = e.timeStamp; };
  const inputs = ['keydown', 'click', 'input', 'change'];  // a click counts when it is one (the button's up)
  inputs.forEach(t => window.addEventListener(t, onInput, true));
  const look = () => {
    const now = read();
    if (st.start === null) {  // what lands before the input (a previous action's last message) is not this one's
      now.forEach((v, i) => { st.seen[i] = v; before[i] = v; });
      return;
    }
    const t = performance.now();
    now.forEach((v, i) => {
      if (v !== st.seen[i]) { st.seen[i] = v; st.lastChange = t; st.log.push([i, t - st.start]); }
    });
    const r = root();
    for (const [k, f] of Object.entries(markFns)) if (!(k in st.marks) && r && f(r, arg)) st.marks[k] = t;
    if (st.okAt === null && r && check(r, arg, before)) st.okAt = t;
  };
  const obs = new MutationObserver(() => {
    if (st.start !== null && st.first === null) st.first = performance.now();
    look();
  });
  obs.observe(cell, {subtree: true, childList: true, characterData: true, attributes: true});
  const t0 = performance.now();
  window.__dlPending = new Promise((resolve, reject) => {
    const done = (f) => { obs.disconnect(); inputs.forEach(t => window.removeEventListener(t, onInput, true));
                          if (k0) k0.statusChanged.disconnect(onStatus); f(); };
    const tick = () => {
      const now = performance.now();
      look();
      const k = kernel();
      const idle = !k || k.status === 'idle';
      const still = st.lastChange === null || now - st.lastChange >= settle;
      const marked = Object.keys(markFns).every(m => m in st.marks);
      const rel = t => t === null || t === undefined ? null : t - st.start;
      const m = () => Object.fromEntries(Object.entries(st.marks).map(([k, t]) => [k, rel(t)]));
      if (st.okAt !== null && marked && idle && still) {
        return done(() => resolve({done: rel(Math.max(st.lastChange || st.okAt, st.okAt)), first: rel(st.first),
                                   check: rel(st.okAt), marks: m(), log: st.log, same: false}));
      }
      if (sameOk && st.okAt === null && st.idleAt !== null && marked && idle && still && now - st.idleAt >= settle) {
        return done(() => resolve({done: rel(Math.max(st.lastChange || st.idleAt, st.idleAt)), first: rel(st.first),
                                   check: null, marks: m(), log: st.log, same: true}));
      }
      if (now - t0 > timeout) {
        return done(() => reject(new Error(`no answer in ${timeout} ms (check ${st.okAt !== null}, marks ` +
                                           `${JSON.stringify(st.marks)}, kernel ${k && k.status}): ${checkBody}`)));
      }
      setTimeout(tick, 5);
    };
    setTimeout(tick, 5);
  });
  if (runCell) {
    nb.content.activeCellIndex = cellIndex;
    nb.content.deselectAll();
    st.start = performance.now();
    window.jupyterapp.commands.execute('notebook:run-cell');
  }
  return true;
}"""

CELL_RAN = """([i, count]) => { const nb = window.jupyterapp.shell.currentWidget; const c = nb.content.widgets[i];
  return c.model.executionCount !== null && c.model.executionCount !== count
         && nb.sessionContext.session?.kernel?.status === 'idle'; }"""
CELL_ERRORS = """(i) => { const c = window.jupyterapp.shell.currentWidget.content.widgets[i];
  const out = []; for (let j = 0; j < c.model.outputs.length; j++) { const o = c.model.outputs.get(j).toJSON();
  if (o.output_type === 'error') out.push(o.ename + ': ' + o.evalue + '\\n' + (o.traceback || []).join('\\n'));
  if (o.output_type === 'stream' && o.name === 'stderr' && /Traceback|Error/.test(o.text)) out.push(o.text); }
  return out; }"""
CLEAR_OUTPUT = """(i) => { window.jupyterapp.shell.currentWidget.content.widgets[i].model.outputs.clear(); }"""


# ---- the notebook ---------------------------------------------------------------------------------------------------
def cells(args: argparse.Namespace) -> dict[str, str]:
    """The notebook's code cells by name, in order: a setup, then each view as bench_widgets.py builds it, and the
    cells re-run to time opening a view."""
    return {
        "setup": f"""import dataclasses, os
import torch
import decoderlab as dl
from decoderlab.views.compare_view import ComparisonView
from decoderlab.views.playground import Playground
from decoderlab.views.session_explorer import SessionExplorer
from decoderlab.views.trace_view import TraceView
torch.set_num_threads({args.threads})
lm = dl.load()
PROMPT, STEPS, RECORD = {PROMPT!r}, {args.steps}, dl.Record(attention=True, lens=True)
print(lm.name, torch.get_num_threads())""",
        "show": """trace = lm.generate(PROMPT, chat=True, max_new_tokens=STEPS, eos_token_id=[], progress=False,
                     record=RECORD)
TraceView(trace, step=0)""",
        "show_open": "TraceView(trace)",
        "explore": """session = lm.session(PROMPT, chat=True, eos_token_id=[], record=RECORD)
session.step(STEPS)
SessionExplorer(session)""",
        "playground": """sampled = lm.generate(PROMPT, chat=True, max_new_tokens=STEPS, eos_token_id=[], progress=False,
                      do_sample=True, top_p=0.9, seed=0, record=dl.Record(logits=True))
bare = dataclasses.replace(sampled, arrays={k: v for k, v in sampled.arrays.items() if k != "logits"})
Playground(sampled, step=STEPS - 1)""",
        "playground_open": "Playground(sampled, step=STEPS - 1)",
        "playground_open_bare": "Playground(bare, step=STEPS - 1, lm=lm)",
        "compare": f"""import sys
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
from bench_compare import STRATEGIES
strategies = {{name: {{**words, "eos_token_id": []}} for name, words in STRATEGIES.items()}}
cmp = dl.compare(lm, [PROMPT, "Write a short story about a lighthouse keeper."], strategies,
                 seeds=range({args.compare_seeds}), max_new_tokens={args.compare_tokens}, chat=True, progress=False)
ComparisonView(cmp)""",
        "compare_open": "ComparisonView(cmp)",
    }


def write_notebook(path: Path, sources: dict[str, str]) -> None:
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in sources.values()])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


# ---- driving the page -------------------------------------------------------------------------------------------
class Bench:
    """One page on one notebook: runs its cells and times actions (see the module docstring)."""

    def __init__(self, page, names: list[str], settle_ms: int, timeout_ms: int):
        self.page, self.names, self.settle, self.timeout = page, names, settle_ms, timeout_ms
        self.results: dict[str, list[float]] = {}
        self.first: dict[str, list[float]] = {}
        self.same: dict[str, int] = {}  # answers that looked as before (timed to the kernel's idle)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def cell(self, name: str):
        return self.page.locator(".jp-Notebook .jp-Cell").nth(self.index(name))

    def run(self, name: str, timeout_s: float = 900) -> None:
        """Run one cell and wait until it is done and the kernel idle; raise its error, if any."""
        i = self.index(name)
        count = self.page.evaluate(f"window.jupyterapp.shell.currentWidget.content.widgets[{i}].model.executionCount")
        self.page.evaluate(CLEAR_OUTPUT, i)
        self.page.evaluate(f"""() => {{ const nb = window.jupyterapp.shell.currentWidget;
            nb.content.activeCellIndex = {i}; nb.content.deselectAll();
            window.jupyterapp.commands.execute('notebook:run-cell'); }}""")
        self.page.wait_for_function(CELL_RAN, arg=[i, count], timeout=timeout_s * 1000, polling=100)
        errors = self.page.evaluate(CELL_ERRORS, i)
        if errors:
            raise RuntimeError(f"cell {name!r} failed:\n" + "\n".join(errors)[-3000:])

    def time(self, label: str | None, cell: str, root: str | None, watch: list[str], check: str,
             action: Callable[[], Any] | None, arg: Any = None, marks: dict[str, str] | None = None,
             same_ok: bool = False) -> dict:
        """Arm the page's clock on `cell`, do `action` (None: run the cell), wait for the answer; keep its time
        under `label` (None: a warm-up, not kept). With `same_ok`, an answer that looks as before (a top-p move
        that keeps the same tokens) counts when the kernel has answered: busy, then idle."""
        self.page.wait_for_function(KERNEL_IDLE, timeout=self.timeout)
        if action is None:
            self.page.evaluate(CLEAR_OUTPUT, self.index(cell))
            self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)))")
        self.page.evaluate(ARM, [self.index(cell), root, watch, check, marks or {}, arg, self.settle, self.timeout,
                                 action is None, same_ok])
        if action is not None:
            action()
        got = self.page.evaluate("() => window.__dlPending")
        if os.environ.get("DL_BENCH_DEBUG"):
            print(label, {k: v for k, v in got.items() if k != "log"}, [(watch[i].split()[-1], round(t)) for i, t in
                                                                       got["log"]], file=sys.stderr)
        if label is not None:
            self.results.setdefault(label, []).append(got["done"] / 1000)
            self.same[label] = self.same.get(label, 0) + bool(got.get("same"))
            if got["first"] is not None:
                self.first.setdefault(label, []).append(got["first"] / 1000)
            for mark, t in (got.get("marks") or {}).items():  # a mark is kept under its own label
                self.results.setdefault(mark, []).append(t / 1000)
        return got


def text_has(sel: str, js_expr: str) -> str:
    """A check's body: the text of `sel` in the widget passes `js_expr` (a function of `t`, the text, and `arg`)."""
    return f"const e = root.querySelector({sel!r}); if (!e) return false; const t = e.innerText; return {js_expr};"


def changed(watch_root: str, watch: list[str]) -> str:
    """A check's body: some watched element's content differs from before the action."""
    sels = json.dumps([f"{watch_root} {w}".strip() for w in watch])
    return (f"const sels = {sels}; const cell = root.closest('.jp-Cell') || root;"
            "return sels.some((s, i) => { const e = cell.querySelector(s); "
            "return (e ? e.innerHTML : null) !== before[i]; });")


def option_texts(select) -> list[str]:
    """A select's options as text (an option's inner text is empty where the list is closed)."""
    return select.evaluate("s => [...s.options].map(o => o.text.replace(/\\s+/g, ' ').trim())")


def show_actions(b: Bench, args: argparse.Namespace, rng: random.Random) -> None:
    root = ".dl-trace-view"
    watch = [f"{root} {s}" for s in (".dl-step-label", ".dl-distribution", ".dl-processors", ".dl-attention",
                                     ".dl-lens", ".dl-text")]
    step_is = text_has(".dl-step-label", "t.includes('step ' + arg + ' ')")
    view = b.cell("show").locator(root)
    handle = view.locator(".dl-step-slider").get_by_role("slider")
    tokens = view.locator(".dl-token")
    opened = "return !!root.querySelector('.dl-trace-view .dl-step-label') && root.querySelector('.dl-trace-view " \
             ".dl-step-label').innerText.includes('step ');"
    for label in [None, None] + ["show: open the view"] * args.open_repeats:
        b.time(label, "show_open", None, watch, opened, None)
    step, way = 0, 1  # the view opened on step 0: the slider walks to steps not shown before (back at the end)
    handle.focus()
    for label in [None, None] + ["show: move the step slider"] * args.repeats:
        if not 0 <= step + way < args.steps:
            way = -way
        step += way
        b.time(label, "show", root, watch, step_is,
               lambda k="ArrowRight" if way > 0 else "ArrowLeft": handle.press(k), step)
    unseen = list(range(max(step, args.repeats + 2) + 1, args.steps)) or list(range(args.steps))
    rng.shuffle(unseen)
    for i, label in enumerate([None, None] + ["show: click a token"] * args.repeats):
        s = unseen[i % len(unseen)]
        if s == int(re.search(r"step (\d+)", view.locator(".dl-step-label").inner_text()).group(1)):
            s = (s + 1) % args.steps
        b.time(label, "show", root, watch, step_is, lambda s=s: tokens.nth(s).click(), s)
    for what, css, text in (("layer", ".dl-layer", "layer {}, "), ("head", ".dl-head", ", head {}")):
        select = view.locator(f"{css} select")
        options = [o for o in option_texts(select) if o.strip().isdigit()]
        for label in [None, None] + [f"show: pick a {what}"] * args.repeats:
            current = select.evaluate("s => s.options[s.selectedIndex] ? s.options[s.selectedIndex].text : ''")
            pick = rng.choice([o for o in options if o != current])
            want = text.format(pick)
            b.time(label, "show", root, watch, text_has(".dl-attention", f"t.includes({want!r})"),
                   lambda p=pick: select.select_option(label=p))


def explore_actions(b: Bench, args: argparse.Namespace) -> None:
    root = ".dl-explorer"
    watch = [f"{root} {s}" for s in (".dl-status", ".dl-candidates", ".dl-text", ".dl-step-label",
                                     ".dl-distribution", ".dl-attention", ".dl-lens", ".dl-branches")]
    ex = b.cell("explore").locator(root)
    says = lambda word: text_has(".dl-status", f"t.includes({word!r}) && !t.includes('working')")  # noqa: E731
    for label_of in [lambda _: None] * 2 + [lambda name: f"explore: {name}"] * args.repeats:
        b.time(label_of("next token"), "explore", root, watch, says("decoded"), lambda: ex.locator(".dl-next").click())
        b.time(label_of("force a candidate"), "explore", root, watch, says("forced"),
               lambda: ex.locator(".dl-candidate").nth(1).click())
        b.time(label_of("rewind one step"), "explore", root, watch, says("rewound"),
               lambda: ex.locator(".dl-rewind").click())
        b.time(label_of("fork"), "explore", root, watch, says("forked"), lambda: ex.locator(".dl-fork").click())
        select = ex.locator(".dl-branches select")
        texts = option_texts(select)
        parent = next((i for i, t in enumerate(texts) if t.startswith("0 ")), None)
        if parent is None:
            raise RuntimeError(f"no branch 0 among {texts}")
        b.time(label_of("switch branch"), "explore", root, watch, says("showing branch 0"),
               lambda: select.select_option(index=parent))


def playground_actions(b: Bench, args: argparse.Namespace, rng: random.Random) -> None:
    root = ".dl-playground"
    watch = [f"{root} {s}" for s in (".dl-playground-header", ".dl-playground-summary", ".dl-playground-bars",
                                     ".dl-playground-processors", ".dl-playground-progress",
                                     ".dl-playground-problems")]
    filled_js = "const e = root.querySelector('.dl-playground .dl-playground-summary'); " \
                "return !!e && e.innerText.includes('kept');"
    for label in [None] + ["playground: open"] * args.open_repeats:
        b.time(label, "playground_open", None, watch, filled_js, None)
    computing = "const e = root.querySelector('.dl-playground .dl-playground-progress'); " \
                "return !!e && e.innerText.includes('computing logits');"
    for warm in [True] + [False] * args.open_repeats:  # the first frame (greyed, "computing logits…"), then filled
        b.time(None if warm else "playground: open without logits, filled in", "playground_open_bare", None, watch,
               filled_js, None, marks={} if warm else {"playground: open without logits, first frame": computing})
    view = b.cell("playground").locator(root)
    any_change = changed("", watch)
    from decoderlab.views.playground import SLIDER_WORDS  # the knobs and their grids (imports torch: only here)

    # each knob set to values from its grid it does not hold, as bench_widgets.py does (one arrow key step often
    # keeps the same tokens: nothing to draw): typed into the slider's readout, timed from the Enter key
    for word, (_, lo, hi, inc, _) in SLIDER_WORDS.items():
        css = word.replace("_", "-")
        readout = view.locator(f".dl-playground-{css} .widget-readout")
        grid = [round(lo + i * inc, 2) for i in range(int(round((hi - lo) / inc)) + 1)]
        for label in [None, None] + [f"playground: move {css}"] * args.repeats:
            now = float(readout.inner_text())
            value = rng.choice([v for v in grid if abs(v - now) > 1e-9])
            readout.click()
            readout.press("Control+A")
            readout.type(str(int(value)) if word == "top_k" else f"{value:.2f}")
            b.time(label, "playground", root, watch, any_change, lambda: readout.press("Enter"), same_ok=True)
        view.locator(".dl-playground-reset").click()
        b.page.wait_for_function(KERNEL_IDLE, timeout=b.timeout)
    handle = view.locator(".dl-playground-step").get_by_role("slider")
    handle.focus()
    step = args.steps - 1
    for label in [None, None] + ["playground: move the step"] * args.repeats:
        step = step - 1 if step > 0 else args.steps - 1
        key = "ArrowLeft" if step < args.steps - 1 else "End"
        b.time(label, "playground", root, watch,
               text_has(".dl-playground-header", "t.includes('step ' + arg + ' ')"), lambda k=key: handle.press(k),
               step)


def compare_actions(b: Bench, args: argparse.Namespace, rng: random.Random) -> None:
    root = ".dl-cmp-view"
    watch = [f"{root} {s}" for s in (".dl-cmp-grid", ".dl-cmp-divergence", ".dl-cmp-selected", ".dl-cmp-candidates",
                                     ".dl-cmp-processors", ".dl-cmp-explorer")]
    opened = "const e = root.querySelector('.dl-cmp-view .dl-cmp-selected'); return !!e && !!root.querySelector(" \
             "'.dl-cmp-view .dl-cmp-tokens');"
    for label in [None] + ["compare: open the view"] * args.open_repeats:
        b.time(label, "compare_open", None, watch, opened, None)
    lines_are = "return root.querySelectorAll('.dl-cmp-tokens').length === arg;"
    grid_changed = changed("", [watch[0]])
    seeds = args.compare_seeds
    n_strategies, sampling = 8, 5  # bench_compare.STRATEGIES: five sample, three run once
    picks = [("compare: pick a seed", ".dl-cmp-seed", lambda: f"seed {rng.randrange(1, seeds)}", None),
             ("compare: all seeds", ".dl-cmp-seed", lambda: "all seeds", n_strategies - sampling + sampling * seeds),
             ("compare: pick a prompt", ".dl-cmp-prompt", lambda: 1, None)]
    view = b.cell("compare_open").locator(root)
    for name, css, value, lines in picks:
        if seeds < 2 and css == ".dl-cmp-seed":
            continue
        for label in [None] + [name] * args.open_repeats:  # a view keeps the lines it built: a fresh view each time
            b.time(None, "compare_open", None, watch, opened, None)
            select = view.locator(f"{css} select")
            v = value()
            pick = (lambda v=v: select.select_option(index=v)) if isinstance(v, int) else \
                (lambda v=v: select.select_option(label=v))
            b.time(label, "compare_open", root, watch, lines_are if lines else grid_changed, pick, lines)
    view = b.cell("compare").locator(root)
    if seeds > 1:
        view.locator(".dl-cmp-seed select").select_option(label="all seeds")
    b.page.wait_for_function(KERNEL_IDLE, timeout=b.timeout)
    time.sleep(args.settle_ms / 1000)
    lines = view.locator(".dl-cmp-tokens")
    n_lines = lines.count()
    unused = [(i, s) for i in range(n_lines) for s in range(args.compare_tokens)]
    rng.shuffle(unused)
    selected = text_has(".dl-cmp-selected", "new RegExp('step ' + arg + '\\\\b').test(t)")

    def another() -> tuple[int, int]:
        """A token not clicked before, at a step other than the one selected (the check must not hold already)."""
        now = re.search(r"step (\d+)", view.locator(".dl-cmp-selected").inner_text() or "")
        for k, (i, s) in enumerate(unused):
            if not now or s != int(now.group(1)):
                return unused.pop(k)
        return unused.pop()

    def click(i: int, s: int) -> Callable[[], Any]:
        return lambda: lines.nth(i).locator(f"button[value='{s}']").click()

    for label in [None] + ["compare: click a token"] * args.repeats:
        i, s = another()
        b.time(label, "compare", root, watch, selected, click(i, s), s)
    header = view.locator(".dl-cmp-steps")
    for label in [None] + ["compare: click a step number"] * args.repeats:
        _, s = another()
        b.time(label, "compare", root, watch, selected, lambda s=s: header.locator(f"button[value='{s}']").click(), s)
    opened_at = ("const e = root.querySelector('.dl-cmp-explorer'); return !!e && e.innerHTML !== before[5] && "
                 "e.innerText.includes('step ' + arg + ' ');")
    for label in [None] + ["compare: open in the trace view"] * args.repeats:
        i, s = another()
        b.time(None, "compare", root, watch, selected, click(i, s), s)
        b.time(label, "compare", root, watch, opened_at, lambda: view.locator(".dl-cmp-open").click(), s)
    toggles = view.locator(".dl-cmp-strategy")
    for label in [None] + ["compare: hide or show a strategy"] * args.repeats:
        k = rng.randrange(toggles.count())
        count = lines.count()
        b.time(label, "compare", root, watch, "return root.querySelectorAll('.dl-cmp-tokens').length !== arg;",
               lambda k=k: toggles.nth(k).click(), count)


# ---- the report -------------------------------------------------------------------------------------------------
COLUMNS = ["action", "steps", "repeats", "median ms", "p90 ms", "worst ms", "first change median ms",
           "median <= 200 ms", "worst <= 400 ms"]


def report(b: Bench, args: argparse.Namespace) -> list[dict]:
    print(f"{'action':<50} {'steps':>5} {'median ms':>10} {'p90 ms':>7} {'worst ms':>9} {'first ms':>9}  "
          "budget (200 / 400 ms)")
    rows = []
    for name, ts in b.results.items():
        if not ts:
            continue
        steps = args.compare_tokens if name.startswith("compare") else args.steps
        med, high, worst = 1000 * statistics.median(ts), 1000 * p90(ts), 1000 * max(ts)
        first = 1000 * statistics.median(b.first[name]) if b.first.get(name) else None
        ok = med <= BUDGET_MEDIAN_MS and worst <= BUDGET_WORST_MS
        print(f"{name:<50} {steps:>5} {med:10.0f} {high:7.0f} {worst:9.0f} "
              f"{'' if first is None else f'{first:9.0f}':>9}  {'ok' if ok else 'MISSED'}", flush=True)
        rows.append(dict(zip(COLUMNS, [name, steps, len(ts), round(med, 1), round(high, 1), round(worst, 1),
                                       None if first is None else round(first, 1), med <= BUDGET_MEDIAN_MS,
                                       worst <= BUDGET_WORST_MS])))
    return rows


def chromium_version() -> str | None:
    import subprocess

    try:
        return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="the traces' length (new tokens)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--open-repeats", type=int, default=5, help="times each view is opened (a cell run each)")
    ap.add_argument("--only", nargs="*", choices=GROUPS, default=list(GROUPS))
    ap.add_argument("--compare-seeds", type=int, default=5)
    ap.add_argument("--compare-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in the kernel (the browser and the server need a core too)")
    ap.add_argument("--settle-ms", type=int, default=400, help="how long the content must be still to count as done")
    ap.add_argument("--timeout-s", type=float, default=120, help="the longest one action may take")
    ap.add_argument("--seed", type=int, default=0)
    add_out_argument(ap)
    args = ap.parse_args()
    missing = missing_requirements()
    if missing:
        sys.exit(f"cannot run: {missing}")
    if args.steps < 4:
        sys.exit("--steps: at least 4")
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    sources = cells(args)
    wanted = {"show": ["show", "show_open"], "explore": ["explore"],
              "playground": ["playground", "playground_open", "playground_open_bare"],
              "compare": ["compare", "compare_open"]}
    rng = random.Random(args.seed)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="dl-bench-browser-") as tmp:
        lab = start_lab(Path(tmp))
        try:
            write_notebook(lab.root / NOTEBOOK, sources)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
                page = browser.new_context(viewport={"width": 1400, "height": 2000}).new_page()
                page.set_default_timeout(args.timeout_s * 1000)
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(lab.url(NOTEBOOK))
                page.wait_for_function(KERNEL_IDLE, timeout=180_000)
                page.evaluate("window.jupyterapp.shell.collapseLeft()")
                b = Bench(page, list(sources), args.settle_ms, int(args.timeout_s * 1000))
                b.run("setup")
                for group in [g for g in GROUPS if g in args.only]:
                    t0 = time.time()
                    for name in wanted[group]:
                        b.run(name)
                    {"show": lambda: show_actions(b, args, rng), "explore": lambda: explore_actions(b, args),
                     "playground": lambda: playground_actions(b, args, rng),
                     "compare": lambda: compare_actions(b, args, rng)}[group]()
                    for name in wanted[group]:  # a view left on the page would slow the next group's drawing
                        page.evaluate(CLEAR_OUTPUT, b.index(name))
                    print(f"  {group}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
                if errors:
                    raise RuntimeError(f"the page raised: {errors}")
                browser.close()
        finally:
            lab.shutdown_kernels()
            lab.stop()
    rows = report(b, args)
    slowest = max(rows, key=lambda r: r["median ms"]) if rows else None
    write(__file__, title="How fast the widgets answer a click in a browser (headless Chromium, JupyterLab, default "
          "model, CPU)", settings=args, columns=COLUMNS, results=rows,
          summary={"actions": len(rows), "median_met": sum(r["median <= 200 ms"] for r in rows),
                   "worst_met": sum(r["worst <= 400 ms"] for r in rows),
                   "all_met": all(r["median <= 200 ms"] and r["worst <= 400 ms"] for r in rows),
                   "slowest": slowest and slowest["action"], "slowest_median_ms": slowest and slowest["median ms"],
                   "budget": f"median <= {BUDGET_MEDIAN_MS} ms, worst <= {BUDGET_WORST_MS} ms",
                   "wall_s": round(time.time() - started)},
          label="chromium", extra_versions={"jupyterlab": _version("jupyterlab"), "ipywidgets": _version("ipywidgets"),
                                            "ipykernel": _version("ipykernel"), "chromium": chromium_version()},
          notes="From the input event in the page (key press, click, select change; for opening, the cell's run) to "
                "the last change of the widget's watched content once it shows the answer; 'first change' is the first "
                "change anywhere in the widget (the page showing that it works). The page, the JupyterLab server and "
                f"the kernel share the machine's cores; the kernel ran torch with {args.threads} thread(s)."
                + same_note(b))


def same_note(b: Bench) -> str:
    """Which moves answered with panels that looked as before (timed to the kernel's idle), if any."""
    same = {k: v for k, v in b.same.items() if v}
    if not same:
        return ""
    return (" Moves whose answer looked as before (the same tokens kept), timed to the kernel's idle: "
            + ", ".join(f"{k} {v} of {len(b.results[k])}" for k, v in same.items()) + ".")


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
