"""The README's example runs as written, and its links lead somewhere. (The guide's examples moved to docs/: their
tests are in tests/test_docs.py.)"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


@pytest.mark.integration
def test_quick_start_example(smol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes run.html
    code = block_after("## In a few lines").replace("dl.load()", "smol")
    namespace = {"smol": smol}
    exec(compile(code, "README", "exec"), namespace)
    assert namespace["trace"].text == "The capital of France is Paris."
    assert (tmp_path / "run.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_readme_is_short_and_its_links_exist():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local, "the README links into the docs"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"
