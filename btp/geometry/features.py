"""Local geometric descriptors of a cloud (numpy, open3d; torch-free).

- `fpfh_patches`: FPFH per patch, the GFCM's supervision target (open3d).
- `local_features`: multi-scale covariance features per point, read by the learned baseline
  (`btp.eval.baselines`) and by the object score's self-similarity term.
- `self_similarity`: per point, how unlike the rest of the same part its local geometry is.
"""
from __future__ import annotations

import functools
import os

import numpy as np
from scipy.sparse import csr_matrix
from scipy.spatial import cKDTree

from btp.geometry._checks import as_points
from btp.geometry.errors import GeometryError
from btp.geometry.neighbors import knn

LEARNED_SCALES: tuple[int, ...] = (8, 16, 32)
LEARNED_WIDE_K = 64
_BASE_FEATURES = ("surface_variation", "linearity", "planarity", "plane_distance", "density")


def fpfh_patches(points, patch_idx, gfcm_cfg) -> np.ndarray:
    """33-d FPFH of each patch: max over the patch's points of their open3d FPFH.

    points [N, 3], patch_idx int [G, K] -> float32 [G, 33].
    Normals: open3d ``estimate_normals`` with a hybrid search (``gfcm_cfg.normal_radius``,
    ``gfcm_cfg.normal_max_nn``), orientation as open3d leaves it; FPFH: open3d
    ``compute_fpfh_feature`` (``gfcm_cfg.fpfh_radius``, ``gfcm_cfg.fpfh_max_nn``). The radii are
    in the cloud's units: pass normalised points (unit sphere), as the spec's radii assume.
    ``gfcm_cfg`` is a ``btp.config.GFCMConfig`` (or anything with those four attributes).
    """
    import open3d as o3d

    pts = as_points(points)
    pidx = np.asarray(patch_idx)
    if pidx.ndim != 2 or not np.issubdtype(pidx.dtype, np.integer):
        raise GeometryError(f"patch_idx: expected integer [G, K], got {pidx.dtype} {pidx.shape}")
    if pidx.size and (pidx.min() < 0 or pidx.max() >= pts.shape[0]):
        raise GeometryError(f"patch_idx: indices outside [0, {pts.shape[0]})")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts.astype(np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(
        radius=float(gfcm_cfg.normal_radius), max_nn=int(gfcm_cfg.normal_max_nn)))
    feature = o3d.pipelines.registration.compute_fpfh_feature(
        cloud, o3d.geometry.KDTreeSearchParamHybrid(
            radius=float(gfcm_cfg.fpfh_radius), max_nn=int(gfcm_cfg.fpfh_max_nn)))
    per_point = np.asarray(feature.data, dtype=np.float32).T  # [N, 33]
    return np.ascontiguousarray(per_point[pidx].max(axis=1))  # [G, 33]


def _neighbourhood_eigen(points: np.ndarray, idx: np.ndarray):
    """Eigen-decomposition of each point's neighbourhood covariance.

    points [N,3], idx [N,k] -> eigenvalues [N,3] ascending, smallest-eigenvector (normal) [N,3],
    neighbourhood means [N,3].
    """
    nb = points[idx].astype(np.float64)  # [N,k,3]
    mean = nb.mean(axis=1)  # [N,3]
    centered = nb - mean[:, None, :]
    cov = np.einsum("nki,nkj->nij", centered, centered) / idx.shape[1]  # [N,3,3]
    evals, evecs = np.linalg.eigh(cov)  # ascending
    return np.clip(evals, 0.0, None), evecs[:, :, 0], mean


def feature_names(scales: tuple[int, ...] = LEARNED_SCALES, wide_k: int = LEARNED_WIDE_K) -> list[str]:
    names = []
    for k in scales:
        names += [f"{f}_k{k}" for f in _BASE_FEATURES]
        names += [f"{f}_k{k}_rel{wide_k}" for f in _BASE_FEATURES]
        names.append(f"normal_deviation_k{k}_vs{wide_k}")
    names += [f"plane_distance_wide{wide_k}", f"surface_variation_wide{wide_k}"]
    return names


