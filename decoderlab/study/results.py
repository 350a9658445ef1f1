"""A study read back from its folder: the frames of `dl.compare` (runs, steps, candidates), its summary with the
spread over prompts, and what failed. Only pandas and pyarrow are needed to read the folder; this adds names."""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

import pandas as pd

from ..analysis import summary_of
from ..errors import StudyError
from . import shards


class Study:
    """A study's results (`dl.open_study(folder)`). Frames are read when first asked for.

    `runs`: one row per run that ran (the columns of `Comparison.runs`, with `prompt_index` and `token_ids`);
    `steps` and `candidates`: one row per run and step (and candidate), keyed by prompt_index, strategy, seed;
    `summary`: one row per strategy, as `Comparison.summary` (mean and sd over prompts and seeds), with the
    prompts it ran on and how many failed; `failures`: the prompts that failed and why.
    Plots of comparisons take a study too (`dl.plots.compare(study)` reads `runs`).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = self.folder / "study.json"
        if not meta.exists():
            raise StudyError(f"{self.folder} holds no study (no study.json): dl.study(..., out=...) writes one")
        self.description = json.loads(meta.read_text())
        self.strategies: list[str] = list(self.description["strategies"])
        self.models: list[str] = [self.description.get("model_name", "model")]

    @cached_property
    def prompts(self) -> list[str]:
        return pd.read_parquet(self.folder / "prompts.parquet")["prompt"].tolist()

    @cached_property
    def _all_runs(self) -> pd.DataFrame:
        return shards.read_dataset(self.folder, "runs")

    @property
    def runs(self) -> pd.DataFrame:
        runs = self._all_runs
        return runs[runs["error"].isna()].reset_index(drop=True) if len(runs) else runs

    @property
    def failures(self) -> pd.DataFrame:
        """One row per failed prompt: prompt_index, prompt, error."""
        runs = self._all_runs
        if not len(runs):
            return pd.DataFrame(columns=["prompt_index", "prompt", "error"])
        bad = runs[runs["error"].notna()]
        return bad[["prompt_index", "prompt", "error"]].drop_duplicates("prompt_index").reset_index(drop=True)

    @cached_property
    def steps(self) -> pd.DataFrame:
        return shards.read_dataset(self.folder, "steps")

    @cached_property
    def candidates(self) -> pd.DataFrame:
        return shards.read_dataset(self.folder, "candidates")

    @property
    def done(self) -> int:
        """Prompts written (ran, or failed)."""
        return len(shards.done_prompts(self.folder))

    @property
    def summary(self) -> pd.DataFrame:
        runs = self.runs
        if not len(runs):
            out = pd.DataFrame({"model": self.models[0], "strategy": self.strategies, "runs": 0})
        else:
            out = summary_of(runs, self.models, self.strategies)
        out.insert(3, "prompts", [runs.loc[runs["strategy"] == s, "prompt_index"].nunique() if len(runs) else 0
                                  for s in out["strategy"]])
        out.insert(4, "failed_prompts", len(self.failures))
        return out

    def why_failed(self) -> pd.Series:
        """How many prompts failed with each kind of error."""
        errors = self.failures["error"]
        return errors.str.split(":").str[0].value_counts()

    def __repr__(self) -> str:
        total = self.description.get("prompts", "?")
        failed = len(self.failures)
        return (f"Study({len(self.strategies)} strategies, {self.done} of {total} prompts done"
                f"{f', {failed} failed' if failed else ''}, {len(self.runs)} runs, folder={str(self.folder)!r})")


def open_study(folder: str | os.PathLike) -> Study:
    """A study's results, read from the folder `dl.study(..., out=folder)` wrote (a study still running or stopped
    shows the prompts written so far)."""
    return Study(folder)
