"""MkDocs hook: `<!-- results: PATTERN ... -->` in a page becomes the benchmark result files that match it.

Why: a figure typed into the docs goes stale the day the code changes; a result file is what the benchmark wrote.
Each benchmark writes `benchmarks/results/<name>.json`:

    {"benchmark": "bench_overhead", "title": "...", "command": "...", "date": "ISO 8601", "machine": {...},
     "versions": {...}, "settings": {...}, "columns": [...], "results": [{column: value, ...}, ...],
     "summary": {name: value, ...}, "notes": "..."}

A marker holds one or more glob patterns over the files' names, separated by spaces; `.json` is added where a
pattern lacks it, and a pattern starting with `!` takes matching files out:

    <!-- results: bench_overhead* -->
    <!-- results: bench_widgets* !bench_widgets_browser* -->

Each matching file, in name order, becomes its title, a table of `results` (the columns in `columns`' order), the
summary as a short list, the notes, and in small print the command, date, settings, machine and versions. A marker
that matches no file, and a file that cannot be read, log a warning: `mkdocs build --strict` fails on it.

`DECODERLAB_RESULTS_DIR` names another folder to read instead of `benchmarks/results/` (to preview a page with
results from elsewhere).
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from pathlib import Path

log = logging.getLogger("mkdocs.hooks.results")

MARKER = re.compile(r"<!--\s*results:\s*(.*?)\s*-->")


def format_value(value) -> str:
    """A cell's text: whole numbers with thousands separators, other numbers to about three significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        size = abs(value)
        if size == 0:
            return "0"
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.1f}"
        if size >= 0.01:
            return f"{value:#.3g}".rstrip(".")
        return f"{value:.2e}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _cell(value) -> str:
    return format_value(value).replace("|", "\\|").replace("\n", " ")


def _pairs(mapping) -> str:
    if not isinstance(mapping, dict):
        return html.escape(format_value(mapping))
    return ", ".join(f"{html.escape(str(k))}: {html.escape(format_value(v))}" for k, v in mapping.items())


def render_file(data: dict, name: str = "") -> str:
    """One result file as markdown: title, table, summary, notes, then the small print."""
    title = data.get("title") or data.get("benchmark") or name
    parts = [f"**{title}**" + (f" (`{name}`)" if name else "")]
    results = data.get("results") or []
    columns = list(data.get("columns") or (list(results[0]) if results else []))
    if columns:
        parts.append("\n".join([
            "| " + " | ".join(_cell(c) for c in columns) + " |",
            "| " + " | ".join("---" for _ in columns) + " |",
            *("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in results),
        ]))
    summary = data.get("summary") or {}
    if summary:
        parts.append("\n".join(f"- {k}: **{format_value(v)}**" for k, v in summary.items()))
    if data.get("notes"):
        parts.append(str(data["notes"]).strip())
    small = []
    if data.get("command"):
        small.append(f"<code>{html.escape(str(data['command']))}</code>")
    if data.get("date"):
        small.append(html.escape(str(data["date"])))
    for key in ("settings", "machine", "versions"):
        if data.get(key):
            small.append(f"{key}: {_pairs(data[key])}")
    if small:
        parts.append('<p class="dl-results-meta"><small>' + " · ".join(small) + "</small></p>")
    return "\n\n".join(parts)


def matching_files(spec: str, folder: Path) -> list[Path]:
    """The files of `folder` that the marker's patterns select, in name order."""
    keep: set[Path] = set()
    drop: set[Path] = set()
    for pattern in spec.split():
        out = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if not pattern.endswith(".json"):
            pattern += ".json"
        (drop if out else keep).update(folder.glob(pattern))
    return sorted(keep - drop, key=lambda p: p.name)


def render(spec: str, folder: Path) -> str | None:
    """The markdown for one marker's patterns over `folder`, or None when no file matches."""
    files = matching_files(spec, Path(folder))
    if not files:
        return None
    blocks = []
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            log.warning("benchmark result file %s cannot be read: %s", path, err)
            blocks.append(f"!!! warning\n    `{path.name}` could not be read.")
            continue
        blocks.append(render_file(data, path.name))
    return "\n\n".join(blocks)


def replace_markers(markdown: str, folder: Path, where: str = "a page") -> tuple[str, list[str]]:
    """Every marker replaced by its results; also the marker patterns that matched no file (each logged)."""
    missing: list[str] = []

    def one(match: re.Match) -> str:
        spec = match.group(1)
        text = render(spec, folder)
        if text is None:
            missing.append(spec)
            log.warning("%s: the results marker '%s' matches no file in %s", where, spec, folder)
            return f"!!! note \"No results yet\"\n    No result file matches `{spec}`: run the benchmark to write one."
        return "\n\n" + text + "\n\n"

    return MARKER.sub(one, markdown), missing


def on_page_markdown(markdown: str, page, config, **kwargs) -> str:
    folder = Path(os.environ.get("DECODERLAB_RESULTS_DIR")
                  or Path(config["config_file_path"]).resolve().parent / "benchmarks" / "results")
    return replace_markers(markdown, folder, where=page.file.src_uri)[0]
