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

import functools
from dataclasses import dataclass

import numpy as np

from btp.config import PreprocessConfig
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


@functools.lru_cache(maxsize=1)
def _fpsample():
    """fpsample >= 1.0 (``fps_sampling`` + ``bucket_fps_kdline_sampling`` with ``start_idx``), or None
    where it is not installed (its aarch64/cp310 wheels stop at 0.3.3, another API)."""
    try:
        import fpsample
    except ImportError:
        return None
    ok = all(hasattr(fpsample, f) for f in ("fps_sampling", "bucket_fps_kdline_sampling"))
    return fpsample if ok and int(getattr(fpsample, "__version__", "1").split(".")[0]) >= 1 else None


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
    fpsample = _fpsample()
    if fpsample is None:  # same indices, ~10x slower (machines without fpsample >= 1.0: aarch64 cp310)
        return fps_reference(pts, n, start)
    reversed_pts = np.asfortranarray(pts[::-1])
    picked = fpsample.fps_sampling(reversed_pts, n, start_idx=n_points - 1 - start)
    return (n_points - 1) - picked.astype(np.int64)


DOWNSAMPLE_METHODS = ("auto", "exact", "bucket", "voxel")
# fpsample bucket_fps_kdline_sampling tree height (bucket size 2**h): fastest measured at 400k
BUCKET_HEIGHT = 7
# "voxel" keeps about this many occupied cells per requested sample, FPS then picks among them:
# the default of the models' ``preprocess.voxel_reps``
VOXEL_REPS_PER_SAMPLE = PreprocessConfig.voxel_reps
# "auto" in the canonical order: the anchored bucket FPS over every point up to this many points per
# sample, the voxel rule above (models/btp-geo-4k.md, "Stability": the bucket FPS's samples stay put
# when the part is turned; end to end it costs 0.99x the voxel rule's time at 8192 points, 1.26x at 8N)
AUTO_BUCKET_PER_SAMPLE = 8
# a dense voxel grid (one int32 per cell) up to this many cells; beyond it the cells are found by
# sorting their keys (far outliers stretch the grid; same result, slower)
DENSE_GRID_MAX_CELLS = 1 << 24


@dataclass(frozen=True)
class VoxelMap:
    """The voxel rule's record of a raw scan: which cell each raw point fell in, and each cell's
    representative. Interpolation back to the raw scan is then a gather:
    ``raw_scores = rep_scores[cell_of_raw]`` with ``rep_scores`` the scores at ``cell_rep``.

    cell_rep     int64 [R]  each occupied cell's representative (cells in key order): its lowest raw
                            index, or its lowest ``point_hash`` in the canonical order
    cell_of_raw  int32 [M]  each raw point's cell (an index into cell_rep)
    voxel        float      the cell side, in the scan's units
    """

    cell_rep: np.ndarray
    cell_of_raw: np.ndarray
    voxel: float


def resolve_method(method: str, n_points: int | None = None, n_samples: int | None = None, *,
                   canonical: bool = False) -> str:
    """``method`` with "auto" resolved (and "bucket" -> "voxel" where fpsample >= 1.0 is missing).

    "auto": the voxel rule (exact FPS of 8192 -> 2048 points alone costs more than the engine),
    except in the canonical order for a scan of at most ``AUTO_BUCKET_PER_SAMPLE`` x ``n_samples``
    points: the anchored bucket FPS over all of them, whose samples do not move when the part is
    turned (``bucket_fps``) and which costs about what the voxel rule does at that size."""
    if method not in DOWNSAMPLE_METHODS:
        raise GeometryError(f"downsample method={method!r}: choose one of {DOWNSAMPLE_METHODS}")
    if method == "auto":
        small = n_points is not None and n_samples is not None and n_points <= AUTO_BUCKET_PER_SAMPLE * n_samples
        method = "bucket" if canonical and small else "voxel"
    if method == "bucket" and _fpsample() is None:
        method = "voxel"  # the other approximate rule (no fpsample on this machine)
    return method


