"""The README's examples run as written (on a tiny model where the README uses SmolLM2)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_ban_words_processor_example(tiny_lms):
    code = block_after("## Your own decoding rule")
    lm = tiny_lms["llama"]
    plain = lm.generate("What is the capital of France?", chat=True, max_new_tokens=3, progress=False)
    namespace = {"lm": lm}
    # ban whatever the tiny model says first, to see the rule act
    code = code.replace('[" Paris", "Paris"]', repr([plain.tokens[0]]))
    code = code.replace("chat=True,", "chat=True, max_new_tokens=3, progress=False,")
    exec(compile(code, "README", "exec"), namespace)
    trace = namespace["trace"]
    assert plain.token_ids[0] not in trace.token_ids
    removed = trace.processors.query("mass_removed > 0")
    assert 0 in removed.step.tolist()
    assert removed.processor.unique().tolist() == ["BanWords"]


@pytest.mark.integration
def test_quick_start_example(smol):
    code = block_after("## In five lines").replace("dl.load()", "smol")
    namespace = {"smol": smol}
    exec(compile(code, "README", "exec"), namespace)
    assert namespace["trace"].text == "The capital of France is Paris."
