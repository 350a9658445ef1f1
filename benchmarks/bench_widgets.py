"""How fast the widgets answer a click: every action of `show`, `explore` and `playground`, timed in the Python process.

    .venv/bin/python benchmarks/bench_widgets.py [--steps 40 400] [--repeats 7] [--open-repeats 3] [--model PATH]
    .venv/bin/python benchmarks/bench_widgets.py --only compare [--repeats 7]      # or: show explore playground

The default model, `Record(attention=True, lens=True)`, a chat answer of exactly N tokens (EOS off); the
playground's trace is sampled (top_p=0.9, generate's default top_k=50) with `Record(logits=True)`;
`dl.show(cmp)` shows `dl.compare` of bench_compare.py's eight strategies x 5 seeds x 64 tokens on two prompts.
An action's time is from the call that a click makes (a slider's new value, a button's handler) until
it returns, every widget updated: what the kernel spends before the browser draws anything. Each
action runs `--repeats` times, on steps not shown before (nothing cached from an earlier repeat);
the table gives the median, the 90th percentile and the worst. The budget (README): median <= 200 ms,
worst <= 400 ms. The playground on a trace without logits opens at once ("first frame": the widget, greyed,
saying it computes the logits) and fills in after one forward of the row ("filled in", `--open-repeats` times).
The table is also written to benchmarks/results/bench_widgets-cpu[-<groups>].json (`--out`);
benchmarks/bench_widgets_browser.py times the same actions in a browser.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import decoderlab as dl
from _results import add_out_argument, p90, write
from bench_compare import STRATEGIES as COMPARE_STRATEGIES
from decoderlab.views.compare_view import ComparisonView
from decoderlab.views.playground import SLIDER_WORDS, Playground
from decoderlab.views.session_explorer import SessionExplorer
from decoderlab.views.trace_view import TraceView

PROMPT = "Tell me a long story about a lighthouse keeper and a storm."
RECORD = dl.Record(attention=True, lens=True)
BUDGET_MEDIAN_MS, BUDGET_WORST_MS = 200, 400
GROUPS = ("compare", "show", "explore", "playground", "beyond")  # the order they run in


def timed(fn, view=None) -> float:
    """Seconds `fn` takes; a panel that failed would be fast for the wrong reason, so none of `view`'s may have (a
    view without a problems panel, the sample tree's, is given as None)."""
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    if view is not None and view.problems.value:
        raise RuntimeError(f"a panel failed, the timing is void: {view.problems.value}")
    return took


def trace_view_actions(lm, steps: int, repeats: int, rng: random.Random) -> dict[str, list[float]]:
    trace = lm.generate(PROMPT, chat=True, max_new_tokens=steps, eos_token_id=[], progress=False, record=RECORD)
    view = TraceView(trace)
    out: dict[str, list[float]] = {"show: open the view": [timed(lambda: TraceView(trace), view)]}
    unseen = list(range(steps - 1))
    rng.shuffle(unseen)
    out["show: move the step slider"] = [timed(lambda s=s: setattr(view.slider, "value", s), view)
                                         for s in unseen[:repeats]]
    buttons = view._token_buttons
    out["show: click a token"] = [timed(lambda s=s: buttons[s].click(), view) for s in unseen[repeats: 2 * repeats]]
    layers = [v for _, v in view.layer.options if v != "every"]
    out["show: pick a layer"] = [timed(lambda v=v: setattr(view.layer, "value", v), view)
                                 for v in rng.sample(layers, min(repeats, len(layers)))]
    heads = [v for _, v in view.head.options if v not in ("mean",)]
    out["show: pick a head"] = [timed(lambda v=v: setattr(view.head, "value", v), view)
                                for v in rng.sample(heads, min(repeats, len(heads)))]
    return out


