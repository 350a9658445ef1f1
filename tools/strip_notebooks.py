"""Strip outputs and execution counts from notebooks, so that git holds sources only.

Why: outputs go stale with every API change, carry widget state and PNGs that bloat the history, and
tests/test_notebooks.py refuses them. Usage: `python tools/strip_notebooks.py [paths...]`
(default: notebooks/*.ipynb); `--check` only reports, exiting 1 when a notebook has outputs.
Needs only the standard library.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def strip(nb: dict) -> dict:
    """The notebook without outputs, execution counts, widget state, run metadata or Python version."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        for key in ("execution", "collapsed", "scrolled"):
            cell.get("metadata", {}).pop(key, None)
    meta = nb.setdefault("metadata", {})
    meta.pop("widgets", None)
    meta["kernelspec"] = dict(KERNELSPEC)
    meta["language_info"] = {"name": "python"}  # no interpreter version: it would churn between machines
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--check", action="store_true", help="report notebooks that need stripping; change nothing")
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    dirty = []
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        before = json.dumps(nb, sort_keys=True)
        strip(nb)
        if json.dumps(nb, sort_keys=True) != before:
            dirty.append(path)
            if not args.check:  # the layout nbformat itself writes
                path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in dirty:
        print(("needs stripping: " if args.check else "stripped: ") + str(path))
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