def downsample(points, n_samples: int, start_idx: int = 0, method: str = "auto", *,
               anchored: bool = False) -> np.ndarray:
    """Indices of ``n_samples`` well-spread points of a (possibly huge) raw scan, deterministic.

    points [M, 3] (cast to float32) -> indices int64 [n_samples] into ``points``; the same input
    gives the same indices on every call.

    Methods:
    - ``"exact"``: ``fps`` - the full FPS rule (start at ``start_idx``, ties -> lowest index);
      the one the CUDA kernel reproduces, so use it where CPU and GPU must agree bit for bit.
    - ``"bucket"``: fpsample ``bucket_fps_kdline_sampling`` (QuickFPS, h = 7). It is FPS over a
      kd-tree; it does NOT start at ``start_idx`` (fpsample reorders the points for its tree and
      reads ``start_idx`` in that order, so the first index is some other point) and its ties
      follow its tree, so its indices differ from ``"exact"``; its spread is as good.
    - ``"voxel"``: ``voxel_downsample``: one representative per cell of a voxel grid sized so
      that about ``VOXEL_REPS_PER_SAMPLE`` * n_samples cells are occupied (a model's chain reads
      its ``preprocess.voxel_reps``), then FPS over the representatives. It costs one pass over
      the scan, and it keeps the raw-point -> cell map (``VoxelMap``) that makes the
      interpolation back to the raw scan a gather (``btp.geometry.prepare.interpolate``).
    - ``anchored`` (the canonical sampling order): "exact" and "bucket" start from the point
      farthest from the centroid (ties: the lowest row), not at ``start_idx`` or a point
      fpsample's tree picks (``bucket_fps(anchor="centroid")``), so their samples turn with the
      part; ``voxel_downsample(canonical=True)`` starts from a corner of its representatives' box.
    - ``"auto"`` (default): ``"voxel"``; with ``anchored``, ``"bucket"`` for M <=
      ``AUTO_BUCKET_PER_SAMPLE`` x n (``resolve_method``; a scan of M <= n points keeps all of
      them). Without fpsample (``_fpsample``) ``"bucket"`` runs as ``"voxel"``, and ``fps`` as
      ``fps_reference``.

    Their costs on large scans: ``btp-bench latency`` (benchmarks/results/latency-*.md).
    """
    pts = as_points(points)
    n_points = pts.shape[0]
    n = check_count(n_samples, n_points, "n_samples")
    start = check_start(start_idx, n_points)
    method = resolve_method(method, n_points, n, canonical=anchored)
    if method == "exact" or n == n_points:
        return fps(pts, n, _farthest_from_centroid(pts)[0] if anchored else start)
    if method == "voxel":
        return voxel_downsample(pts, n, start)[0]
    height = BUCKET_HEIGHT
    while height > 1 and (1 << height) > n_points:
        height -= 1
    return bucket_fps(pts, n, height, start, anchor="centroid" if anchored else None)


