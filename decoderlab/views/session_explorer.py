"""The session explorer (`dl.explore`): a live session, local or on a server, with next token, force a candidate,
rewind, fork and a branch picker above the trace view of the branch shown. Every action updates the view in
place; the same actions are methods for code and tests.
"""
from __future__ import annotations

from typing import Callable

import ipywidgets as W

from ..backends.branching import BranchingSession
from . import panels
from .display import format_prob, format_rank, is_missing, token_label
from .kit import classed, token_colour
from .trace_view import TraceView

__all__ = ["explore", "SessionExplorer"]

# Every candidate button shares one layout and one style per colour (to 1%), and gets its CSS class in its
# constructor: a step's eight new buttons are eight widgets for the front end to make, not eight times three
# widgets and their updates (what made "next token" slow in a browser; see benchmarks/bench_widgets_browser.py).
CANDIDATE_LAYOUT = W.Layout(width="auto", height="26px", margin="1px", padding="0 6px")
_CANDIDATE_STYLES: dict[str, W.ButtonStyle] = {}


def candidate_style(prob: float) -> W.ButtonStyle:
    """The shared style of a candidate button: its background by probability, to 1%."""
    colour = token_colour(prob)
    style = _CANDIDATE_STYLES.get(colour)
    if style is None:
        style = _CANDIDATE_STYLES[colour] = W.ButtonStyle(button_color=colour)
    return style


