"""k nearest neighbours and PointBERT-style grouping (FPS centers + kNN patches), numpy only.

The kNN rule (every backend must give the same *index sets* with the same distances; this
module's two functions give the same index order too):

- ``dist2[g, j] = (x_j - qx_g)^2 + (y_j - qy_g)^2 + (z_j - qz_g)^2`` in **float32**, the
  differences rounded to float32 first, squares added left to right, no FMA (the same formula
  as the FPS rule in ``btp.geometry.sampling``) - not the ``|a|^2 + |b|^2 - 2ab`` expansion.
- each row holds the k smallest, sorted by ``(dist2, index)``: among equal distances the lower
  index comes first, also at the k-th boundary (the lowest indices among a tie get in).
- a query that is itself one of the points finds itself first (dist2 = 0, unless a duplicate
  with a lower index exists).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from btp.geometry._checks import as_points, check_count
from btp.geometry.errors import GeometryError
from btp.geometry.sampling import fps

# candidates fetched from the tree beyond k, so that ties and rounding at the k-th boundary
# can be resolved exactly without going back to brute force
_KNN_EXTRA = 8
# relative margin on dist2 that covers the tree's own float32 rounding
_KNN_MARGIN = 1e-5
# brute force works on blocks of queries of at most this many (query, point) pairs
_BRUTE_BLOCK = 1 << 22


def _dist2_rows(points: np.ndarray, queries: np.ndarray, cand: np.ndarray | None = None) -> np.ndarray:
    """float32 squared distances by the rule: queries [G,3] vs points [N,3] (or points[cand [G,c]]).

    -> [G, N] (or [G, c]).
    """
    if cand is None:
        other = points[None, :, :]  # [1, N, 3]
    else:
        other = points[cand]  # [G, c, 3]
    q = queries[:, None, :]  # [G, 1, 3]
    dx = other[..., 0] - q[..., 0]
    d2 = dx * dx
    dy = other[..., 1] - q[..., 1]
    d2 += dy * dy
    dz = other[..., 2] - q[..., 2]
    d2 += dz * dz
    return d2


def knn_reference(points, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force kNN by the module's rule.

    points [N, 3], queries [G, 3] (both cast to float32), k <= N
    -> (idx int64 [G, k], dist2 float32 [G, k]) sorted by (dist2, index).
    """
    pts = as_points(points)
    qs = as_points(queries, "queries", min_points=0)
    kk = check_count(k, pts.shape[0], "k")
    idx = np.empty((qs.shape[0], kk), dtype=np.int64)
    dist2 = np.empty((qs.shape[0], kk), dtype=np.float32)
    block = max(1, _BRUTE_BLOCK // pts.shape[0])
    for lo in range(0, qs.shape[0], block):
        d2 = _dist2_rows(pts, qs[lo:lo + block])  # [b, N]
        order = np.argsort(d2, axis=1, kind="stable")[:, :kk]  # stable: ties keep index order
        idx[lo:lo + block] = order
        dist2[lo:lo + block] = np.take_along_axis(d2, order, axis=1)
    return idx, dist2


def knn(points, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fast kNN (pykdtree), identical to ``knn_reference`` (indices, order and dist2).

    points [N, 3], queries [G, 3] (cast to float32), k <= N
    -> (idx int64 [G, k], dist2 float32 [G, k]) sorted by (dist2, index).

    The tree returns k + 8 candidates; their dist2 is recomputed by the rule and the rows are
    sorted by (dist2, index). A row whose k-th distance is not safely below the farthest
    candidate's (a tie or a rounding near-tie at the boundary) is recomputed by brute force, so
    the result never depends on pykdtree's order among equal distances.
    Its cost next to other kNN libraries: ``btp-bench ops``. pykdtree runs OpenMP threads
    (OMP_NUM_THREADS); on a CPU shared with other busy processes 1 thread gives steadier times.
    """
    return knn_candidates(points, queries, k, extra=_KNN_EXTRA)


def knn_candidates(points, queries, k: int, *, extra: int) -> tuple[np.ndarray, np.ndarray]:
    """``knn`` with a chosen number of ``extra`` tree candidates beyond k (>= 1); the result is
    the same for any ``extra`` (unsafe rows go to brute force), only the speed differs: few
    queries with large k like ``extra=8``; hundreds of thousands of queries with k <= 3 (raw-scan
    interpolation) like ``extra=1``."""
    pts = as_points(points)
    qs = as_points(queries, "queries", min_points=0)
    n_points = pts.shape[0]
    kk = check_count(k, n_points, "k")
    if qs.shape[0] == 0:
        return np.empty((0, kk), np.int64), np.empty((0, kk), np.float32)
    n_cand = min(n_points, kk + max(1, int(extra)))
    from pykdtree.kdtree import KDTree

    _, cand = KDTree(pts).query(qs, k=n_cand)
    cand = cand.reshape(qs.shape[0], n_cand).astype(np.int64)
    d2 = _dist2_rows(pts, qs, cand)  # [G, c]
    # sort by (dist2, index) in one int64 sort: for dist2 >= 0 the float32 bit pattern read as
    # int32 is monotonic, so key = bits(dist2) << 32 | index orders exactly like the pair
    key = (d2.view(np.int32).astype(np.int64) << 32) | cand  # [G, c]
    key.sort(axis=1)
    cand = key & 0xFFFFFFFF
    d2 = (key >> 32).astype(np.int32).view(np.float32)
    idx, dist2 = cand[:, :kk], d2[:, :kk]
    if n_cand < n_points:
        # points outside the candidate set are at least as far as the farthest candidate
        unsafe = ~(d2[:, kk - 1] < d2[:, -1] * np.float32(1.0 - _KNN_MARGIN))
        if unsafe.any():
            rows = np.nonzero(unsafe)[0]
            idx = idx.copy()
            dist2 = dist2.copy()
            idx[rows], dist2[rows] = knn_reference(pts, qs[rows], kk)
    return np.ascontiguousarray(idx), np.ascontiguousarray(dist2)


class Groups(NamedTuple):
    """PointBERT groups of one cloud (or a batch, with a leading B on every field).

    center_idx int64 [G]: FPS indices into the points (start at ``start_idx``).
    patch_idx int64 [G, K]: kNN of each center among the points, sorted by (dist2, index);
        ``patch_idx[:, 0]`` is the center itself unless it has a lower-index duplicate.
    neighborhood float32 [G, K, C]: ``points[patch_idx] - center[:, None]`` in channels 0..2;
        channels 3..5 (C = 6) the colours of those points, or ``rgb_fill`` without colours.
    center float32 [G, 3]: ``points[center_idx]``.
    """

    center_idx: np.ndarray
    patch_idx: np.ndarray
    neighborhood: np.ndarray
    center: np.ndarray


def group(points, num_group: int, group_size: int, *, start_idx: int = 0, colors=None,
          rgb_fill: float = 0.5, in_channels: int = 6) -> Groups:
    """FPS ``num_group`` centers, then ``group_size`` nearest neighbours of each: see ``Groups``.

    points [N, 3]; colors [N, 3] in [0, 1] or None; in_channels 3 (xyz) or 6 (xyz + rgb).
    Take G, K, C, rgb_fill, start_idx from the config (encoder.num_group, encoder.group_size,
    encoder.in_channels, preprocess.rgb_fill, preprocess.fps_start).
    """
    pts = as_points(points)
    n_points = pts.shape[0]
    check_count(num_group, n_points, "num_group")
    check_count(group_size, n_points, "group_size")
    if in_channels not in (3, 6):
        raise GeometryError(f"in_channels={in_channels}: expected 3 (xyz) or 6 (xyz + rgb); "
                            f"see encoder.in_channels in btp/config.py")
    if colors is not None:
        colors = np.asarray(colors, dtype=np.float32)
        if colors.shape != pts.shape:
            raise GeometryError(f"colors: shape {colors.shape} does not match points {pts.shape}")
    center_idx = fps(pts, num_group, start_idx)  # [G]
    center = pts[center_idx]  # [G, 3]
    patch_idx, _ = knn(pts, center, group_size)  # [G, K]
    return Groups(center_idx, patch_idx, neighborhoods(pts, patch_idx, center, in_channels, rgb_fill, colors), center)


def neighborhoods(points: np.ndarray, patch_idx: np.ndarray, center: np.ndarray, in_channels: int = 6,
                  rgb_fill: float = 0.5, colors: np.ndarray | None = None) -> np.ndarray:
    """The encoder's input: float32 [G, K, C] with ``points[patch_idx] - center[:, None]`` in
    channels 0..2 and, for C = 6, the colours of those points (``colors`` [N, 3]) or ``rgb_fill``."""
    g, k = patch_idx.shape
    out = np.empty((g, k, in_channels), dtype=np.float32)
    out[..., :3] = points[patch_idx] - center[:, None, :]
    if in_channels == 6:
        out[..., 3:] = np.float32(rgb_fill) if colors is None else colors[patch_idx]
    return out


def group_batch(points, num_group: int, group_size: int, *, start_idx: int = 0, colors=None,
                rgb_fill: float = 0.5, in_channels: int = 6) -> Groups:
    """``group`` over a batch: points [B, N, 3] (colors [B, N, 3] or None) -> Groups with a
    leading B on every field (center_idx [B,G], patch_idx [B,G,K], neighborhood [B,G,K,C],
    center [B,G,3]). The same ``start_idx`` is used for every cloud."""
    arr = np.asarray(points)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise GeometryError(f"points: expected a batch of shape [B, N, 3], got {arr.shape}")
    if arr.shape[0] == 0:
        raise GeometryError("points: empty batch (B = 0); pass at least one cloud")
    if colors is not None and np.shape(colors) != arr.shape:
        raise GeometryError(f"colors: shape {np.shape(colors)} does not match points {arr.shape}")
    per_cloud = [group(arr[b], num_group, group_size, start_idx=start_idx,
                       colors=None if colors is None else colors[b], rgb_fill=rgb_fill,
                       in_channels=in_channels) for b in range(arr.shape[0])]
    return Groups(*(np.stack(field) for field in zip(*per_cloud)))
