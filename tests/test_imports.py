"""The package's modules form no import circle, counting imports inside functions.

A circle means two modules are one idea split in two (or one leans on the other's internals); it
also makes import order matter. Imports under `if TYPE_CHECKING:` never run, so they do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "decoderlab"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """decoderlab modules that `path` imports, anywhere in it but under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module or ""
                if base:
                    found.add(base.split(".")[0])
                else:  # from . import x, y
                    found.update(a.name for a in node.names if a.name in modules)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "decoderlab":
                parts = node.module.split(".")
                found.add(parts[1] if len(parts) > 1 else "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "decoderlab":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found & modules


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {m: _imports(PACKAGE / f"{m}.py", modules) - {m} for m in modules}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    colour: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        colour[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if colour.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in colour:
                found = dfs(n)
                if found:
                    return found
        colour[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in colour:
            found = dfs(m)
            if found:
                return found
    return None


def test_the_walker_sees_circles_and_function_imports():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "html" in graph["trace"]  # Trace.to_html imports html inside the method: it counts
    assert "lm" in graph["__init__"]


def test_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)