# ----------------------------------------------------------------------------------
class SessionExplorer(W.VBox):
    """A live session: the trace view of the shown branch, plus next token, force a candidate,
    rewind, fork and a branch picker. Every action updates the view in place.

    The same actions are methods (`next`, `force`, `rewind`, `fork`, `show_branch`) for code and tests.
    """

    def __init__(self, session: BranchingSession, *, k: int = 8, window: int = 40, lens_layers: int = 16):
        self.session = session  # the branch shown
        self.k = k
        self._busy = False

        self.next_button = classed(W.Button(description="next token", icon="step-forward",
                                             tooltip="decode one token with the strategy",
                                             layout=W.Layout(width="130px")), "dl-next")
        self.next10_button = classed(W.Button(description="+10 tokens", icon="fast-forward",
                                               tooltip="decode ten tokens (stops at EOS)",
                                               layout=W.Layout(width="120px")), "dl-next-10")
        self.rewind_to = classed(W.BoundedIntText(value=0, min=0, max=0, description="to step",
                                                   layout=W.Layout(width="150px")), "dl-rewind-to")
        self.rewind_button = classed(W.Button(description="rewind", icon="undo",
                                               tooltip="keep the tokens before this step, drop the rest",
                                               layout=W.Layout(width="100px")), "dl-rewind")
        self.fork_button = classed(W.Button(description="fork", icon="code-fork",
                                             tooltip="start a new branch from here (this one is kept)",
                                             layout=W.Layout(width="90px")), "dl-fork")
        self.branches = classed(W.Dropdown(description="branch", layout=W.Layout(width="360px")), "dl-branches")
        self.candidates = classed(W.Box(layout=W.Layout(display="flex", flex_flow="row wrap", align_items="center",
                                                         width="100%")), "dl-candidates")
        self.status = classed(W.HTML(), "dl-status")
        self.view = TraceView(session.trace, k=max(k, 10), window=window, lens_layers=lens_layers, commitment=False)

        self.next_button.on_click(lambda _: self._act(self.next))
        self.next10_button.on_click(lambda _: self._act(lambda: self.next(10)))
        self.rewind_button.on_click(lambda _: self._act(lambda: self.rewind(int(self.rewind_to.value))))
        self.fork_button.on_click(lambda _: self._act(self.fork))
        self.branches.observe(self._on_branch, names="value")

        toolbar = W.HBox([self.next_button, self.next10_button, self.rewind_to, self.rewind_button,
                          self.fork_button, self.branches],
                         layout=W.Layout(flex_flow="row wrap", align_items="center"))
        force = W.HBox([W.HTML("<b style='white-space:nowrap'>force the next token:</b>",
                               layout=W.Layout(margin="0 6px 0 0", flex="0 0 auto")),
                        self.candidates], layout=W.Layout(align_items="center", width="100%"))
        super().__init__([toolbar, force, self.status, self.view], layout=W.Layout(width="100%"))
        self.add_class("dl-explorer")
        self._refresh(message="ready: press “next token”, or click a candidate to force it")

    # ---- actions (also callable from code) -------------------------------------------------------------
    def next(self, n: int = 1) -> None:
        """Decode `n` tokens on the shown branch."""
        if self.session.done:
            self._refresh(message="this branch ended at EOS: rewind or fork to go on", kind="error")
            return
        rows = self.session.step(n)
        got = " ".join(repr(t) for t in rows["token"]) if len(rows) else "nothing"
        self._refresh(message=f"decoded {got}")

    def force(self, token_id: int) -> None:
        """Force `token_id` as the next token of the shown branch."""
        rows = self.session.choose(token=int(token_id))
        r = rows.iloc[0]
        self._refresh(message=f"forced {r['token']!r} at step {int(r['step'])} (the model gave it p={format_prob(r['prob'])})")

    def rewind(self, to: int) -> None:
        """Rewind the shown branch to just before step `to`."""
        self.session.rewind(to=int(to))
        self._refresh(message=f"rewound to step {int(to)}")

    def fork(self) -> None:
        """Start a new branch from the shown branch's current step and show it."""
        parent = self.session
        self.session = parent.fork()
        self._refresh(message=f"branch {self.session.branch} forked from branch {parent.branch} at step {parent.steps}")

    def show_branch(self, branch: int) -> None:
        """Show branch number `branch`."""
        self.session = self.session.branch_of(int(branch))
        self._refresh(message=f"showing branch {self.session.branch}")

    # ---- internals -----------------------------------------------------------------------------------------
    def _act(self, action: Callable[[], None]) -> None:
        """Run a button's action with the controls disabled; show an error in the status line."""
        buttons = [self.next_button, self.next10_button, self.rewind_button, self.fork_button]
        for b in buttons:
            b.disabled = True
        self.status.value = panels.message("working…")
        try:
            action()
        except Exception as err:  # shown, not lost in the kernel log
            self.status.value = panels.message(f"{type(err).__name__}: {err}", "error")
            self.status.add_class("dl-error")
        finally:
            for b in buttons:
                b.disabled = False
            self._set_done_state()

    def _set_done_state(self) -> None:
        done = self.session.done
        self.next_button.disabled = done
        self.next10_button.disabled = done

    def _refresh(self, message: str = "", kind: str = "info") -> None:
        s = self.session
        self.view.forget_trace()
        self.view.set_trace(s.trace)
        self.rewind_to.max = s.steps
        self.rewind_to.value = max(s.steps - 1, 0)
        self._busy = True
        try:
            opts = []
            for b in s.branches:
                where = f" from {b.parent} at step {b.fork_step}" if b.parent is not None else ""
                opts.append((f"{b.branch}{where} · {b.steps} steps", b.branch))
            if list(self.branches.options) != opts:  # a new list rebuilds the front end's select
                self.branches.options = opts
            self.branches.value = s.branch
        finally:
            self._busy = False
        self._draw_candidates()
        self._set_done_state()
        self.status.remove_class("dl-error")
        if kind == "error":
            self.status.add_class("dl-error")
        self.status.value = panels.message(message, kind)

    def _draw_candidates(self) -> None:
        s = self.session
        if s.done:
            self.candidates.children = [W.HTML(panels.message("ended at EOS: rewind or fork to continue"))]
            return
        cands = s.candidates(k=self.k)
        buttons = []
        for _, c in cands.iterrows():
            # the final probability where the source has it; an API server may give only the raw one
            p = c["prob"] if is_missing(c["final_prob"]) else c["final_prob"]
            b = W.Button(description=f"{token_label(c['token'], 16)}  {format_prob(p)}",
                         tooltip=(f"force {c['token']!r} (id {int(c['token_id'])}): raw p={format_prob(c['prob'])},"
                                  f" final p={format_prob(c['final_prob'])}, rank {format_rank(c['rank'])}"),
                         layout=CANDIDATE_LAYOUT, style=candidate_style(p), _dom_classes=("dl-candidate",))
            b._dl_token_id = int(c["token_id"])
            b.on_click(lambda btn: self._act(lambda: self.force(btn._dl_token_id)))
            buttons.append(b)
        old = self.candidates.children
        self.candidates.children = buttons
        for w in old:  # free the front-end models of the previous step's buttons
            w.close()

    def _on_branch(self, change) -> None:
        if self._busy or change["new"] is None or change["new"] == self.session.branch:
            return
        self._act(lambda: self.show_branch(change["new"]))


def explore(session: BranchingSession, *, k: int = 8, window: int = 40, lens_layers: int = 16) -> SessionExplorer:
    """Step through a live `Session`: next token, force a candidate (`k` are offered), rewind, fork,
    pick a branch; below, the `show` view of the branch shown."""
    return SessionExplorer(session, k=k, window=window, lens_layers=lens_layers)