def _prefix_eigen(points: np.ndarray, idx: np.ndarray, ks: list[int], pool=None, chunks: int = 1):
    """``_neighbourhood_eigen`` of the first k neighbours of each point for every k in ``ks``
    (ascending), from one gather: the sums of the neighbours' offsets from the point and of their
    outer products over the segments between consecutive ks, accumulated.

    points [N,3], idx [N,K] sorted by distance, ks (ascending, each <= K) -> eigenvalues [S,N,3]
    ascending, smallest-eigenvectors [S,N,3], neighbourhood means as offsets from the point [S,N,3].
    """
    pts = points.astype(np.float64)
    d = pts[idx[:, :ks[-1]]] - pts[:, None, :]  # [N,K,3]: small numbers, so E[dd'] - E[d]E[d]' loses nothing
    starts = [0] + list(ks[:-1])
    first = np.cumsum(np.add.reduceat(d, starts, axis=1), axis=1)  # [N,S,3]
    second = np.cumsum(np.stack([np.matmul(d[:, a:b].transpose(0, 2, 1), d[:, a:b]) for a, b in zip(starts, ks)],
                                axis=1), axis=1)  # [N,S,3,3]
    sizes = np.asarray(ks, dtype=np.float64)[None, :, None]
    means = first / sizes
    cov = second / sizes[..., None] - means[..., :, None] * means[..., None, :]
    cov = cov.transpose(1, 0, 2, 3)  # [S,N,3,3]
    if pool is None or chunks < 2:
        evals, evecs = np.linalg.eigh(cov)  # ascending
    else:  # numpy's linalg releases the GIL: the points in chunks, one a thread
        got = list(pool.map(np.linalg.eigh, np.array_split(cov, chunks, axis=1)))
        evals, evecs = np.concatenate([e for e, _ in got], axis=1), np.concatenate([v for _, v in got], axis=1)
    return np.clip(evals, 0.0, None), evecs[..., 0], means.transpose(1, 0, 2)


def local_features(points: np.ndarray, scales: tuple[int, ...] = LEARNED_SCALES,
                   wide_k: int = LEARNED_WIDE_K, threads: int = 1) -> np.ndarray:
    """Per-point multi-scale covariance features, float32 [N, F] (F = len(feature_names())).

    For each scale k: surface variation, linearity, planarity, distance to the local plane
    (in units of the neighbourhood's mean distance), density (mean kNN distance relative to
    the cloud's median); each of them relative to a wider neighbourhood (value minus the
    mean of that value over the `wide_k` nearest points; a ratio for density); and the
    deviation of the scale's normal from the wide normal (1 - |cos|). Plus, once: the distance
    to the wide neighbourhood's plane (in its mean distance) and its surface variation.
    One kNN query and one gather serve every scale (``_prefix_eigen``). ``threads`` > 1 share the
    kNN queries and the eigen-decompositions (the same result).
    """
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            return _local_features(points, scales, wide_k, pool, threads)
    return _local_features(points, scales, wide_k, None, 1)


def _local_features(points, scales, wide_k: int, pool, chunks: int) -> np.ndarray:
    pts = np.ascontiguousarray(points, dtype=np.float32)
    n = pts.shape[0]
    k_max = min(max(max(scales), wide_k), n)
    if pool is None:
        idx_all, d2_all = knn(pts, pts, k_max)  # [N,k_max] sorted by distance
    else:  # pykdtree and the rule's numpy release the GIL: the queries in chunks, one a thread
        got = list(pool.map(lambda q: knn(pts, q, k_max), np.array_split(pts, chunks)))
        idx_all, d2_all = np.concatenate([i for i, _ in got]), np.concatenate([d for _, d in got])
    dist_sum = np.cumsum(np.sqrt(np.maximum(d2_all, 0.0)).astype(np.float64), axis=1)
    ks = [min(k, n) for k in scales]
    wk = min(wide_k, n)
    sizes = sorted(set(ks + [wk]))
    evals_all, normals, offsets = _prefix_eigen(pts, idx_all, sizes, pool, chunks)
    at = {k: i for i, k in enumerate(sizes)}
    evals_w, normal_w, offset_w = evals_all[at[wk]], normals[at[wk]], offsets[at[wk]]

    def mean_dist(k: int) -> np.ndarray:  # to the k - 1 nearest other points
        return (dist_sum[:, k - 1] - dist_sum[:, 0]) / (k - 1) if k > 1 else np.zeros(n)

    base, bent = [], []
    for k in ks:
        evals, normal, offset = evals_all[at[k]], normals[at[k]], offsets[at[k]]
        l3, l2, l1 = evals[:, 0], evals[:, 1], evals[:, 2]
        total = np.maximum(evals.sum(axis=1), 1e-20)
        spacing = mean_dist(k)
        base += [l3 / total,  # in _BASE_FEATURES' order
                 (l1 - l2) / np.maximum(l1, 1e-20),
                 (l2 - l3) / np.maximum(l1, 1e-20),
                 np.abs(np.einsum("ni,ni->n", offset, normal)) / np.maximum(spacing, 1e-12),
                 spacing / max(float(np.median(spacing)), 1e-12)]
        bent.append(1.0 - np.abs(np.einsum("ni,ni->n", normal, normal_w)))  # against the wide normal
    values = np.stack(base, axis=1)  # [N, 5 x scales]
    # each value's mean over the wide neighbourhood: a sparse [N, N] average, one product
    wide = csr_matrix((np.full(n * wk, 1.0 / wk), idx_all[:, :wk].ravel(), np.arange(0, n * wk + 1, wk)), shape=(n, n))
    around = wide @ values
    relative = values - around
    density = np.arange(_BASE_FEATURES.index("density"), values.shape[1], len(_BASE_FEATURES))
    relative[:, density] = values[:, density] / np.maximum(around[:, density], 1e-12)
    width = len(_BASE_FEATURES)
    columns = []
    for s in range(len(ks)):
        columns += [values[:, s * width:(s + 1) * width], relative[:, s * width:(s + 1) * width], bent[s][:, None]]
    # height over the wide neighbourhood's plane: a bulge or dent sticks out of it
    spread_w = np.maximum(mean_dist(wk), 1e-12) if wk > 1 else np.ones(n)
    columns.append((np.abs(np.einsum("ni,ni->n", offset_w, normal_w)) / spread_w)[:, None])
    columns.append((evals_w[:, 0] / np.maximum(evals_w.sum(axis=1), 1e-20))[:, None])
    return np.concatenate(columns, axis=1).astype(np.float32)