def explorer_actions(lm, steps: int, repeats: int) -> dict[str, list[float]]:
    session = lm.session(PROMPT, chat=True, eos_token_id=[], record=RECORD)
    session.step(steps)
    ex = SessionExplorer(session)
    out: dict[str, list[float]] = {k: [] for k in ("explore: next token", "explore: force a candidate",
                                                  "explore: rewind one step", "explore: fork",
                                                  "explore: switch branch")}
    for _ in range(repeats):
        out["explore: next token"].append(timed(lambda: ex.next_button.click(), ex.view))
        cand = ex.candidates.children[1]  # the model's second choice
        out["explore: force a candidate"].append(timed(lambda: cand.click(), ex.view))
        ex.rewind_to.value = ex.session.steps - 1
        out["explore: rewind one step"].append(timed(lambda: ex.rewind_button.click(), ex.view))
        out["explore: fork"].append(timed(lambda: ex.fork_button.click(), ex.view))
        out["explore: switch branch"].append(timed(lambda: setattr(ex.branches, "value", ex.session.parent), ex.view))
        if "dl-error" in ex.status._dom_classes:
            raise RuntimeError(f"an action failed, the timing is void: {ex.status.value}")
    return out


def playground_actions(lm, steps: int, repeats: int, rng: random.Random,
                       open_repeats: int = 1) -> dict[str, list[float]]:
    """The sampler playground: open it (recorded logits; or without: the first frame, and filled in after one
    forward of the row), move each knob, move the step."""
    trace = lm.generate(PROMPT, chat=True, max_new_tokens=steps, eos_token_id=[], progress=False, do_sample=True,
                        top_p=0.9, seed=0, record=dl.Record(logits=True))
    bare = dataclasses.replace(trace, arrays={k: v for k, v in trace.arrays.items() if k != "logits"})
    view = Playground(trace, step=steps - 1)
    out: dict[str, list[float]] = {
        "playground: open": [timed(lambda: Playground(trace, step=steps - 1), view) for _ in range(open_repeats)],
        "playground: open without logits, first frame": [
            timed(lambda: Playground(bare, step=steps - 1, lm=lm), view) for _ in range(repeats)],
        "playground: open without logits, filled in": [
            timed(lambda: Playground(bare, step=steps - 1, lm=lm).wait(), view) for _ in range(open_repeats)],
    }
    for word, (label, lo, hi, inc, _) in SLIDER_WORDS.items():
        slider = view.sliders[word]
        grid = [round(lo + i * inc, 2) for i in range(int(round((hi - lo) / inc)) + 1)]
        values = rng.sample([v for v in grid if v != slider.value], repeats)  # a value it has would not redraw
        if word == "top_k":
            values = [int(v) for v in values]
        out[f"playground: move {label}"] = [timed(lambda v=v: setattr(slider, "value", v), view) for v in values]
        view.reset()
    unseen = rng.sample(range(steps - 1), repeats)
    out["playground: move the step"] = [timed(lambda s=s: setattr(view.step_slider, "value", s), view) for s in unseen]
    return out


