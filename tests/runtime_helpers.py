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
BUNNY, PINION, BLOCK = REAL_SHAPES


def tiny_export(tmp_path_factory, batch="dynamic", patch_embed: bool = False):
    """(model.onnx path, LoadedModel) of a freshly initialised tiny model (torch seed 0), exported
    once per session and batch setting (``patch_embed``: with that optional output).

    ``$BTP_TEST_MODELS``: a folder shared between test runs. A run with torch copies its exports
    there (``<batch>/tiny.onnx``); a run without torch (the edge-only venv, e.g. Python 3.10) uses
    them - with ``None`` for the LoadedModel - and skips when there are none."""
    import pytest

    key = str(batch) + ("-embed" if patch_embed else "")
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
            export_onnx(loaded, path, batch=batch, patch_embed=patch_embed)
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


def turned(points: np.ndarray, seed: int) -> np.ndarray:
    """The scan under a random rotation (any angle) and a shift of ``seed`` units."""
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(random_state=seed).as_matrix()
    return (points @ rot.T + np.float32(seed)).astype(np.float32)


def with_bump(points: np.ndarray, at: int = 0, radius: float = 0.08, height: float = 0.06) -> np.ndarray:
    """A smooth bump pushed out of the surface around point ``at`` (fractions of the part's size)."""
    size = float(np.linalg.norm(np.ptp(points, axis=0)))
    d = np.linalg.norm(points - points[at], axis=1) / size
    out = points - points.mean(axis=0)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    push = height * size * np.clip(1 - d / radius, 0, None)[:, None] ** 2
    return (points + push * out).astype(np.float32)


def build_references(root: Path, model_path: Path, shapes_root: Path, n: int = 3000,
                     parts: tuple[str, ...] = ("bunny", "block"), options: tuple[str, ...] = ()) -> Path:
    """root/refs/{bunny,block}.btpref (those of ``parts``), each built by `btp reference build
    [options]` from 3 good scans in random poses."""
    from typer.testing import CliRunner

    from btp.cli import app
    from btp.io import write_point_cloud

    for name, mesh in (("bunny", BUNNY), ("block", BLOCK)):
        if name not in parts:
            continue
        good = root / f"good-{name}"
        good.mkdir(parents=True)
        for i in range(3):
            write_point_cloud(good / f"g{i}.pcd", turned(real_scan(shapes_root, mesh, n=n, seed=10 + i), 10 + i))
        (root / "refs").mkdir(exist_ok=True)
        res = CliRunner().invoke(app, ["reference", "build", str(good), "--model", str(model_path),
                                       "--out", str(root / "refs" / f"{name}.btpref"), *options])
        assert res.exit_code == 0, res.output
    return root / "refs"