def self_similarity(points, k: int = 5, exclusion: float = 0.08, block: int = 512,
                    threads: int | None = None) -> np.ndarray:
    """How unlike the rest of the same part each point's local geometry is: float32 [N].

    Each point's `local_features`, standardised over the cloud's own points, against those of
    every point farther than ``exclusion`` x the bounding-box diagonal from it: the mean
    Euclidean distance to its ``k`` nearest there (a defect's own points do not vouch for each
    other). High where the geometry occurs nowhere else on the part. Invariant to the cloud's
    scale, position and row order (up to float rounding); the features are invariant to turns
    too, but the exclusion radius follows the axis-aligned box, so a turn moves the distances of
    the points at its edge (their top share's mean hardly: tests/test_selfsim.py). Cost: O(N^2)
    distances, ``block`` rows at a time (N = 4096: 8 MB a block), the blocks on ``threads``
    threads (default: one per core this process may use; the result does not depend on it).
    """
    threads = threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    with _blas_controller().limit(limits=1, user_api="blas"):
        return _self_similarity(points, k, exclusion, block, threads)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """The process's BLAS libraries (threadpoolctl), looked up once."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _self_similarity(points, k: int, exclusion: float, block: int, threads: int) -> np.ndarray:
    """``self_similarity`` with BLAS on one thread: our threads share the blocks. (BLAS's own
    threads keep spinning after each small product and take the cores from ours, and from the
    engine after.)"""
    pts = as_points(points).astype(np.float64)
    n = pts.shape[0]
    if n < 2:
        raise GeometryError(f"self_similarity: needs at least 2 points, got {n}")
    pts = pts - pts.mean(axis=0)
    diag = float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))
    if diag <= 0:
        raise GeometryError("self_similarity: all points coincide")
    pts /= diag
    feats = local_features(pts, threads=threads)
    feats = ((feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)).astype(np.float32)
    sq = (feats * feats).sum(axis=1)
    # one matmul: rows [-2 f_i, 1] . columns [f_j, |f_j|^2] = |f_j|^2 - 2 f_i.f_j (the row's own |f_i|^2
    # does not change which j are nearest; added back after)
    f_rows = np.hstack([-2.0 * feats, np.ones((n, 1), np.float32)])
    f_cols = np.hstack([feats, sq[:, None]]).T.copy()
    # the point itself and the points within the exclusion radius: a few % of the pairs, from a tree
    pairs = cKDTree(pts).query_pairs(exclusion, output_type="ndarray")
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)]), np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    order = np.argsort(i.astype(np.uint16) if n <= 65536 else i, kind="stable")  # radix sort for 16-bit keys
    near_cols = j[order]
    near_ptr = np.concatenate([[0], np.cumsum(np.bincount(i, minlength=n))])  # row r: near_cols[ptr[r]:ptr[r + 1]]
    kk = min(k, n - 1)
    out = np.empty(n, np.float32)

    def rows(b0: int) -> None:
        b1 = min(n, b0 + block)
        d2 = f_rows[b0:b1] @ f_cols
        d2[np.repeat(np.arange(b1 - b0), np.diff(near_ptr[b0:b1 + 1])), near_cols[near_ptr[b0]:near_ptr[b1]]] = np.inf
        d2.partition(kk - 1, axis=1)  # in place
        part = d2[:, :kk] + sq[b0:b1, None]
        far = np.isfinite(part)  # a point with fewer than k points elsewhere: mean of what there is
        part = np.sqrt(np.maximum(np.where(far, part, 0.0), 0.0))
        out[b0:b1] = part.sum(axis=1) / np.maximum(far.sum(axis=1), 1)

    starts = range(0, n, block)
    if threads > 1 and n > block:  # numpy releases the GIL in matmul, the scatter and partition
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            list(pool.map(rows, starts))
    else:
        for b0 in starts:
            rows(b0)
    return out
