"""The result file every benchmark writes: `benchmarks/results/<script stem>[-<label>].json`.

Why one helper: the docs site renders these files into tables (docs/hooks/results.py), so every script must write
the same keys in the same shapes; a script builds only its table (`columns`, `results`) and its headline figures
(`summary`), and this module adds what makes a figure worth keeping: the command that re-runs it, the date, the
machine, the versions and the settings. The label keeps results of different machines apart (a CPU run and a GPU
run of one script would otherwise overwrite each other); `--out` names another file.

    {"benchmark": "bench_overhead", "title": "...", "command": ".venv/bin/python benchmarks/bench_overhead.py ...",
     "date": "2026-12-01T10:00:00Z", "machine": {...}, "versions": {...}, "settings": {...},
     "columns": [...], "results": [{column: value, ...}, ...], "summary": {...}, "notes": "..."}
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("benchmark", "title", "command", "date", "machine", "versions", "settings", "columns", "results", "summary",
        "notes")
_HIDDEN_SETTINGS = {"out", "child"}  # where the file goes, and a subprocess's own switch: not what was measured


def add_out_argument(ap: argparse.ArgumentParser) -> None:
    """`--out FILE`: write the result file there instead of benchmarks/results/<stem>[-<label>].json."""
    ap.add_argument("--out", default=None, metavar="FILE",
                    help="the result file to write (default: benchmarks/results/<script>[-<label>].json)")


def label_for(args: argparse.Namespace | None = None, device: Any = None, *extra: Any) -> str:
    """A file-name label from what the run was measured on: the device kind ('cpu', 'cuda'), the model
    (`--random-weights` folder or `--model` name; nothing for the default model), and any `extra` words."""
    parts = [str(getattr(device, "type", device) or "cpu")]
    if args is not None and getattr(args, "random_weights", None):
        parts.append(Path(args.random_weights).name)
    elif args is not None and getattr(args, "model", None):
        parts.append(Path(str(args.model).rstrip("/")).name)
    parts += [str(e) for e in extra if e not in (None, "")]
    return "-".join(p for p in (re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("_-") for p in parts) if p)


def result_path(script: str | Path, label: str | None = None, out: str | Path | None = None) -> Path:
    """Where the result file goes: `out`, or benchmarks/results/<script stem>[-<label>].json."""
    if out:
        return Path(out)
    stem = Path(script).stem
    return RESULTS / (f"{stem}-{label}.json" if label else f"{stem}.json")


def command_line(script: str | Path, argv: Iterable[str] | None = None) -> str:
    """The command that re-runs this benchmark from the repository root: the interpreter (relative where it is
    the repository's own, e.g. `.venv/bin/python`; else `python`), the script's path and its arguments."""
    exe = Path(os.path.abspath(sys.executable))  # not resolved: a venv's python is a link out of the venv
    python = str(exe.relative_to(ROOT)) if ROOT in exe.parents else "python"
    path = Path(script).resolve()
    where = str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([python, where, *(shlex.quote(a) for a in args)])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average too, since timings on shared cores depend on it."""
    gpu, gpus = None, 0
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        gpu = torch.cuda.get_device_name(0)
    return {"platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count(), "gpu": gpu,
            "gpu_count": gpus, "memory_gb": _memory_gb(),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}


def versions(**extra: str | None) -> dict[str, str | None]:
    """Python, torch, transformers and decoderlab (each None where it is not installed), and any `extra`."""
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    out = {"python": platform.python_version(),
           "torch": torch.__version__ if torch is not None else version("torch"),
           "transformers": version("transformers")}
    try:
        import decoderlab

        out["decoderlab"] = decoderlab.__version__
    except ImportError:
        out["decoderlab"] = version("decoderlab")
    return {**out, **extra}


def plain(value: Any) -> Any:
    """A value JSON keeps as it is: numpy and torch scalars as Python numbers, NaN and infinities as null (JSON has
    neither), tuples as lists, paths and other objects as their text."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return plain(item())
    return str(value)


def p90(values: list[float]) -> float:
    """The 90th percentile of timings (linear between the sorted values; the value itself for one value)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def settings_of(args: argparse.Namespace | Mapping[str, Any] | None) -> dict[str, Any]:
    """The script's arguments as a flat dict (the file's destination left out: it is no setting)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {k: plain(v) for k, v in items.items() if k not in _HIDDEN_SETTINGS}


def build(script: str | Path, *, title: str, settings: argparse.Namespace | Mapping[str, Any] | None,
          columns: list[str], results: list[Mapping[str, Any]], summary: Mapping[str, Any], notes: str = "",
          argv: Iterable[str] | None = None, extra_versions: Mapping[str, str | None] | None = None) -> dict:
    """The result file's contents (see the module docstring); each row must have exactly the `columns`."""
    columns = [str(c) for c in columns]
    for i, row in enumerate(results):
        if set(row) != set(columns):
            raise ValueError(f"row {i} has keys {sorted(row)}, the columns are {columns}")
    return {
        "benchmark": Path(script).stem,
        "title": title,
        "command": command_line(script, argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(**(extra_versions or {})),
        "settings": settings_of(settings),
        "columns": columns,
        "results": [{c: plain(row[c]) for c in columns} for row in results],
        "summary": {str(k): plain(v) for k, v in summary.items()},
        "notes": notes,
    }


def write(script: str | Path, *, title: str, settings: argparse.Namespace | Mapping[str, Any] | None,
          columns: list[str], results: list[Mapping[str, Any]], summary: Mapping[str, Any], notes: str = "",
          label: str | None = None, out: str | Path | None = None, argv: Iterable[str] | None = None,
          extra_versions: Mapping[str, str | None] | None = None) -> Path:
    """Write the result file and say where (one line on stdout); returns its path. `out` defaults to the
    settings' `--out`."""
    if out is None and isinstance(settings, argparse.Namespace):
        out = getattr(settings, "out", None)
    data = build(script, title=title, settings=settings, columns=columns, results=results, summary=summary,
                 notes=notes, argv=argv, extra_versions=extra_versions)
    path = result_path(script, label, out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    print(f"result file: {shown}", flush=True)
    return path
