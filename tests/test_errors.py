"""decoderlab's errors: one hierarchy, and numbers that go wrong stop the run with a clear error, keeping what was
recorded (generate), the session as it was (sessions) and the other runs (compare)."""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

import decoderlab as dl
from decoderlab import errors

PROMPT = "The numbers go wrong"


class NaNAfter(LogitsProcessor):
    """Turns the scores to NaN once the sequence is `length` tokens long (a broken processor)."""

    def __init__(self, length: int, value: float = float("nan")):
        self.length, self.value = length, value

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] >= self.length:
            scores = torch.full_like(scores, self.value)
        return scores


@pytest.mark.parametrize("name, builtin", [
    ("PromptError", ValueError), ("StrategyError", ValueError), ("SessionError", ValueError),
    ("RecordError", ValueError), ("RecorderError", ValueError), ("ModelNotFoundError", ValueError),
    ("SchemaError", ValueError), ("TraceFileError", ValueError), ("NumericError", FloatingPointError),
    ("LensError", ValueError),
    ("APIError", OSError), ("ServerUnreachable", ConnectionError), ("ServerTimeout", TimeoutError),
    ("AuthenticationFailed", PermissionError), ("UnknownModel", LookupError), ("RateLimited", OSError),
    ("ServerFailed", OSError), ("RequestRefused", ValueError), ("NoLogprobs", OSError), ("NotSupported", ValueError),
    ("AttentionDroppedError", LookupError),
])
def test_every_error_is_a_decoderlab_error_and_its_builtin_kind(name, builtin):
    cls = getattr(errors, name)
    assert issubclass(cls, dl.DecoderlabError) and issubclass(cls, builtin)


def test_the_modules_raise_the_hierarchys_classes(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(dl.DecoderlabError):
        lm.generate("", progress=False)
    with pytest.raises(dl.RecordError, match="top_k"):
        dl.Record(top_k=0)
    with pytest.raises(dl.StrategyError):
        lm.generate(PROMPT, top_p=3.0, progress=False)


def prompt_length(lm):
    return lm.encode(PROMPT)[0].shape[1]


@pytest.mark.parametrize("value, what", [(float("nan"), "NaN"), (float("-inf"), "-inf everywhere"),
                                         (float("inf"), "\\+inf")])
def test_generate_stops_naming_the_step_and_processor_and_keeps_the_steps(tiny_lms, value, what):
    lm = tiny_lms["llama"]
    bad = NaNAfter(prompt_length(lm) + 3, value)
    with pytest.raises(dl.NumericError, match=f"step 3: after NaNAfter, the scores hold {what}") as info:
        lm.generate(PROMPT, max_new_tokens=8, eos_token_id=[], logits_processor=[bad], progress=False)
    err = info.value
    assert err.step == 3 and err.processor == "NaNAfter"
    assert err.trace is not None and err.trace.num_steps == 3  # the three good steps, as recorded
    good = lm.generate(PROMPT, max_new_tokens=3, eos_token_id=[], progress=False)
    assert err.trace.token_ids == good.token_ids


def test_nan_in_the_models_logits_is_named(tiny_lms):
    lm = tiny_lms["qwen2"]
    head = lm.model.get_output_embeddings()
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight[5, 0] = float("nan")
        with pytest.raises(dl.NumericError, match="the model's logits hold NaN") as info:
            lm.generate(PROMPT, max_new_tokens=4, progress=False)
        assert info.value.processor == "model" and info.value.step == 0
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)


def test_a_session_stays_usable_at_the_step_before(tiny_lms):
    lm = tiny_lms["llama"]
    session = lm.session(PROMPT, eos_token_id=[], logits_processor=[NaNAfter(prompt_length(lm) + 2)])
    session.step(2)
    with pytest.raises(dl.NumericError, match="step 2") as info:
        session.step()
    assert session.steps == 2 and info.value.trace.num_steps == 2
    with pytest.raises(dl.NumericError):  # forcing a token still runs the processors, which still fail ...
        session.choose(rank=0)
    assert session.steps == 2
    session.rewind(1)  # ... and the session rewinds and steps on
    session.step()
    assert session.steps == 2 and session.trace.token_ids[:1] == info.value.trace.token_ids[:1]


def test_compare_finishes_the_other_runs(tiny_lms):
    lm = tiny_lms["llama"]
    strategies = {"greedy": {"eos_token_id": []},
                  "broken": {"eos_token_id": [], "logits_processor": [NaNAfter(prompt_length(lm) + 2)]},
                  "top-k": {"do_sample": True, "top_k": 10, "eos_token_id": []}}
    cmp = dl.compare(lm, PROMPT, strategies, seeds=[1, 2], max_new_tokens=6, progress=False)
    assert len(cmp.runs) == 4  # greedy, broken, two top-k seeds
    broken = cmp.trace("broken")
    assert broken.num_steps == 2 and broken.stop_reason.startswith("error: NumericError at step 2 (NaNAfter)")
    assert cmp.trace("greedy").token_ids == lm.generate(PROMPT, max_new_tokens=6, eos_token_id=[],
                                                        progress=False).token_ids
    for seed in (1, 2):
        alone = lm.generate(PROMPT, seed=seed, max_new_tokens=6, progress=False, **strategies["top-k"])
        assert cmp.trace("top-k", seed=seed).token_ids == alone.token_ids


def test_connect_without_the_openai_client_names_the_extra(monkeypatch):
    """openai is an optional extra ([api]): without it, dl.connect says what to install instead of a bare ImportError."""
    import sys

    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` raise ImportError
    with pytest.raises(dl.MissingExtraError, match=r"decoderlab\[api\]"):
        dl.connect(base_url="http://127.0.0.1:9/v1", model="m")


def test_import_needs_no_optional_extra():
    """`import decoderlab` works with only the core dependencies: the extras' libraries are never imported by it."""
    import subprocess
    import sys

    code = ("import sys; sys.modules.update(openai=None, jupyterlab=None, llama_cpp=None, mkdocs=None, pytest=None, "
            "ray=None); import decoderlab as dl; dl.Record(); print(dl.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == dl.__version__
