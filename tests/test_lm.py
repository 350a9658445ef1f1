"""LM: progress, streaming, and nothing recorded is lost on interruption or error."""
from __future__ import annotations

import pytest
import torch

import decoderlab as dl


def test_progress_bar_shows_tokens_per_second(tiny_lms, capsys):
    tiny_lms["llama"].generate("progress", max_new_tokens=5, progress=True)
    err = capsys.readouterr().err
    assert "tok/s" in err and "decoding" in err
    tiny_lms["llama"].generate("progress", max_new_tokens=5, progress=False)
    assert capsys.readouterr().err == ""


def test_on_token_streams_each_token(tiny_lms):
    seen = []
    trace = tiny_lms["llama"].generate("stream", max_new_tokens=6, progress=False,
                                       on_token=lambda step, text: seen.append((step, text)))
    assert seen == list(enumerate(trace.tokens))




def _raising_processor(after: int, exc: BaseException):
    from transformers import LogitsProcessor

    class Boom(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Boom.calls += 1
            if Boom.calls > after:
                raise exc
            return scores

    return Boom()


def test_ctrl_c_returns_what_was_recorded(tiny_lms):
    lm = tiny_lms["llama"]
    trace = lm.generate("interrupt me", max_new_tokens=10, eos_token_id=[], progress=False,
                        logits_processor=[_raising_processor(4, KeyboardInterrupt())])
    assert trace.num_steps == 4 and trace.stop_reason == "interrupted"
    ref = lm.generate("interrupt me", max_new_tokens=4, eos_token_id=[], progress=False)
    assert trace.token_ids == ref.token_ids


def test_an_error_keeps_the_trace_so_far(tiny_lms):
    lm = tiny_lms["llama"]
    with pytest.raises(RuntimeError, match="boom") as info:
        lm.generate("fail later", max_new_tokens=10, eos_token_id=[], progress=False,
                    logits_processor=[_raising_processor(3, RuntimeError("boom"))])
    trace = info.value.trace
    assert trace.num_steps == 3 and trace.stop_reason == "error: RuntimeError"
    # the model's attention implementation was restored even though the run failed
    assert lm.model.config._attn_implementation == "sdpa"


def test_attention_implementation_restored_after_error_with_attention(tiny_lms):
    lm = tiny_lms["qwen2"]
    with pytest.raises(RuntimeError):
        lm.generate("fail", max_new_tokens=5, progress=False, record=dl.Record(attention=True),
                    logits_processor=[_raising_processor(2, RuntimeError("boom"))])
    assert lm.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        lm.model(input_ids=torch.tensor([[1, 2, 3]]))  # still runs with its own implementation
