"""Shared by the export/runtime tests: one tiny model exported once per pytest session, and raw
scans sampled from the real meshes in ../shared/data/shapes."""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np

from btp.config import tiny_config
from btp.io import load_mesh, sample_surface

_EXPORTS: dict[str, tuple[Path, object]] = {}

REAL_SHAPES = ("cgal__stanford_bunny.ply", "cgal__pinion.ply", "trimesh__featuretype_block.ply")


def tiny_export(tmp_path_factory, batch="dynamic"):
    """(model.onnx path, LoadedModel) of a freshly initialised tiny model (torch seed 0), exported
    once per session and batch setting.

    ``$BTP_TEST_MODELS``: a folder shared between test runs. A run with torch copies its exports
    there (``<batch>/tiny.onnx``); a run without torch (the edge-only venv, e.g. Python 3.10) uses
    them - with ``None`` for the LoadedModel - and skips when there are none."""
    import pytest

    key = str(batch)
    shared = os.environ.get("BTP_TEST_MODELS")
    if key not in _EXPORTS:
        if importlib.util.find_spec("torch") is None:
            cached = Path(shared) / key / "tiny.onnx" if shared else None
            if cached is None or not cached.is_file():
                pytest.skip("exporting a model needs torch (the edge-only venv has none); set BTP_TEST_MODELS "
                            "to the folder a run with torch exported them to")
            _EXPORTS[key] = (cached, None)
        else:
            from btp.export.onnx import export_onnx, fresh_model

            loaded = fresh_model(tiny_config(), seed=0)
            path = tmp_path_factory.mktemp(f"tiny-onnx-{key}") / "tiny.onnx"
            export_onnx(loaded, path, batch=batch)
            if shared:
                (Path(shared) / key).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, Path(shared) / key / "tiny.onnx")
            _EXPORTS[key] = (path, loaded)
    return _EXPORTS[key]


def tiny_torch_model(tmp_path_factory):
    """The PyTorch model behind ``tiny_export`` (skips where torch is not installed)."""
    import pytest

    pytest.importorskip("torch", reason="the PyTorch reference needs torch")
    return tiny_export(tmp_path_factory)[1]


def real_scan(shapes_root: Path, name: str = REAL_SHAPES[0], n: int = 3000, seed: int = 0) -> np.ndarray:
    """A raw scan float32 [n, 3] sampled area-weighted from a real mesh, in mesh units."""
    vertices, faces = load_mesh(shapes_root / name)
    points, _ = sample_surface(vertices, faces, n, seed)
    return np.asarray(points, dtype=np.float32)
