"""`dl.study`: every strategy (× seeds) on every prompt, on Ray: one model replica per worker (one per GPU where
the cluster has GPUs), each prompt's runs as rows of one batch inside it (`dl.compare`'s batched runner), each
prompt's results written by the driver as it arrives (`shards`).

Why Ray: studies outgrow one process and one machine; Ray runs the same code on a laptop (a local Ray started
on demand), a GPU box or a cluster (`address="auto"` or `"ray://..."`), and restarts a lost worker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from ..analysis import RUN_COLUMNS, check_settings
from ..errors import MissingExtraError, StudyError
from ..record import Record
from . import shards
from .results import Study, open_study
from .spec import ModelSpec, model_spec, read_prompts

RUN_TYPES = {"prompt_index": "int64", "model": "string", "strategy": "string", "seed": "Int64", "prompt": "string",
             "text": "string", "length": "Int64", "stop_reason": "string", "mean_logprob": "float64",
             "perplexity": "float64", "mean_entropy": "float64", "distinct_1": "float64", "distinct_2": "float64",
             "distinct_3": "float64", "repetitive": "boolean", "repeated_4gram_share": "float64", "error": "string"}
RUN_ORDER = ["prompt_index", *RUN_COLUMNS, "token_ids", "error"]


def study(model: Any, prompts: Any, strategies: Mapping[str, Mapping[str, Any]], *, out: str | os.PathLike,
          seeds: Sequence[int] = range(1), max_new_tokens: int = 64, chat: bool = False, record: Record | None = None,
          address: str | None = None, workers: int | None = None, progress: bool | None = None) -> Study:
    """Run every strategy (× seeds, for strategies that sample) on every prompt, on Ray; write the results to `out`
    as Parquet; return the study read back (`dl.open_study(out)`).

    `model`: None for the bundled model, a local path or hub name, a model made by `dl.load` or `dl.connect`, or a
    mapping of `dl.load`'s (or, with `base_url`, `dl.connect`'s) arguments: each worker loads its own copy.
    `prompts`: a list of strings, a pandas Series, a DataFrame's `prompt` column, or a `.parquet` file's.
    `address`: None starts a local Ray (or uses the one this process started); "auto" or "ray://host:port"
    joins a cluster. `workers`: model replicas (default: one per GPU, else one per two CPUs).

    Started again with the same arguments, a study skips the prompts already written. A prompt whose runs fail
    gets an `error` in the runs dataset and the study goes on.
    """
    spec = model_spec(model)
    prompts = read_prompts(prompts)
    strategies, seeds, record = check_settings(strategies, seeds, record, who="dl.study")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive int")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r}: must be a positive int or None")
    settings = dict(strategies=strategies, seeds=seeds, max_new_tokens=max_new_tokens, chat=chat, record=record)
    out = Path(out)
    shards.begin(out, _description(spec, prompts, settings), prompts)
    shards.clear_stale(out)
    todo = sorted(set(range(len(prompts))) - shards.done_prompts(out))
    if todo:
        _run(spec, prompts, todo, settings, out, address, workers, progress)
    return open_study(out)


def _description(spec: ModelSpec, prompts: list[str], settings: dict) -> dict:
    """What the study's folder says it holds (a study started again must match it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("decoderlab")
    except PackageNotFoundError:
        installed = None
    digest = hashlib.sha256("\0".join(prompts).encode()).hexdigest()
    return {"model": spec.describe(), "model_name": spec.name,
            "strategies": json.loads(json.dumps(settings["strategies"], default=repr)),
            "seeds": settings["seeds"], "max_new_tokens": settings["max_new_tokens"], "chat": settings["chat"],
            "record": json.loads(json.dumps(asdict(settings["record"]), default=repr)),
            "prompts": len(prompts), "prompts_sha256": digest,
            "version": installed}