def bucket_fps(points: np.ndarray, n_samples: int, height: int, start_idx: int = 0, *,
               anchor: str | None = None) -> np.ndarray:
    """fpsample's bucket FPS (QuickFPS over a kd-line tree of 2**height buckets): float32 [M, 3]
    -> int64 [n_samples].

    fpsample reads ``start_idx`` in its tree's order, so the first sample is some point that
    depends on the whole set: one point more or less moves it, and every later sample with it.
    ``anchor`` makes the start a function of the point set, which one dropped point rarely changes
    (models/btp-geo-4k.md, "Stability"); ``start_idx`` is not read then:

    - ``"corner"`` (the canonical voxel rule's representatives): an anchor point, below the box of
      the points on every axis by the box's extent, goes first into the input: the tree's first
      bucket then starts with it, FPS takes it first, and it is dropped from the result. The first
      sample is the point farthest from that corner.
    - ``"centroid"`` (the canonical bucket rule over all points): the first sample is the point
      farthest from the centroid (ties: the lowest row), a choice that turns with the part. The
      points are turned about the centroid until that point lies on the diagonal (1, 1, 1), and
      the anchor goes twice the largest radius down the diagonal: below every point on every axis,
      so it is taken first, and the point farthest from it is the one farthest along the diagonal,
      the chosen start. FPS reads distances only, so every later sample is the same for the part
      in any pose (but for float32 near-ties).

    Were the anchor not taken first (another fpsample), the result is still dropped of it and still
    FPS samples, only not anchored ("corner"), or the exact rule from the chosen start
    ("centroid"; about 0.3 s for 32k -> 4096 points on a 2-core Xeon, where the bucket FPS takes
    20 ms). Fewer distinct points than ``n_samples`` (fpsample then repeats its start, the
    anchor): the exact rule (``fps``) from row 0 ("corner") or from the chosen start ("centroid").
    """
    if anchor is None:
        return _fpsample().bucket_fps_kdline_sampling(points, n_samples, height, start_idx=start_idx).astype(np.int64)
    if anchor == "corner":
        low, high = column_bounds(points)
        kept = _after_anchor((low - (high - low)).astype(np.float32), points, n_samples, height)
        return kept if kept.size == n_samples else fps(points, n_samples, 0)
    if anchor != "centroid":
        raise GeometryError(f"anchor={anchor!r}: expected None, 'corner' or 'centroid'")
    far, offsets, radius = _farthest_from_centroid(points)
    if not radius > 0.0:  # all points coincide: any start is the same
        return fps(points, n_samples, 0)
    turned = (offsets @ _onto_diagonal(offsets[far] / radius).T).astype(np.float32)
    kept = _after_anchor(np.full(3, -2.0 * radius, dtype=np.float32), turned, n_samples, height)
    if kept.size == n_samples and np.array_equal(points[kept[0]], points[far]):  # far or a copy of it
        return kept
    return fps(points, n_samples, far)


def _farthest_from_centroid(points: np.ndarray) -> tuple[int, np.ndarray, float]:
    """(the row farthest from the centroid - ties: the lowest row -, float64 offsets from the
    centroid [M, 3], that row's distance)."""
    p64 = np.asarray(points, dtype=np.float64)
    offsets = p64 - p64.mean(axis=0)
    d2 = np.einsum("ij,ij->i", offsets, offsets)
    far = int(np.argmax(d2))
    return far, offsets, float(np.sqrt(d2[far]))


def _after_anchor(anchor: np.ndarray, points: np.ndarray, n_samples: int, height: int) -> np.ndarray:
    """fpsample's bucket FPS over ``anchor`` [3] followed by ``points`` [M, 3], the anchor dropped:
    int64 indices into ``points`` (fewer than ``n_samples`` where fpsample repeated the anchor)."""
    padded = np.concatenate([anchor[None], points])
    picked = _fpsample().bucket_fps_kdline_sampling(padded, n_samples + 1, height, start_idx=0).astype(np.int64)
    return picked[picked != 0][:n_samples] - 1


def _onto_diagonal(u: np.ndarray) -> np.ndarray:
    """The rotation float64 [3, 3] that takes the unit vector ``u`` onto (1, 1, 1) / sqrt(3)."""
    w = np.full(3, 1.0 / np.sqrt(3.0))
    axis = np.cross(u, w)
    sin, cos = float(np.linalg.norm(axis)), float(u @ w)
    if sin < 1e-12:  # on the diagonal already, or opposite it
        if cos > 0:
            return np.eye(3)
        across = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)  # perpendicular to the diagonal
        return 2.0 * np.outer(across, across) - np.eye(3)  # a half turn about it
    k = axis / sin
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + sin * cross + (1.0 - cos) * cross @ cross


