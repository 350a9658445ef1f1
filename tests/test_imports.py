"""The house: decoderlab's rooms (subpackages) and the rules between them, checked from the source.

- no import circle between modules, counting imports inside functions and under TYPE_CHECKING alike (a circle
  means two modules are one idea split in two, or one leans on the other's internals);
- no arrow from the engine, record or trace rooms up to a view;
- an underscored name is imported only inside its own room;
- no module over 500 lines; every room's `__init__` says what the room is for;
- the decoding rule is chosen in one table: no module compares a rule's name.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "decoderlab"
ROOMS = ("engine", "record", "trace", "backends", "analysis", "views", "study")
LOW_ROOMS = ("engine", "record", "trace")


def module_name(path: Path) -> str:
    """decoderlab/engine/rules/__init__.py -> 'decoderlab.engine.rules'; decoderlab/engine/loop.py -> ..."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of a relative import's base."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, inside functions and under
    TYPE_CHECKING too. `from pkg import mod` counts as an import of pkg.mod where that is a module."""
    out: list[tuple[str, list[str]]] = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
            if not base.startswith("decoderlab"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out.extend((s, []) for s in subs)
            rest = [n for n in names if f"{base}.{n}" not in known]
            if rest or not subs:
                out.append((base, rest))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names if a.name.startswith("decoderlab"))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = {t for t, _ in imports_of(name, path, known) if t in known and t != name}
        graph[name] = targets
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    colour: dict[str, int] = {}
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        colour[m] = 1
        path.append(m)
        for n in sorted(graph.get(m, ())):
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


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS) else "decoderlab"


def test_the_walker_sees_circles_and_function_imports():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "decoderlab.views.html" in graph["decoderlab"]  # the front door imports the page inside a function
    assert "decoderlab.engine.loop" in graph["decoderlab.engine.rules"]  # `from .. import loop`
    assert "decoderlab.engine.rules.sampling" in graph["decoderlab.engine.words"]


def test_no_import_circle():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_room_circle():
    """Rooms too: engine < record < trace < backends < analysis < views < study, nothing importing upwards."""
    order = {r: i for i, r in enumerate(("decoderlab.errors",) + ROOMS)}
    graph = import_graph()
    for module, targets in graph.items():
        here = room(module)
        if here not in ROOMS:
            continue
        for target in targets:
            there = room(target)
            if there in ROOMS and there != here:
                assert order[there] < order[here], f"{module} ({here}) imports {target} ({there}), a room above it"


def test_low_rooms_never_import_a_view():
    for module, targets in import_graph().items():
        if room(module) in LOW_ROOMS:
            assert not [t for t in targets if room(t) == "views"], module


def test_private_names_stay_in_their_room():
    mods = modules()
    known = set(mods)
    crossing = []
    for name, path in mods.items():
        for target, names in imports_of(name, path, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and room(target) != room(name):
                crossing.append(f"{name} takes {private} from {target}")
            if target.rsplit(".", 1)[-1].startswith("_") and not target.endswith("__") and room(target) != room(name):
                crossing.append(f"{name} imports the private module {target}")
    assert not crossing, crossing


def test_modules_are_small_and_rooms_say_what_they_are_for():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()}
    assert not {n: s for n, s in sizes.items() if s > 500}, "modules over 500 lines"
    for r in ROOMS:
        doc = ast.get_docstring(ast.parse((PACKAGE / r / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc.split()) >= 12, f"decoderlab/{r}/__init__.py says what the room is for"
    assert not list(PACKAGE.glob("*.py")) or {p.stem for p in PACKAGE.glob("*.py")} <= {
        "__init__", "__main__", "cli", "errors", "formats", "moved"}, "a module outside the rooms"


def test_the_rule_is_chosen_in_one_table():
    """No module compares a strategy's rule by name; `engine.rules.TABLE` is the only place that decides."""
    pattern = re.compile(r"""(\.method\b|rule\.name\s*[=!]=|["'](beam|group beam|contrastive|dola|token)["']\s*[=!]=)""")
    found = [f"{name}: {line.strip()}" for name, path in modules().items()
             for line in path.read_text(encoding="utf-8").splitlines() if pattern.search(line)]
    assert not found, found


def test_old_addresses_still_import_with_a_warning():
    """Code written for the flat layout (`from decoderlab.whatif import run_words`) keeps working, warned."""
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            "import decoderlab\n"
            "from decoderlab.analysis.whatif import run_words as new\n"
            "try:\n    from decoderlab.whatif import run_words\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from decoderlab.whatif import run_words\nprint(run_words is new)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["decoderlab.whatif moved to decoderlab.analysis.whatif; import it from "
                                          "there (or from decoderlab)", "True"]