def prompt_frames(backend: Any, model: str, index: int, prompt: str, settings: dict) -> dict[str, pd.DataFrame]:
    """One prompt's runs as the study's three frames; a failure as one runs row with its error."""
    from ..analysis import compare

    try:
        cmp = compare({model: backend}, prompt, settings["strategies"], seeds=settings["seeds"],
                      max_new_tokens=settings["max_new_tokens"], chat=settings["chat"], record=settings["record"],
                      progress=False)
    except Exception as err:  # noqa: BLE001 - recorded for this prompt; the study goes on
        return {"runs": failed_runs(model, index, prompt, err)}
    runs = cmp.runs.assign(prompt_index=index, token_ids=[[int(t) for t in r.trace.token_ids] for r in cmp.run_list],
                           error=None)
    keys = ["prompt_index", "model", "strategy", "seed"]
    steps, candidates = [], []
    for r in cmp.run_list:
        tag = dict(prompt_index=index, model=model, strategy=r.strategy, seed=r.seed)
        steps.append(r.trace.steps.assign(**tag))
        candidates.append(r.trace.candidates.assign(**tag))

    def tidy(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat(frames, ignore_index=True)
        frame = frame[keys + [c for c in frame.columns if c not in keys]]
        return frame.astype({"model": "string", "strategy": "string", "seed": "Int64"})

    return {"steps": tidy(steps), "candidates": tidy(candidates), "runs": runs[RUN_ORDER].astype(RUN_TYPES)}


def failed_runs(model: str, index: int, prompt: str, err: BaseException) -> pd.DataFrame:
    """The runs row of a prompt that failed: its error, no metrics."""
    row = {c: None for c in RUN_ORDER}
    row.update(prompt_index=index, model=model, prompt=prompt, token_ids=[],
               error=f"{type(err).__name__}: {err}".strip())
    return pd.DataFrame([row], columns=RUN_ORDER).astype(RUN_TYPES)


class Worker:
    """A model replica (a Ray actor): loads the model once, then runs prompts."""

    def __init__(self, spec: ModelSpec, settings: dict, threads: int | None, device: str | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.backend = spec.make(device=device)
        self.model, self.settings = spec.name, settings

    def run(self, index: int, prompt: str) -> dict[str, pd.DataFrame]:
        return prompt_frames(self.backend, self.model, index, prompt, self.settings)


def _ray():
    try:
        import ray
    except ImportError as err:
        raise MissingExtraError("dl.study runs on Ray, which is not installed: "
                                "pip install 'decoderlab[scale]'") from err
    return ray


def _run(spec: ModelSpec, prompts: list[str], todo: list[int], settings: dict, out: Path, address: str | None,
         workers: int | None, progress: bool | None) -> None:
    """Run the prompts `todo` on Ray's workers, writing each prompt's files as its results arrive."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:
        local = address is None
        cpus = os.cpu_count() or 1
        ray.init(address=address, num_cpus=max(cpus, workers or 1) if local else None, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR, ignore_reinit_error=True)
    actors: list = []
    bar = None
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        n = min(len(todo), workers or (gpus or max(1, cpus // 2)))
        per = dict(num_gpus=1, num_cpus=1) if gpus else dict(num_cpus=1)
        threads = None if gpus else max(1, cpus // n)
        remote = ray.remote(Worker).options(max_restarts=1, max_task_retries=1, **per)
        actors = [remote.remote(spec, settings, threads, "cuda" if gpus else None) for _ in range(n)]
        bar = _bar(len(prompts), len(prompts) - len(todo), progress)
        queue, pending, tries = list(todo), {}, {}

        def submit(actor) -> None:
            i = queue.pop(0)
            pending[actor.run.remote(i, prompts[i])] = (actor, i)

        for actor in actors:
            if queue:
                submit(actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            actor, i = pending.pop(ready[0])
            try:
                frames = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # the worker was lost, and lost again after Ray restarted it
                actors = [a for a in actors if a is not actor]
                tries[i] = tries.get(i, 0) + 1
                frames = None if tries[i] < 2 and actors else {"runs": failed_runs(spec.name, i, prompts[i], err)}
                if frames is None:
                    queue.insert(0, i)  # another worker tries it once more
            if frames is not None:
                shards.write_prompt(out, i, frames)
                if bar is not None:
                    bar.update(1)
            for idle in actors:
                if queue and not any(a is idle for a, _ in pending.values()):
                    submit(idle)
        if queue:
            raise StudyError(f"dl.study: every worker was lost; {len(queue)} prompts were not run (the same call "
                             "again runs them)")
    except KeyboardInterrupt:
        warnings.warn(f"dl.study interrupted: {len(shards.done_prompts(out))} of {len(prompts)} prompts are written "
                      f"to {out}; the same call again goes on from there", stacklevel=3)
    finally:
        if bar is not None:
            bar.close()
        for actor in actors:
            ray.kill(actor)
        if started:
            ray.shutdown()


def _bar(total: int, done: int, progress: bool | None):
    """A progress bar over prompts (tqdm.auto: a notebook bar in Jupyter)."""
    if progress is False:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, unit="prompt", desc="study", file=sys.stderr)
