"""Imports run one way (docs/design.md): every ``import`` in the package, function-level ones
included, goes to the same floor or one below it.

    config, errors -> io, geometry -> kernels -> runtime -> model, train, eval, export -> benchmarks -> cli
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "btp"

FLOORS = (
    ("btp", "btp.config", "btp.errors"),
    ("btp.io", "btp.geometry"),
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
    """(line, imported btp module) for every import statement in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
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
            found += [(node.lineno, f"{base}.{alias.name}" if base == "btp" else base) for alias in node.names]
    return [(line, name) for line, name in found if name == "btp" or name.startswith("btp.")]


def python_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


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


@pytest.mark.parametrize("module,floor", [("btp.config", 0), ("btp.geometry.prepare", 1), ("btp.kernels.ops", 2),
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
