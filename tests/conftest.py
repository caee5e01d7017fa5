"""Shared fixtures: real shapes from ../shared/data/shapes (or $BTP_SHAPES)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shapes_dir() -> Path:
    return Path(os.environ.get("BTP_SHAPES", REPO.parent / "shared" / "data" / "shapes")).resolve()


# the library finds the shapes folder through $BTP_SHAPES only (or a --shapes flag); the tests' default
# is the shared folder beside the checkout, handed to the library the same way
os.environ.setdefault("BTP_SHAPES", str(shapes_dir()))


@pytest.fixture(scope="session")
def shapes_root() -> Path:
    root = shapes_dir()
    if not root.is_dir():
        pytest.fail(f"real shapes not found at {root}: set BTP_SHAPES or put shared/ beside the repo")
    return root


@pytest.fixture(scope="session")
def bunny_mesh(shapes_root) -> Path:
    return shapes_root / "cgal__stanford_bunny.ply"
