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


def test_schema_table_lists_every_array():
    from decoderlab.record.schema import SCHEMA

    text = README.read_text()
    for name, field in SCHEMA.items():
        row = re.search(rf"^\| `{name}`[^|]*\| ([^|]+) \| ([^|]+) \|", text, re.M)
        assert row, f"README's schema table lacks {name}"
        assert row.group(1).strip() == ", ".join(field.dims) and row.group(2).strip() == field.dtype, name


def test_from_tokens_example():
    import decoderlab as dl

    code = block_after("### The trace schema").replace('trace.to_html("t.html")', "trace.to_html()")
    namespace = {"dl": dl}
    exec(compile(code, "README", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.tokens == [" The", " cat", " sat"]
    assert trace.candidates.token.tolist() == [" The", " A", " dog", " cat", " sat", " ran"]


def test_rows_example(tiny_lms):
    code = block_after("### Rows: several seeds").replace('do_sample=True,', 'do_sample=True, max_new_tokens=5, progress=False,')
    namespace = {"lm": tiny_lms["llama"]}
    exec(compile(code, "README", "exec"), namespace)
    trace = namespace["trace"]
    assert trace.runs.seed.tolist() == [1, 2, 3]
    assert trace.row(1).text == trace.texts[1]
