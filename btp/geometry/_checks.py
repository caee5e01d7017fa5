"""Input validation shared by the geometry ops (numpy only)."""
from __future__ import annotations

import numpy as np

from btp.geometry.errors import GeometryError


def as_points(points, name: str = "points", *, min_points: int = 1) -> np.ndarray:
    """Return `points` as C-contiguous float32 [N, 3]; raise GeometryError naming `name` otherwise."""
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise GeometryError(f"{name}: expected an array of shape [N, 3], got {arr.shape}; "
                            f"pass xyz coordinates only (slice colours off with [:, :3])")
    if arr.shape[0] < min_points:
        raise GeometryError(f"{name}: {arr.shape[0]} points, need at least {min_points}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise GeometryError(f"{name}: contains NaN or inf; drop those rows first "
                            f"(btp.io.read_point_cloud does that for files)")
    return arr


def check_start(start_idx: int, n_points: int) -> int:
    start = int(start_idx)
    if start != start_idx or not 0 <= start < n_points:
        raise GeometryError(f"start_idx={start_idx!r} outside [0, {n_points}); "
                            f"set preprocess.fps_start in the config to a valid index")
    return start


def check_count(n: int, n_points: int, what: str) -> int:
    count = int(n)
    if count != n or count < 1:
        raise GeometryError(f"{what}={n!r}: expected a positive integer")
    if count > n_points:
        raise GeometryError(f"{what}={count} > {n_points} available points; "
                            f"lower {what} or give a denser cloud")
    return count