def voxel_downsample(points, n_samples: int, start_idx: int = 0, bounds=None,
                     reps: int = VOXEL_REPS_PER_SAMPLE, *,
                     canonical: bool = False) -> tuple[np.ndarray, VoxelMap | None]:
    """The ``"voxel"`` rule: -> (indices int64 [n_samples] into ``points``, VoxelMap).

    1. ``voxel_map``: a grid with about ``reps * n_samples`` occupied cells (a model's
       ``preprocess.voxel_reps``),
       each represented by its lowest raw index.
    2. FPS over the representatives to ``n_samples``: fpsample's bucket FPS (its tree height
       set by the number of representatives), or - without fpsample - ``fps`` from the
       representative of ``start_idx``'s cell. The samples are representatives, so every
       sample's cell is its own.
    ``canonical``: the map is ``voxel_map(..., canonical=True)`` and FPS starts at the first
    representative (cells in key order; fpsample's bucket FPS: from the corner anchor of
    ``bucket_fps``), not at ``start_idx``'s cell: the samples depend on the point set only (the
    grid's axes are the file's: a turned part gets other cells and other samples). Too few occupied cells (a scan with fewer distinct cells than samples): the
    exact rule over all points (in ``anchored_order`` from its first row when ``canonical``), and no map (None). ``bounds``: the per-axis (min, max) that the scan checks of
    ``btp.geometry.prepare`` computed; with them the points are taken as checked (float32 [M, 3],
    finite) and not validated again (a pass over all M points).
    """
    checked = bounds is not None and isinstance(points, np.ndarray) and points.dtype == np.float32 \
        and points.ndim == 2 and points.shape[1] == 3 and points.flags.c_contiguous
    pts = points if checked else as_points(points)
    n_points = pts.shape[0]
    n = check_count(n_samples, n_points, "n_samples")
    start = check_start(start_idx, n_points)
    if reps < 1:
        raise GeometryError(f"reps={reps}: expected at least 1 cell per sample")
    vmap = voxel_map(pts, n * int(reps), bounds, canonical=canonical)
    cell_rep = vmap.cell_rep
    if cell_rep.shape[0] < n:
        if canonical:
            order = anchored_order(pts)
            return order[fps(pts[order], n, 0)], None
        return fps(pts, n, start), None
    rep_pts = np.ascontiguousarray(pts[cell_rep])
    rep_start = 0 if canonical else int(vmap.cell_of_raw[start])
    fpsample = _fpsample()
    if fpsample is None:
        return cell_rep[fps(rep_pts, n, rep_start)], vmap
    height = int(np.clip(round(np.log2(cell_rep.shape[0])) - 9, 3, BUCKET_HEIGHT))
    return cell_rep[bucket_fps(rep_pts, n, height, rep_start, anchor="corner" if canonical else None)], vmap


def canonical_order(points) -> np.ndarray:
    """int64 [M]: the rows of ``points`` [M, 3] sorted by x, then y, then z (float32 values).

    A function of the point *set*: the same points in any row order give the same sequence of
    coordinates ``points[order]`` (equal points are interchangeable). The "canonical" sampling
    order runs the exact and bucket rules, and scans of at most N points, on that sequence."""
    pts = as_points(points)
    return np.lexsort((pts[:, 2], pts[:, 1], pts[:, 0])).astype(np.int64)


def anchored_order(points) -> np.ndarray:
    """int64 [M]: ``canonical_order`` with the point farthest from the centroid moved to the front
    (ties: the first of them in the canonical order). The canonical order's rows for the rules
    that start at row 0 - all points of a scan of M <= N points, whose patch centers' FPS starts
    at the first sampled point, and the exact rule (here and in the CUDA chain): the start is then
    a point that turns with the part, so a turned scan gives the same samples (FPS reads distances
    only; float32 near-ties aside). The other rows keep their canonical order (FPS ties)."""
    pts = as_points(points)
    order = canonical_order(pts)
    far = _farthest_from_centroid(pts[order])[0]
    return np.concatenate([order[far:far + 1], order[:far], order[far + 1:]])


def point_hash(points: np.ndarray) -> np.ndarray:
    """uint32 [M]: a mix of each point's float32 bit patterns (x, y, z) - equal points, equal
    hashes; otherwise near-uniform. The canonical voxel rule picks each cell's representative
    and its grid-sizing subsample by it, so neither depends on the row order."""
    bits = np.ascontiguousarray(points, dtype=np.float32).view(np.uint32)
    h = bits[:, 0] * np.uint32(0x9E3779B1)
    h ^= bits[:, 1] * np.uint32(0x85EBCA77)
    h ^= bits[:, 2] * np.uint32(0xC2B2AE3D)
    h ^= h >> np.uint32(15)  # avalanche (murmur3's finaliser)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h


