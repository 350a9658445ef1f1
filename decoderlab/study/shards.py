"""A study's folder: one Parquet file per prompt in each of three datasets, written atomically, and the study's
description, which a run started again must match.

    out/study.json             the arguments (model, strategies, seeds, ...), the prompt count, the version
    out/prompts.parquet        prompt_index, prompt
    out/runs/prompt-000012.parquet         one row per run (a failed prompt: one row with `error`)
    out/steps/prompt-000012.parquet        one row per run and step
    out/candidates/prompt-000012.parquet   one row per run, step and top candidate

Why one file per prompt: a file is the unit of work done, so a study stopped anywhere (Ctrl-C, a lost worker)
starts again where it stopped, and each file is written under a hidden name and renamed into place, so a reader
never sees half a file. The runs file is written last: its presence says the prompt is done. Readers that
discover datasets (pandas, pyarrow, DuckDB, Spark) skip hidden files.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from ..errors import StudyError

DATASETS = ("steps", "candidates", "runs")  # in the order written: runs last marks the prompt done
_NAME = re.compile(r"^prompt-(\d+)\.parquet$")


def shard_name(index: int) -> str:
    return f"prompt-{index:06d}.parquet"


def done_prompts(out: Path) -> set[int]:
    """The prompts whose runs file is written."""
    folder = Path(out) / "runs"
    if not folder.is_dir():
        return set()
    return {int(m.group(1)) for name in os.listdir(folder) if (m := _NAME.match(name))}


def write_atomically(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` as Parquet under a hidden name, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_prompt(out: Path, index: int, frames: Mapping[str, pd.DataFrame]) -> None:
    """One prompt's files, runs last (a failed prompt has a runs file only)."""
    for name in DATASETS:
        frame = frames.get(name)
        if frame is not None:
            write_atomically(frame, Path(out) / name / shard_name(index))


def clear_stale(out: Path) -> None:
    """Remove what a stopped study left half-written: hidden temporary files, and files of prompts without a runs
    file (their other datasets were written, the runs file was not)."""
    done = done_prompts(out)
    for name in DATASETS:
        folder = Path(out) / name
        if not folder.is_dir():
            continue
        for entry in os.listdir(folder):
            m = _NAME.match(entry)
            if entry.endswith(".tmp") or (m and name != "runs" and int(m.group(1)) not in done):
                (folder / entry).unlink(missing_ok=True)


def begin(out: Path, description: dict[str, Any], prompts: list[str]) -> None:
    """Write the study's description and prompts, or check that the folder holds this same study."""
    out = Path(out)
    meta = out / "study.json"
    if meta.exists():
        before = json.loads(meta.read_text())
        mine = {k: v for k, v in description.items() if k != "version"}
        theirs = {k: v for k, v in before.items() if k != "version"}
        if mine != theirs:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise StudyError(f"dl.study: {out} holds a different study (it differs in {', '.join(changed)}); "
                             "give another out= folder, or remove this one to start afresh")
        return
    if out.exists() and any(out.iterdir()):
        raise StudyError(f"dl.study: {out} is not empty and holds no study.json; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(pd.DataFrame({"prompt_index": range(len(prompts)), "prompt": prompts}), out / "prompts.parquet")
    tmp = out / f".study.json.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(description, indent=1))
    os.replace(tmp, meta)


def read_dataset(out: Path, name: str) -> pd.DataFrame:
    """Every prompt's file of one dataset, in prompt order (empty: no file yet)."""
    folder = Path(out) / name
    files = sorted(f for f in os.listdir(folder) if _NAME.match(f)) if folder.is_dir() else []
    frames = [pd.read_parquet(folder / f) for f in files]
    frames = [f for f in frames if len(f.columns)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
