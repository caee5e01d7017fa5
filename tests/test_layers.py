"""Imports run one way (docs/design.md): every ``import`` in the package, function-level ones
included, goes to the same floor or one below it, and no import closes a circle: neither between
the packages of one floor (train -> eval -> train) nor between the files of one package
(build.py -> cuda_python.py -> build.py).

    config, errors -> io, geometry, metrics -> kernels -> runtime -> model, train, eval, export -> benchmarks -> cli
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "btp"

FLOORS = (
    ("btp", "btp.config", "btp.errors"),
    ("btp.io", "btp.geometry", "btp.metrics"),
    ("btp.kernels",),
    ("btp.runtime",),
    ("btp.model", "btp.train", "btp.eval", "btp.export"),
    ("btp.benchmarks",),
    ("btp.cli",),
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(module: str) -> int:
    """The floor of the longest prefix of ``module`` that names a room in FLOORS."""
    best, floor = -1, None
    for level, rooms in enumerate(FLOORS):
        for room in rooms:
            if (module == room or module.startswith(room + ".")) and len(room) > best:
                best, floor = len(room), level
    if floor is None:
        raise AssertionError(f"{module}: no floor in FLOORS; add its package there")
    return floor


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported btp module) for every import statement in the file, at any depth.
    ``from btp.train import data`` names the module btp.train.data when that file exists, else
    the package btp.train (whose ``__init__`` then runs the import)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    modules = set(module_names())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from btp import runtime` imports the submodule btp.runtime
            found += [(node.lineno, f"{base}.{alias.name}" if base == "btp" or f"{base}.{alias.name}" in modules
                       else base) for alias in node.names]
    return [(line, name) for line, name in found if name == "btp" or name.startswith("btp.")]


def python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def module_names() -> list[str]:
    return [module_name(p) for p in python_files()]


def room_of(module: str) -> str:
    """The package of FLOORS that ``module`` lives in (the longest matching room)."""
    rooms = [room for rooms in FLOORS for room in rooms if module == room or module.startswith(room + ".")]
    return max(rooms, key=len)


def import_edges() -> list[tuple[str, str, str]]:
    """(importing module, imported module, "file:line") for every import between two btp modules;
    an imported name that is no file (``import btp.geometry.scores.x``) counts as its module."""
    modules = set(module_names())
    edges = []
    for path in python_files():
        source = module_name(path)
        for line, target in imports_of(path):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != source:
                edges.append((source, target, f"{path.relative_to(PACKAGE.parent)}:{line}"))
    return edges


def circles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """The import circles of a graph: for every group of nodes that all reach each other
    (a strongly connected component of more than one node), the imports inside the group."""
    succ: dict[str, set[str]] = {}
    for a, b, _ in edges:
        succ.setdefault(a, set()).add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in succ.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {node: reach(node) for node in succ}
    groups = []
    for node in sorted(succ):
        group = {node} | {other for other in reached[node] if node in reached.get(other, ())}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return [sorted({f"{where} {a} -> {b}" for a, b, where in edges if a in group and b in group}) for group in groups]


def same_floor_circles() -> list[list[str]]:
    """Circles between the packages of one floor (btp.train <-> btp.eval), through any files."""
    rooms = [(room_of(a), room_of(b), f"{where} ({a} -> {b})") for a, b, where in import_edges()]
    return circles([(a, b, where) for a, b, where in rooms if a != b])


def file_circles() -> list[list[str]]:
    """Circles between the files of one package (build.py <-> cuda_python.py)."""
    return circles([(a, b, where) for a, b, where in import_edges() if room_of(a) == room_of(b)])


def upward_imports() -> list[str]:
    bad = []
    for path in python_files():
        mine = floor_of(module_name(path))
        for line, target in imports_of(path):
            if floor_of(target) > mine:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({FLOORS[mine][0]}, floor {mine}) imports "
                           f"{target} (floor {floor_of(target)})")
    return bad


def test_no_upward_imports():
    bad = upward_imports()
    assert not bad, "imports that run up the floors:\n" + "\n".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path, monkeypatch):
    """The walk must catch an upward import hidden in a function or spelled relatively."""
    fake = tmp_path / "btp"
    (fake / "io").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "io" / "__init__.py").write_text("")
    (fake / "io" / "hidden.py").write_text("def f():\n    from btp.runtime import Pipeline\n")
    (fake / "io" / "relative.py").write_text("from ..cli import main\n")
    (fake / "io" / "fine.py").write_text("from btp.config import BTPConfig\nfrom . import hidden\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    bad = upward_imports()
    assert len(bad) == 2, bad
    assert any("hidden.py:2" in b and "btp.runtime" in b for b in bad)
    assert any("relative.py:1" in b and "btp.cli" in b for b in bad)


def test_no_import_circles_between_packages_of_one_floor():
    found = same_floor_circles()
    assert not found, "packages of one floor that import each other:\n" + "\n\n".join("\n".join(c) for c in found)


def test_no_import_circles_between_files_of_one_package():
    found = file_circles()
    assert not found, "files of one package that import each other:\n" + "\n\n".join("\n".join(c) for c in found)


def test_the_checker_sees_circles_on_one_floor_and_in_one_package(tmp_path, monkeypatch):
    """Planted circles: btp.train <-> btp.eval (one import inside a function) and, inside btp.io,
    a.py -> b.py -> c.py -> a.py; an import of a package's own __init__ or of the floor below is no circle."""
    fake = tmp_path / "btp"
    for room in ("io", "train", "eval", "model"):
        (fake / room).mkdir(parents=True)
        (fake / room / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "train" / "loop.py").write_text("from btp.model import net\n\ndef f():\n    from btp.eval.metrics import auroc\n")
    (fake / "eval" / "metrics.py").write_text("def auroc():\n    pass\n")
    (fake / "eval" / "sets.py").write_text("from btp.train import loop\n")
    (fake / "model" / "net.py").write_text("from btp.io import a\n")
    (fake / "io" / "a.py").write_text("from btp.io.b import x\n")
    (fake / "io" / "b.py").write_text("x = 1\n\ndef g():\n    from . import c\n")
    (fake / "io" / "c.py").write_text("import btp.io.a\nfrom btp.io import d\n")
    (fake / "io" / "d.py").write_text("import btp.io\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    floors = same_floor_circles()
    assert len(floors) == 1 and len(floors[0]) == 2, floors
    assert any("train/loop.py:4" in c and "btp.eval.metrics" in c for c in floors[0])
    assert any("eval/sets.py:1" in c and "btp.train.loop" in c for c in floors[0])
    files = file_circles()
    assert len(files) == 1, files
    assert [c.split()[0] for c in files[0]] == ["btp/io/a.py:1", "btp/io/b.py:4", "btp/io/c.py:1"], files
    assert not upward_imports()


@pytest.mark.parametrize("module,floor", [("btp.config", 0), ("btp.geometry.prepare", 1), ("btp.metrics", 1), ("btp.kernels.ops", 2),
                                          ("btp.runtime.pipeline", 3), ("btp.export.onnx", 4), ("btp.cli.run", 6)])
def test_floors(module, floor):
    assert floor_of(module) == floor


def test_one_prepared_class():
    """One type carries a prepared scan through runtime, eval, train, export and the kernels."""
    hits = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and "Prepared" in node.name:
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}")
    assert len(hits) == 1 and hits[0].startswith("btp/geometry/prepare.py:") and hits[0].endswith(" Prepared"), hits
