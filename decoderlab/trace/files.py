"""Trace files: one parquet file per trace (a row per step; the metadata and the prompt's attention matrices in
the schema's metadata), readable by pandas, pyarrow or DuckDB without decoderlab. Loading never unpickles.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import TraceFileError
from ..record.schema import SchemaError, check_arrays
from .lens import compute_lens

FORMAT_VERSION = 3  # 2: rows (per-row seeds and stop reasons; finished rows' steps hold fill values);
# 3: attention may hold only the newest steps (Record(memory_budget=...)), and the budget is kept


def save(trace: Any, path: str | Path) -> Path:
    """Write the whole trace to one parquet file (a row per step; metadata in the schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    arrays = _saved_arrays(trace)
    cols, names = [], []
    for name, arr in arrays.items():
        flat = np.ascontiguousarray(arr).reshape(arr.shape[0], int(np.prod(arr.shape[1:])))
        width = flat.shape[1]
        values = pa.array(flat.reshape(-1))
        col = pa.FixedSizeListArray.from_arrays(values, width) if width else pa.nulls(arr.shape[0])
        missing = trace.num_steps - arr.shape[0]  # attention of the newest steps only: the oldest rows null
        if missing > 0:
            col = pa.concat_arrays([pa.nulls(missing, col.type), col])
        cols.append(col)
        names.append(name)
    meta = {b"decoderlab": json.dumps(_meta(trace)).encode()}
    for layer, m in trace.prefill_attention.items():
        buf = io.BytesIO()
        np.save(buf, m, allow_pickle=False)
        meta[f"decoderlab.prefill_attention.{layer}".encode()] = buf.getvalue()
    table = pa.table(cols, names=names) if cols else pa.table({"step": pa.array([], pa.int64())})
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def load(path: str | Path, cls: type) -> Any:
    """Read a trace written by `save`, as an instance of `cls` (`Trace`: this module makes no trace class of its
    own, so that the class can delegate here)."""
    import pyarrow.parquet as pq

    import pyarrow as pa

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise TraceFileError(f"{path} cannot be read as a decoderlab trace: {err}") from err
    raw = table.schema.metadata or {}
    if b"decoderlab" not in raw:
        raise TraceFileError(f"{path} is not a decoderlab trace (no decoderlab metadata)")
    try:
        meta = json.loads(raw[b"decoderlab"])
    except ValueError as err:
        raise TraceFileError(f"{path}: its decoderlab metadata is damaged ({err})") from err
    if not isinstance(meta, dict):
        raise TraceFileError(f"{path}: its decoderlab metadata is not a record of the trace")
    version = meta.get("format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise TraceFileError(f"{path} was written in trace format {version!r}; this decoderlab reads formats "
                             f"up to {FORMAT_VERSION}: upgrade decoderlab to open it")
    try:
        return _from_table(cls, table, meta, raw, path)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        if isinstance(err, TraceFileError):
            raise
        raise TraceFileError(f"{path}: its decoderlab metadata is damaged ({type(err).__name__}: {err})") from err


def _from_table(cls: type, table, meta: dict, raw: dict, path) -> Any:
    """The trace in a parquet table whose metadata was read; plain numbers and text only (nothing is
    unpickled: numpy's loader runs with allow_pickle=False, and object dtypes are refused)."""
    arrays = {}
    for name, spec in meta["arrays"].items():
        shape, dtype = tuple(int(n) for n in spec["shape"]), np.dtype(spec["dtype"])
        if dtype.hasobject:
            raise TraceFileError(f"{path}: array {name!r} claims dtype {dtype}; a trace holds numbers only")
        if name not in table.column_names:
            raise TraceFileError(f"{path}: the array {name!r} its metadata lists is missing")
        col = table.column(name).combine_chunks()
        if int(np.prod(shape)) == 0:
            arrays[name] = np.zeros(shape, dtype=dtype)
        else:
            flat = col.flatten().to_numpy(zero_copy_only=False)
            if flat.size != int(np.prod(shape)):
                raise TraceFileError(f"{path}: array {name!r} holds {flat.size} values, its shape {shape} "
                                     f"needs {int(np.prod(shape))}")
            arrays[name] = flat.astype(dtype, copy=False).reshape(shape)
    try:
        check_arrays(arrays, where=str(path))
    except SchemaError as err:
        raise TraceFileError(str(err)) from err
    prefill = {}
    for key, value in raw.items():
        if key.startswith(b"decoderlab.prefill_attention."):
            prefill[int(key.rsplit(b".", 1)[1])] = np.load(io.BytesIO(value), allow_pickle=False)
    return cls(
        prompt=meta["prompt"], prompt_ids=np.array(meta["prompt_ids"], dtype=np.int64), arrays=arrays,
        token_text={int(k): v for k, v in meta["token_text"].items()}, model_name=meta["model_name"],
        strategy=meta["strategy"], processor_names=meta["processor_names"], stop_reason=meta["stop_reason"],
        texts=meta["texts"], chooser=meta["chooser"], attention_layers=meta["attention_layers"],
        attention_heads=meta["attention_heads"], prefill_attention=prefill, branch=meta["branch"],
        parent=meta["parent"], fork_step=meta["fork_step"], lens_top_k=meta["lens_top_k"],
        row_stop_reasons=meta.get("row_stop_reasons", [meta["stop_reason"]] * len(meta["texts"])),
        seeds=meta.get("seeds", [meta["strategy"].get("seed")] * len(meta["texts"])),
        row_scores=meta.get("row_scores", []), memory_budget=meta.get("memory_budget"),
    )


def _meta(trace: Any) -> dict:
    return {
        "format": FORMAT_VERSION, "prompt": trace.prompt, "prompt_ids": [int(i) for i in trace.prompt_ids],
        "token_text": {str(k): v for k, v in trace.token_text.items()}, "model_name": trace.model_name,
        "strategy": _jsonable(trace.strategy), "processor_names": trace.processor_names,
        "stop_reason": trace.stop_reason, "texts": trace.texts, "chooser": trace.chooser,
        "attention_layers": trace.attention_layers, "attention_heads": trace.attention_heads,
        "branch": trace.branch, "parent": trace.parent, "fork_step": trace.fork_step, "lens_top_k": trace.lens_top_k,
        "row_stop_reasons": trace.row_stop_reasons, "seeds": trace.seeds, "row_scores": trace.row_scores,
        "memory_budget": trace.memory_budget,
        "arrays": {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in _saved_arrays(trace).items()},
    }


def _saved_arrays(trace: Any) -> dict[str, np.ndarray]:
    """What `save` writes: the computed lens instead of the residuals it came from."""
    if "residual" in trace.arrays and trace.lens_object is not None:
        compute_lens(trace)
    return {k: v for k, v in trace.arrays.items() if k != "residual" or "lens_id" not in trace.arrays}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return repr(value)
