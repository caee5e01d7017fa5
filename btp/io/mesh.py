"""Triangle meshes: ``load_mesh`` (open3d) and deterministic area-weighted ``sample_surface``.

The training side samples clean surfaces from ``shared/data/shapes`` and builds synthetic
defects from the returned face indices. Torch-free.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from btp.io.errors import EmptyCloudError, MalformedFileError, MissingFileError, UnsupportedFormatError

MESH_SUFFIXES = (".ply", ".obj", ".off", ".stl", ".gltf", ".glb")


def load_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh -> ``(vertices float64 [V,3], faces int64 [F,3])``."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise UnsupportedFormatError(path, f"unknown mesh extension {path.suffix!r}; "
                                           f"supported: {', '.join(MESH_SUFFIXES)}")
    if not path.is_file():
        raise MissingFileError(path, "no such mesh file: check the path")
    import open3d as o3d

    mesh = o3d.io.read_triangle_mesh(str(path))
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.triangles, dtype=np.int64)
    if faces.shape[0] == 0 or vertices.shape[0] == 0:
        raise EmptyCloudError(path, f"the mesh has {vertices.shape[0]} vertices and {faces.shape[0]} "
                                    "triangles; a surface needs both (is it a point cloud? use read_point_cloud)")
    return vertices, faces


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniformly on the surface (area-weighted), reproducible by ``seed``.

    vertices [V,3], faces [F,3] -> ``(points float32 [n,3], face_idx int64 [n])``; point ``i``
    lies on triangle ``faces[face_idx[i]]``. Degenerate (zero-area) faces are never picked.
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise MalformedFileError(None, f"expected vertices [V,3] and faces [F,3], got {vertices.shape} "
                                       f"and {faces.shape}")
    if n < 0:
        raise ValueError(f"sample_surface: n={n} must be >= 0")
    if faces.size and (faces.min() < 0 or faces.max() >= vertices.shape[0]):
        raise MalformedFileError(None, f"face indices outside 0..{vertices.shape[0] - 1}")
    a, b, c = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]  # [F,3] each
    areas = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)  # [F]
    cumulative = np.cumsum(areas)
    if faces.shape[0] == 0 or not np.isfinite(cumulative[-1]) or cumulative[-1] <= 0:
        raise EmptyCloudError(None, "the mesh has no triangle with a positive finite area to sample")
    rng = np.random.default_rng(seed)
    picks = rng.random(n) * cumulative[-1]
    face_idx = np.searchsorted(cumulative, picks, side="right").clip(max=faces.shape[0] - 1)  # [n]
    # Uniform barycentric coordinates: sqrt trick (Osada et al. 2002).
    r1 = np.sqrt(rng.random(n))[:, None]
    r2 = rng.random(n)[:, None]
    points = (1.0 - r1) * a[face_idx] + r1 * (1.0 - r2) * b[face_idx] + r1 * r2 * c[face_idx]
    return points.astype(np.float32), face_idx.astype(np.int64)
