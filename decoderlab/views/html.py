"""A trace as HTML: one self-contained page (`trace_html`) and the coloured-text fragment (`coloured_text`).

Static on purpose: no JavaScript and nothing fetched from the network, so a saved page opens the
same anywhere, offline, and a model's output can never run as code in it. Every string that came
from the model, the tokenizer or the user is escaped (`display.escape`: html.escape, quotes too), and the
page carries a Content-Security-Policy that forbids scripts and remote loads as a second line of defence.
A trace with a logit lens gets its commit strip (`panels.commit_strip`, the trace view's), which computes the lens of
every step once. Hover details are CSS-only: each token's box is hidden by an inline style and shown on :hover,
so a viewer that strips <style> shows plain coloured text, never stray boxes. Class names start
with `dlh-`: a <style> in a notebook output applies to the whole page, and must not restyle the
widgets' `dl-` classes.
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

from .display import (TraceLike, char_escape, escape, format_number, format_prob, format_rank, is_invisible, prob_colour,
                      strategy_summary, token_label)
from .panels import KNOBS_CSS, PANEL_CSS, commit_strip, knobs_heatmaps

__all__ = ["trace_html", "coloured_text", "CSS"]

CSS = """
.dlh-text{font:15px/2.0 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK JP","Noto Color Emoji",sans-serif;
  white-space:pre-wrap;word-break:break-word;color:#111;margin:.3em 0}
.dlh-tok{position:relative;border-radius:3px;padding:2px 0;color:#111;cursor:default}
.dlh-tok:hover{outline:2px solid #333;z-index:5}
.dlh-forced{outline:1px dashed #b2182b;outline-offset:1px}
.dlh-selected{outline:2px solid #e6550d;outline-offset:1px}
.dlh-mark{color:#777;font-size:.85em}
.dlh-tip{position:absolute;left:0;top:100%;z-index:10;min-width:22em;max-width:30em;margin-top:4px;
  background:#fff;color:#111;border:1px solid #999;border-radius:4px;padding:6px 8px;
  box-shadow:0 2px 8px rgba(0,0,0,.25);font:12px/1.4 system-ui,sans-serif;white-space:normal;text-align:left}
.dlh-tok:hover>.dlh-tip{display:block!important}
.dlh-tip b{font-weight:600}
.dlh-alts{display:table;border-collapse:collapse;margin-top:4px;width:100%}
.dlh-row{display:table-row}
.dlh-cell{display:table-cell;padding:1px 6px 1px 0;white-space:pre}
.dlh-row.dlh-head .dlh-cell{color:#666;border-bottom:1px solid #ddd}
.dlh-row.dlh-chosen .dlh-cell{font-weight:600;color:#a63603}
.dlh-num{text-align:right;font-variant-numeric:tabular-nums}
.dlh-legend{font:12px system-ui,sans-serif;color:#444;margin:.2em 0 .6em}
.dlh-swatch{display:inline-block;width:1.6em;height:.9em;vertical-align:middle;border-radius:2px;margin:0 2px}
"""

PAGE_CSS = """
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI","Noto Sans",sans-serif;color:#111;background:#fff;
  max-width:60em;margin:1.5em auto;padding:0 1em}
h1{font-size:1.3em;margin:.2em 0}
h2{font-size:1.05em;margin:1.2em 0 .3em}
.dlh-meta{display:grid;grid-template-columns:max-content 1fr;gap:.15em 1em;margin:.5em 0}
.dlh-meta dt{color:#666}
.dlh-meta dd{margin:0}
.dlh-prompt{white-space:pre-wrap;word-break:break-word;background:#f6f6f6;border:1px solid #ddd;border-radius:4px;
  padding:.6em;font:13px/1.45 ui-monospace,"DejaVu Sans Mono",monospace;max-height:24em;overflow:auto}
figure{margin:1em 0}
figure img{max-width:100%;height:auto}
figcaption{color:#666;font-size:.9em}
"""

# A policy that forbids scripts, frames and every remote load; only inline styles and data: images.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _visible_text(text: str) -> str:
    """Escaped token text for the running text: newlines become a mark plus <br>, tabs a mark plus the
    tab, other control and invisible characters their escape in a faint mark (`display.char_escape`,
    as in token labels); empty tokens '∅'. Other spaces (a no-break space) stay spaces in running text."""
    if text == "":
        return '<span class="dlh-mark">∅</span>'
    out: list[str] = []
    plain: list[str] = []

    def flush() -> None:
        if plain:
            out.append(escape("".join(plain)))
            plain.clear()

    for ch in text:
        if ch == "\n":
            flush()
            out.append('<span class="dlh-mark">↵</span><br>')
        elif ch == "\t":
            flush()
            out.append('<span class="dlh-mark">⇥</span>\t')
        elif is_invisible(ch):
            flush()
            out.append(f'<span class="dlh-mark">{escape(char_escape(ch))}</span>')
        else:
            plain.append(ch)
    flush()
    return "".join(out)


def _tip(s: int, step: Any, alts: list[tuple[str, float, float, bool]]) -> str:
    """The hover box of one token: its numbers, how it was chosen, and the top alternatives."""
    lines = [
        f"<b>step {s}</b> · <bdi>{escape(token_label(step.token, 40))}</bdi> · id {int(step.token_id)}",
        f"p = {format_prob(step.prob)} (rank {format_rank(step.rank)}) · "
        f"final p = {format_prob(step.final_prob)} (rank {format_rank(step.final_rank)})",
        f"entropy {format_number(step.entropy)} nats → {format_number(step.final_entropy)} after processors",
        ("<b>forced</b> · " if step.forced else "") + escape(step.why),
    ]
    rows = ['<span class="dlh-row dlh-head"><span class="dlh-cell">#</span><span class="dlh-cell">token</span>'
            '<span class="dlh-cell dlh-num">p</span><span class="dlh-cell dlh-num">final</span></span>']
    for rank, (tok, p, fp, chosen) in enumerate(alts):
        rows.append(f'<span class="dlh-row{" dlh-chosen" if chosen else ""}"><span class="dlh-cell">{rank}</span>'
                    f'<span class="dlh-cell"><bdi>{escape(token_label(tok, 24))}</bdi></span>'
                    f'<span class="dlh-cell dlh-num">{format_prob(p)}</span>'
                    f'<span class="dlh-cell dlh-num">{format_prob(fp)}</span></span>')
    return ('<span class="dlh-tip" dir="ltr" style="display:none">' + "<br>".join(lines)
            + f'<span class="dlh-alts">{"".join(rows)}</span></span>')


def coloured_text(trace: TraceLike, row: int = 0, *, alternatives: int = 5, value: str = "prob",
                  selected: int | None = None, style: bool = True, legend: bool = True) -> str:
    """The generated text of `row` as an HTML fragment, each token's background coloured by the
    probability the model gave it (`value`: 'prob' raw, or 'final_prob'), with hover details.

    `selected` outlines one step; `style=False` leaves out the <style> block (the page has it once).
    """
    if value not in ("prob", "final_prob"):
        raise ValueError(f"value must be 'prob' or 'final_prob', not {value!r}")
    parts = [f"<style>{CSS}</style>"] if style else []
    if legend:
        parts.append(_legend(value))
    if trace.num_steps == 0:
        return "".join(parts) + '<div class="dlh-text"><span class="dlh-mark">(no tokens generated)</span></div>'
    if not 0 <= row < trace.rows:
        raise IndexError(f"row {row} is outside this trace's {trace.rows} rows")
    frame = trace.choices
    steps = list(frame[frame["row"] == row].itertuples(index=False))  # in step order
    try:
        cand_id, cand_prob, cand_final = (trace.array(n) for n in ("cand_id", "cand_prob", "cand_final_prob"))
        k = min(alternatives, cand_id.shape[-1])
    except KeyError:  # a trace recorded without candidates: the hover box shows no alternatives
        k = 0
    spans = []
    for s in trace.alive_steps(row):  # a row that finished early emits padding after its EOS: not text
        st = steps[int(s)]
        alts = [(trace.token_text.get(int(i), f"<{int(i)}>"), float(p), float(fp), int(i) == int(st.token_id))
                for i, p, fp in zip(cand_id[s, row, :k], cand_prob[s, row, :k], cand_final[s, row, :k])] if k else []
        classes = "dlh-tok" + (" dlh-forced" if st.forced else "") + (" dlh-selected" if selected == s else "")
        spans.append(f'<span class="{classes}" data-step="{int(s)}" style="background:{prob_colour(getattr(st, value))}">'
                     f"{_visible_text(st.token)}{_tip(int(s), st, alts)}</span>")
    parts.append(f'<div class="dlh-text" dir="auto">{"".join(spans)}</div>')
    return "".join(parts)


def _legend(value: str) -> str:
    what = "raw probability" if value == "prob" else "final probability"
    swatches = "".join(f'<span class="dlh-swatch" style="background:{prob_colour(p)}"></span>' for p in (0, .25, .5, .75, 1))
    return (f'<div class="dlh-legend">colour = {what} of each chosen token: 0 {swatches} 1 · '
            "hover a token for details; dashed outline = forced</div>")


def _figure_png(trace: TraceLike, row: int = 0) -> str | None:
    """`row`'s probability timeline as a base64 PNG, or None if it cannot be drawn.

    plots (and so matplotlib) is imported here, not with the module: the page's text needs neither,
    and `import decoderlab.html` stays as light as `decoderlab.display`."""
    from .plots import probability_timeline

    try:
        fig = probability_timeline(trace, row=row)
    except (ValueError, KeyError):
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def trace_html(trace: TraceLike, *, figure: bool = True, alternatives: int = 5, value: str = "prob",
               knobs: Sequence[tuple[int, int | str]] = ()) -> str:
    """One self-contained HTML page: header (model, strategy, stop reason), the prompt, each row's
    text coloured by probability with per-token hover details (and the commit strip of a trace with a lens), and
    optionally the probability timeline. `knobs=[(step, token), ...]` adds which knob decided for each: the
    token's chance over grids of sampler settings (`trace.knobs`, which needs recorded logits; row 0)."""
    knob_sections = []
    for step, token in knobs:
        frame = trace.knobs(step, token)
        text = token if isinstance(token, str) else trace.token_text.get(int(token), f"<{int(token)}>")
        knob_sections.append(f"<h2>Which knob decided · step {int(step)} · <code>{escape(token_label(text, 32))}</code>"
                             f"</h2>{knobs_heatmaps(frame, text)}")
    meta = [
        ("model", trace.model_name or "(unnamed)"),
        ("strategy", strategy_summary(trace)),
        ("processors", " → ".join(trace.processor_names) or "none"),
        ("stop reason", trace.stop_reason or "–"),
        ("steps", f"{trace.num_steps}" + (f" × {trace.rows} rows" if trace.rows > 1 else "")),
    ]
    if trace.parent is not None or trace.fork_step is not None:
        meta.append(("branch", f"{trace.branch} (forked from {trace.parent} at step {trace.fork_step})"))
    body = [f"<h1>decoderlab trace · {escape(trace.model_name or 'model')}</h1>", '<dl class="dlh-meta">']
    body += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in meta]
    body.append("</dl>")
    body.append(f"<details open><summary>Prompt ({len(trace.prompt_ids)} tokens)</summary>"
                f'<div class="dlh-prompt" dir="auto">{escape(trace.prompt)}</div></details>')
    commit = trace.steps if trace.has_lens and trace.num_steps else None  # computes the lens of every step
    for row in range(trace.rows if trace.num_steps else 1):
        body.append(f"<h2>Generated text{f' · row {row}' if trace.rows > 1 else ''}</h2>")
        body.append(coloured_text(trace, row, alternatives=alternatives, value=value, style=False, legend=row == 0))
        if commit is not None:
            body.append("<h3>Where the model made up its mind</h3><p class='dlh-legend'>One cell per step: the first "
                        "layer from which the chosen token stays the logit lens's top-1 (hover a cell).</p>")
            body.append(commit_strip(commit[commit["row"] == row], trace.lens_layers))
    body += knob_sections
    for row in range(trace.rows) if figure and trace.num_steps else ():
        png = _figure_png(trace, row)
        whose = f"Row {row}. " if trace.rows > 1 else ""
        if png:
            body.append(f'<figure><img alt="probability of each chosen token, and entropy, per step" '
                        f'src="data:image/png;base64,{png}"><figcaption>{whose}Probability of each chosen token (top) '
                        "and the entropy of the distribution it came from (bottom), per step.</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>decoderlab · {escape(trace.model_name or 'trace')}</title>"
            f"<style>{PAGE_CSS}{CSS}{PANEL_CSS if commit is not None or knobs else ''}{KNOBS_CSS if knobs else ''}"
            "</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
