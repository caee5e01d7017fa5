"""Shared by the export/runtime tests: one tiny model exported once per pytest session, and raw
scans sampled from the real meshes in ../shared/data/shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from btp.config import tiny_config
from btp.io import load_mesh, sample_surface

_EXPORTS: dict[str, tuple[Path, object]] = {}

REAL_SHAPES = ("cgal__stanford_bunny.ply", "cgal__pinion.ply", "trimesh__featuretype_block.ply")


def tiny_export(tmp_path_factory, batch="dynamic"):
    """(model.onnx path, LoadedModel) of a freshly initialised tiny model (torch seed 0), exported
    once per session and batch setting."""
    key = str(batch)
    if key not in _EXPORTS:
        import pytest

        pytest.importorskip("torch", reason="exporting a model needs torch (the edge-only venv has none)")
        from btp.export.onnx import export_onnx, fresh_model

        loaded = fresh_model(tiny_config(), seed=0)
        path = tmp_path_factory.mktemp(f"tiny-onnx-{key}") / "tiny.onnx"
        export_onnx(loaded, path, batch=batch)
        _EXPORTS[key] = (path, loaded)
    return _EXPORTS[key]


def real_scan(shapes_root: Path, name: str = REAL_SHAPES[0], n: int = 3000, seed: int = 0) -> np.ndarray:
    """A raw scan float32 [n, 3] sampled area-weighted from a real mesh, in mesh units."""
    vertices, faces = load_mesh(shapes_root / name)
    points, _ = sample_surface(vertices, faces, n, seed)
    return np.asarray(points, dtype=np.float32)
