"""Benchmark inputs: point clouds sampled from the real meshes in $BTP_SHAPES (the shared shapes).

Every benchmark feeds the same deterministic clouds (mesh, size, seed) to every implementation,
so rows of one report compare the same work. Torch-free.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from btp.io import locations

DEFAULT_MESH = "cgal__stanford_bunny.ply"


def shapes_dir() -> Path:
    """$BTP_SHAPES (btp.io.locations: an error naming the variable when it is unset)."""
    return locations.shapes_dir(None, flag="a mesh path").resolve()


def mesh_path(name: str | None = None) -> Path:
    path = Path(name) if name and Path(name).is_file() else shapes_dir() / (name or DEFAULT_MESH)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark mesh {path} not found: set BTP_SHAPES to the shapes "
                                f"folder or pass a .ply/.off/.obj path")
    return path


@lru_cache(maxsize=8)
def _mesh_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(path)
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.triangles, dtype=np.int64)
    if len(vertices) == 0 or len(faces) == 0:
        raise ValueError(f"{path}: no triangles read; pick another mesh")
    return vertices, faces


def sample_cloud(n_points: int, *, mesh: str | None = None, seed: int = 0) -> np.ndarray:
    """Area-weighted surface sample of ``n_points`` points: float32 [n_points, 3], raw mesh units.

    (Same rule as btp.io.sample_surface; kept here so benchmarks need nothing but open3d.)
    """
    vertices, faces = _mesh_arrays(str(mesh_path(mesh)))
    tri = vertices[faces]  # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=n_points, p=area / area.sum())
    u, v = rng.random(n_points), rng.random(n_points)
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    t = tri[face]
    pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])
    return np.ascontiguousarray(pts, dtype=np.float32)


def unit_sphere(points: np.ndarray) -> np.ndarray:
    """Center at the centroid, divide by the max radius (the pipeline's normalisation)."""
    pts = np.asarray(points, dtype=np.float32)
    centered = pts - pts.mean(axis=0, dtype=np.float64).astype(np.float32)
    radius = float(np.sqrt((centered.astype(np.float64) ** 2).sum(axis=1).max()))
    return np.ascontiguousarray(centered / np.float32(radius if radius > 0 else 1.0))
