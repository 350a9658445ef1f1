"""MkDocs hook: `<!-- cli-help: COMMAND -->` in a page becomes that command's `--help`, taken from the parser itself.

Why: a help text copied into the docs goes stale the day a flag changes; this one is the program's own.
`<!-- cli-help: -->` (no command) gives the top-level help.
"""
from __future__ import annotations

import argparse
import os
import re

MARKER = re.compile(r"<!--\s*cli-help:\s*([a-z]*)\s*-->")


def help_text(command: str = "") -> str:
    """The `decoderlab [COMMAND] --help` text at a fixed width of 100 columns."""
    from decoderlab import cli

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = cli.parser()
        if command:
            sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
            if command not in sub.choices:
                raise ValueError(f"cli-help marker names an unknown command {command!r}")
            parser = sub.choices[command]
        return parser.format_help()
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved


def on_page_markdown(markdown: str, **kwargs) -> str:
    return MARKER.sub(lambda m: f"```text\n{help_text(m.group(1)).rstrip()}\n```", markdown)