def beyond_actions(lm, steps: int, repeats: int, rng: random.Random) -> dict[str, list[float]]:
    """The views of the questions beyond the anchors in the trace view: the commit strip (its first frame, and
    filled in: the lens of every step), a click with the strip shown, and which knob decided (the click's first
    frame, filled in: 132 grid points, and a step seen before)."""
    trace = lm.generate(PROMPT, chat=True, max_new_tokens=steps, eos_token_id=[], progress=False, do_sample=True,
                        top_p=0.9, seed=0, record=dl.Record(lens=True, logits=True))
    fresh = lambda: dataclasses.replace(trace, arrays=dict(trace.arrays), lens_done=None)  # noqa: E731 (lens not computed)
    out: dict[str, list[float]] = {}
    views = [TraceView(fresh()) for _ in range(repeats)]
    out["commit strip: first frame (open the view)"] = [timed(lambda: TraceView(fresh()), views[0])
                                                       for _ in range(repeats)]
    out["commit strip: filled in (lens of every step)"] = [timed(lambda v=v: v.wait(), v)
                                                          for v in views[: max(1, repeats // 3)]]
    view = views[0]
    unseen = list(range(steps - 1))
    rng.shuffle(unseen)
    out["commit strip: move the step, strip shown"] = [timed(lambda s=s: setattr(view.slider, "value", s), view)
                                                      for s in unseen[:repeats]]
    knobs = view.knobs_panel
    knobs.toggle.value = True
    knobs.wait()
    first, filled = [], []
    for s in unseen[repeats: 2 * repeats]:
        first.append(timed(lambda s=s: setattr(view.slider, "value", s), view))
        filled.append(timed(knobs.wait, view))
        if "dl-error" in knobs.body.value or "Error" in knobs.body.value:
            raise RuntimeError(f"the knobs panel failed, the timing is void: {knobs.body.value}")
    out["knobs: click a step, first frame"] = first
    out["knobs: filled in (132 settings)"] = [a + b for a, b in zip(first, filled)]
    out["knobs: a step seen before"] = [timed(lambda s=s: setattr(view.slider, "value", s), view)
                                       for s in unseen[repeats: 2 * repeats]]
    out.update(tree_actions(lm, steps, repeats, rng))
    return out


def tree_actions(lm, steps: int, repeats: int, rng: random.Random, n: int = 64) -> dict[str, list[float]]:
    """`dl.show(lm.sample_tree(...))`: open it (n runs of `steps` tokens), and choose a node or a split."""
    tree = lm.sample_tree(PROMPT, chat=True, n=n, max_new_tokens=steps, eos_token_id=[], progress=False)
    out: dict[str, list[float]] = {f"tree: open ({n} runs)": [timed(lambda: dl.show(tree))]}
    view = dl.show(tree)
    nodes = [v for _, v in view.node_picker.options if v != view.node_picker.value]
    parts = [v for _, v in view.part_picker.options if v >= 0]
    out["tree: choose a node"] = [timed(lambda v=v: setattr(view.node_picker, "value", v))
                                  for v in rng.sample(nodes, min(repeats, len(nodes)))]
    out["tree: choose a split"] = [timed(lambda v=v: setattr(view.part_picker, "value", v))
                                   for v in rng.sample(parts, min(repeats, len(parts)))]
    return out


COMPARE_PROMPTS = [PROMPT, "Write a short story about a lighthouse keeper."]
COMPARE_TOKENS = 64


def compare_actions(lm, repeats: int, rng: random.Random, seeds: int = 5) -> dict[str, list[float]]:
    """`dl.show(cmp)`: open it, and each pick and click. A pick that builds lines not shown before (a seed, all
    seeds, a prompt) is timed on a fresh view each repeat: a view keeps every line it has built."""
    strategies = {name: {**words, "eos_token_id": []} for name, words in COMPARE_STRATEGIES.items()}
    cmp = dl.compare(lm, COMPARE_PROMPTS, strategies, seeds=range(seeds), max_new_tokens=COMPARE_TOKENS, chat=True,
                     progress=False)
    view = ComparisonView(cmp)
    out: dict[str, list[float]] = {"compare: open the view": [timed(lambda: ComparisonView(cmp), view)
                                                              for _ in range(repeats)]}
    picks = {"compare: pick a seed": ("seed_picker", lambda: rng.randrange(1, seeds)),
             "compare: all seeds": ("seed_picker", lambda: "all"), "compare: pick a prompt": ("prompt_picker", lambda: 1)}
    for name, (picker, value) in picks.items():
        out[name] = []
        for _ in range(repeats):
            fresh = ComparisonView(cmp)
            out[name].append(timed(lambda v=value(): setattr(getattr(fresh, picker), "value", v), fresh))
    view.seed_picker.value = "all"  # every run: 28 lines
    lines = [w for w in view.grid.children if "dl-cmp-tokens" in w._dom_classes]
    clicks = rng.sample([(i, s) for i in range(len(lines)) for s in range(COMPARE_TOKENS)], 2 * repeats)
    out["compare: click a token"] = [timed(lambda i=i, s=s: setattr(lines[i], "index", s), view)
                                     for i, s in clicks[:repeats]]
    out["compare: click a step number"] = [timed(lambda s=s: setattr(view.steps_header, "index", s), view)
                                           for _, s in clicks[repeats:]]
    out["compare: open in the trace view"] = []
    for i, s in rng.sample([(i, s) for i in range(len(lines)) for s in range(COMPARE_TOKENS)], repeats):
        lines[i].index = s
        out["compare: open in the trace view"].append(timed(view.open_button.click, view))
    buttons = list(view.strategy_buttons.values())
    out["compare: hide or show a strategy"] = []
    for b in rng.sample(buttons, min(repeats, len(buttons))):
        out["compare: hide or show a strategy"].append(timed(lambda b=b: setattr(b, "value", not b.value), view))
    return out


def report(results: dict[str, list[float]], steps: int) -> list[dict]:
    """Print one line per action; return the result file's rows."""
    rows = []
    for name, ts in results.items():
        med, high, worst = 1000 * statistics.median(ts), 1000 * p90(ts), 1000 * max(ts)
        ok = "ok" if med <= BUDGET_MEDIAN_MS and worst <= BUDGET_WORST_MS else "MISSED"
        print(f"{name:<44} {steps:>5} {med:10.0f} {high:7.0f} {worst:9.0f}  {ok}", flush=True)
        rows.append({"action": name, "steps": steps, "repeats": len(ts), "median ms": round(med, 1),
                     "p90 ms": round(high, 1), "worst ms": round(worst, 1), "median <= 200 ms": med <= BUDGET_MEDIAN_MS,
                     "worst <= 400 ms": worst <= BUDGET_WORST_MS})
    return rows


COLUMNS = ["action", "steps", "repeats", "median ms", "p90 ms", "worst ms", "median <= 200 ms", "worst <= 400 ms"]


def summarize(rows: list[dict]) -> dict:
    """The headline: how many actions meet the budget, and the slowest."""
    slowest = max(rows, key=lambda r: r["median ms"]) if rows else None
    return {"actions": len(rows), "median_met": sum(r["median <= 200 ms"] for r in rows),
            "worst_met": sum(r["worst <= 400 ms"] for r in rows),
            "all_met": all(r["median <= 200 ms"] and r["worst <= 400 ms"] for r in rows),
            "slowest": None if slowest is None else f"{slowest['action']} ({slowest['steps']} steps)",
            "slowest_median_ms": None if slowest is None else slowest["median ms"],
            "budget": f"median <= {BUDGET_MEDIAN_MS} ms, worst <= {BUDGET_WORST_MS} ms"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[40, 400])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="+", choices=["all", *GROUPS], default=["all"],
                    help="time every widget (all), or these: show, explore, playground, compare, beyond")
    ap.add_argument("--open-repeats", type=int, default=1,
                    help="times to open the playground (with logits, and without until filled in: one forward each)")
    add_out_argument(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = dl.load(args.model)
    rng = random.Random(0)
    print(f"model={lm.name} threads={torch.get_num_threads()} record={RECORD}")
    print(f"{'action':<44} {'steps':>5} {'median ms':>10} {'p90 ms':>7} {'worst ms':>9}  budget (200 / 400 ms)")
    groups = list(GROUPS) if "all" in args.only else [g for g in GROUPS if g in args.only]
    rows = []
    if "compare" in groups:
        rows += report(compare_actions(lm, args.repeats, rng), COMPARE_TOKENS)
    for steps in args.steps if set(groups) - {"compare"} else []:
        results = {}
        if "show" in groups:
            results.update(trace_view_actions(lm, steps, args.repeats, rng))
        if "explore" in groups:
            results.update(explorer_actions(lm, steps, args.repeats))
        if "playground" in groups:
            results.update(playground_actions(lm, steps, args.repeats, rng, args.open_repeats))
        if "beyond" in groups:
            results.update(beyond_actions(lm, steps, args.repeats, rng))
        rows += report(results, steps)
    part = "every widget" if groups == list(GROUPS) else ", ".join(groups)
    write(__file__, title=f"How fast the widgets answer a click, in the Python process ({part}, {lm.name}, CPU)",
          settings=args, columns=COLUMNS, results=rows, summary=summarize(rows),
          label="-".join(["cpu"] + ([] if groups == list(GROUPS) else groups)),
          notes=f"threads={torch.get_num_threads()}; from the call a click makes until it returns, every widget "
                "updated (what the kernel spends before the browser draws); steps not shown before; "
                "'steps' is the trace's length (the comparison's tokens for dl.show(cmp)).")


if __name__ == "__main__":
    main()