def column_bounds(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis min and max (float64) by strided column passes (numpy's axis-0 reduction of an
    [M, 3] array is much slower)."""
    low = np.array([points[:, i].min() for i in range(3)], dtype=np.float64)
    high = np.array([points[:, i].max() for i in range(3)], dtype=np.float64)
    return low, high


def _cell_keys(points: np.ndarray, low: np.ndarray, dims: np.ndarray, voxel: float, dtype) -> np.ndarray:
    """Row-major cell index of every point: cell = trunc((p - low) * (1 / voxel)) per axis, in
    float32, one column at a time with reused buffers. ``low`` is the points' own per-axis
    minimum, so p - low >= 0 exactly and truncation is floor; ``_grid_dims`` leaves one spare
    layer, so float32 rounding at the far end stays inside the grid."""
    m = points.shape[0]
    key = np.zeros(m, dtype=dtype)
    col = np.empty(m, dtype=np.float32)
    cell = np.empty(m, dtype=dtype)
    inv = np.float32(1.0 / voxel)
    for axis in range(3):
        np.subtract(points[:, axis], np.float32(low[axis]), out=col)
        np.multiply(col, inv, out=col)
        cell[:] = col
        if axis:
            np.multiply(key, dims[axis], out=key)
        np.add(key, cell, out=key)
    return key


def _grid_dims(extent: np.ndarray, voxel: float) -> np.ndarray:
    """Cells per axis: floor(extent / voxel) + 1 hold every point, + 1 spare layer for rounding."""
    return np.floor(extent / voxel).astype(np.int64) + 2


def _occupied(points: np.ndarray, low: np.ndarray, extent: np.ndarray, voxel: float) -> int:
    dims = _grid_dims(extent, voxel)
    if int(np.prod(dims)) <= DENSE_GRID_MAX_CELLS:
        seen = np.zeros(int(np.prod(dims)), dtype=bool)
        seen[_cell_keys(points, low, dims, voxel, np.int32)] = True
        return int(np.count_nonzero(seen))
    return int(np.unique(_cell_keys(points, low, dims, voxel, np.int64)).shape[0])


MAX_CELLS_PER_AXIS = 1 << 20  # the finest grid: its cell keys stay inside int64


def voxel_map(points: np.ndarray, target: int, bounds=None, *, canonical: bool = False) -> VoxelMap:
    """Cubic cells anchored at the per-axis minimum, about ``target`` of them occupied.

    points float32 [M, 3]. The side starts at extent / sqrt(target) (a surface fills ~ area / v^2
    cells) and is corrected up to three times by (occupied / target)^(1/d) on a strided subsample
    of about 4 * target points, so the sizing costs little on huge scans (d = 2 first, then the
    exponent of occupied ~ side^-d fitted to the last two measurements); then one pass over every
    point gives each its cell. The grid is dense (bincount-sized arrays) up to
    ``DENSE_GRID_MAX_CELLS`` cells, otherwise the occupied cells are found by sorting keys. Each
    cell's representative is its lowest raw index. Deterministic: the same points give the same
    map. ``bounds``: the points' per-axis (min, max) when the caller has them (``column_bounds``).

    ``canonical``: nothing depends on the row order, and one point more or less changes little:
    the sizing subsample is the points whose ``point_hash`` falls in a fixed share (not every
    k-th row), the side is snapped to a power of 2**(1/8) of extent / sqrt(target) and the grid's
    anchor to a multiple of the side (so a small change in the counts or the bounds rarely moves
    the grid), and each cell's representative is its point of lowest hash (not lowest index).
    """
    m = points.shape[0]
    low, high = bounds if bounds is not None else column_bounds(points)
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)  # float32 values, exact in float64
    extent = high - low
    largest = float(extent.max())
    if largest == 0.0:
        return VoxelMap(cell_rep=np.zeros(1, np.int64), cell_of_raw=np.zeros(m, np.int32), voxel=1.0)
    step = max(1, m // (4 * target))
    hashes = point_hash(points) if canonical else None
    if canonical:
        sub = points if step == 1 else points[hashes % np.uint32(step) == 0]
    else:
        sub = points[::step]
    base = largest / np.sqrt(target)
    voxel, exponent, last = base, 2.0, None
    for _ in range(3):
        occupied = _occupied(sub, low, extent, voxel)
        if 0.8 * target <= occupied <= 1.25 * target or (occupied < target and occupied >= 0.9 * sub.shape[0]):
            break  # close enough, or too few points to fill the target (a finer grid cannot add cells)
        if last is not None and last[1] != occupied and last[0] != voxel:  # occupied ~ voxel^-exponent, fitted
            exponent = float(np.clip(np.log(last[1] / occupied) / np.log(voxel / last[0]), 1.0, 3.0))
        last = (voxel, occupied)
        voxel *= float((occupied / target) ** (1.0 / exponent))
        voxel = max(voxel, largest / MAX_CELLS_PER_AXIS)  # repeated points never fill a finer grid
    if canonical:
        voxel = base * float(2.0 ** (np.round(8.0 * np.log2(voxel / base)) / 8.0))
        anchored = np.floor(low / voxel) * voxel
        low, extent = anchored, high - anchored
    dims = _grid_dims(extent, voxel)
    cells = int(np.prod(dims))
    if canonical:
        return _hashed_map(points, hashes, low, dims, voxel, cells)
    if cells <= DENSE_GRID_MAX_CELLS:
        keys = _cell_keys(points, low, dims, voxel, np.int32)
        first = np.full(cells, m, dtype=np.int32)
        np.minimum.at(first, keys, np.arange(m, dtype=np.int32))  # lowest raw index per cell
        occupied_cells = np.flatnonzero(first < m)
        cell_rep = first[occupied_cells].astype(np.int64)
        first[occupied_cells] = np.arange(occupied_cells.shape[0], dtype=np.int32)  # reused as cell -> rank
        cell_of_raw = first[keys]
    else:
        _, rep, inverse = np.unique(_cell_keys(points, low, dims, voxel, np.int64), return_index=True,
                                    return_inverse=True)
        cell_rep, cell_of_raw = rep.astype(np.int64), inverse.astype(np.int32).reshape(-1)
    return VoxelMap(cell_rep=cell_rep, cell_of_raw=cell_of_raw, voxel=float(voxel))


def _hashed_map(points: np.ndarray, hashes: np.ndarray, low: np.ndarray, dims: np.ndarray, voxel: float,
                cells: int) -> VoxelMap:
    """The canonical voxel map: each occupied cell (in key order) represented by its point of
    lowest ``point_hash`` (equal hashes: equal points, whichever row; the lowest index is taken)."""
    m = points.shape[0]
    dense = cells <= DENSE_GRID_MAX_CELLS
    keys = _cell_keys(points, low, dims, voxel, np.int32 if dense else np.int64)
    # hash in the high 32 bits, row in the low ones: the minimum per cell is its lowest hash
    packed = (hashes.astype(np.uint64) << np.uint64(32)) | np.arange(m, dtype=np.uint64)
    if dense:
        best = np.full(cells, np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(best, keys, packed)
        occupied_cells = np.flatnonzero(best != np.iinfo(np.uint64).max)
        cell_rep = (best[occupied_cells] & np.uint64(0xFFFFFFFF)).astype(np.int64)
        rank = np.zeros(cells, dtype=np.int32)
        rank[occupied_cells] = np.arange(occupied_cells.shape[0], dtype=np.int32)
        cell_of_raw = rank[keys]
    else:
        unique_keys, inverse = np.unique(keys, return_inverse=True)
        best = np.full(unique_keys.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
        np.minimum.at(best, inverse.reshape(-1), packed)
        cell_rep = (best & np.uint64(0xFFFFFFFF)).astype(np.int64)
        cell_of_raw = inverse.astype(np.int32).reshape(-1)
    return VoxelMap(cell_rep=cell_rep, cell_of_raw=cell_of_raw, voxel=float(voxel))
