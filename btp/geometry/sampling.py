"""Farthest point sampling (FPS): the reference rule, its fast CPU path, and raw-scan downsampling.

The FPS rule (every backend - numpy, fpsample, the CUDA kernel in btp.kernels - must give the
*identical* index sequence):

1. ``idx[0] = start_idx`` (explicit, never random).
2. ``min_d2[j] = +inf`` for all j; after picking ``last``:
   ``d2[j] = (x_j - x_last)^2 + (y_j - y_last)^2 + (z_j - z_last)^2`` evaluated in **float32**,
   the differences rounded to float32 first, the three squares added left to right
   (``(dx*dx + dy*dy) + dz*dz``), no fused multiply-add (CUDA: use ``__fmul_rn``/``__fadd_rn``
   or compile with ``-fmad=false``); ``min_d2 = minimum(min_d2, d2)``.
3. ``idx[i] = argmax(min_d2)``; among equal maxima the **lowest index wins**. Already picked
   points have ``min_d2 == 0``; they are picked again only when every point has ``min_d2 == 0``
   (more samples requested than distinct points), and then the lowest such index (this is the
   same argmax rule, no special case).

float32 is the defining precision (it is what the runtime and the CUDA kernel compute in); a
float64 evaluation can differ on near-ties, so the inputs are cast to float32 before anything.
"""
from __future__ import annotations

import numpy as np

from btp.geometry._checks import as_points, check_count, check_start
from btp.geometry.errors import GeometryError


def fps_reference(points, n_samples: int, start_idx: int = 0) -> np.ndarray:
    """Plain-numpy FPS, the definition of the rule in this module's docstring.

    points [N, 3] (cast to float32) -> indices int64 [n_samples]. O(N * n_samples).
    """
    pts = as_points(points)
    n_points = pts.shape[0]
    n = check_count(n_samples, n_points, "n_samples")
    last = check_start(start_idx, n_points)
    xs, ys, zs = (np.ascontiguousarray(pts[:, c]) for c in range(3))
    min_d2 = np.full(n_points, np.inf, dtype=np.float32)
    d2 = np.empty(n_points, dtype=np.float32)
    tmp = np.empty(n_points, dtype=np.float32)
    out = np.empty(n, dtype=np.int64)
    out[0] = last
    for i in range(1, n):
        # d2 = (dx*dx + dy*dy) + dz*dz, every step rounded to float32
        np.subtract(xs, xs[last], out=d2)
        np.multiply(d2, d2, out=d2)
        np.subtract(ys, ys[last], out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        np.add(d2, tmp, out=d2)
        np.subtract(zs, zs[last], out=tmp)
        np.multiply(tmp, tmp, out=tmp)
        np.add(d2, tmp, out=d2)
        np.minimum(min_d2, d2, out=min_d2)
        last = int(np.argmax(min_d2))  # np.argmax returns the first (lowest) index among ties
        out[i] = last
    return out


def fps(points, n_samples: int, start_idx: int = 0) -> np.ndarray:
    """Fast FPS with exactly the reference's indices (the rule in this module's docstring).

    points [N, 3] (cast to float32) -> indices int64 [n_samples].

    Uses fpsample's vanilla ``fps_sampling`` (compiled, ~10x numpy). fpsample breaks argmax ties
    towards the *highest* index, so it runs on the reversed cloud (start ``N-1-start_idx``) and
    the indices are mapped back (``N-1-i``): the highest reversed index is the lowest original
    one. tests/test_geometry.py pins the equality on real meshes, lattices with exact ties,
    duplicated points and offset clouds where float32 rounding matters.
    Note: fpsample's *bucket* variants ignore ``start_idx`` (they reorder points for their
    tree), so they are never used for this rule; see ``downsample`` for the approximate path.
    """
    pts = as_points(points)
    n_points = pts.shape[0]
    n = check_count(n_samples, n_points, "n_samples")
    start = check_start(start_idx, n_points)
    import fpsample

    reversed_pts = np.asfortranarray(pts[::-1])
    picked = fpsample.fps_sampling(reversed_pts, n, start_idx=n_points - 1 - start)
    return (n_points - 1) - picked.astype(np.int64)


DOWNSAMPLE_METHODS = ("auto", "exact", "bucket", "voxel")


def downsample(points, n_samples: int, start_idx: int = 0, method: str = "auto") -> np.ndarray:
    """Indices of ``n_samples`` points of a (possibly huge) raw scan, deterministic.

    points [M, 3] -> indices int64 [n_samples] into ``points``. If M <= n_samples, every index
    once is returned in order when equal, and an error otherwise.

    Methods:
    - ``"exact"``: ``fps`` (the full rule, identical on every backend).
    - other methods are filled in after measurement (see docs/design.md).
    """
    pts = as_points(points)
    n = check_count(n_samples, pts.shape[0], "n_samples")
    if method not in DOWNSAMPLE_METHODS:
        raise GeometryError(f"downsample method={method!r}: choose one of {DOWNSAMPLE_METHODS}")
    return fps(pts, n, start_idx)
