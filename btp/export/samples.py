"""Real samples for export parity and the demo: points sampled from the meshes shipped in btp/data.

Torch-free. The engine inputs are made by the runtime's own CPU chain (``btp.geometry.prepare``),
so parity covers exactly what ``Pipeline`` feeds the engine.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from btp.config import BTPConfig

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def shipped_meshes() -> list[Path]:
    """The sample meshes in btp/data (MIT, from trimesh; see btp/data/README.md)."""
    meshes = sorted(DATA_DIR.glob("*.ply"))
    if not meshes:
        raise FileNotFoundError(f"no sample meshes in {DATA_DIR}: the btp-edge install is incomplete "
                                "(package data btp/data/*.ply missing)")
    return meshes


def sample_scans(n_scans: int, n_points: int, seed: int = 0, meshes: list[Path] | None = None) -> list[np.ndarray]:
    """``n_scans`` raw scans float32 [n_points, 3] sampled area-weighted from real meshes (cycled)."""
    from btp.io import load_mesh, sample_surface

    meshes = meshes or shipped_meshes()
    scans = []
    for i in range(n_scans):
        vertices, faces = load_mesh(meshes[i % len(meshes)])
        points, _ = sample_surface(vertices, faces, n_points, seed + i)
        scans.append(np.asarray(points, dtype=np.float32))
    return scans


def engine_inputs(scans: list[np.ndarray], cfg: BTPConfig) -> tuple[np.ndarray, np.ndarray]:
    """Raw scans -> (neighborhood float32 [B,G,K,C], center float32 [B,G,3]) by the runtime's chain
    with the reference (exact) rule."""
    from btp.geometry.prepare import engine_batch, prepare

    return engine_batch([prepare(scan, cfg, "exact") for scan in scans])


def parity_inputs(cfg: BTPConfig, n_scans: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Engine inputs of ``n_scans`` real sampled shapes (2 N raw points each, downsampled like a scan)."""
    return engine_inputs(sample_scans(n_scans, 2 * cfg.preprocess.num_points, seed), cfg)
