"""Rigid registration of a scan to a template in any orientation, and local descriptors (torch-free).

numpy in, numpy out; open3d does the work (FPFH, RANSAC over feature matches, point-to-plane ICP),
but for the multi-scale FPFH of the reference descriptors: open3d's rule in numpy, every radius from
one neighbour search.
Lengths are in the clouds' own units; callers pass a ``voxel`` (the registration's cell size,
e.g. ``part_size / 60``) and every radius is a multiple of it.

    scan [M,3] --voxel down--> [m,3] + normals + FPFH [m,33]
        -> global: RANSAC over FPFH matches (``tries`` seeds)  -> 4x4 pose hypotheses
        -> ICP point-to-plane, coarse to fine (voxel * ICP_SCALES)  -> the best fitness wins
        -> Registration(transform [4,4], fitness, rmse)

Fitness is measured scan -> template only (the share of scan points with a template point within
``FITNESS_RADIUS`` voxels), so a partial single-view scan of a full template registers with a
high fitness; the other direction would punish the part it does not see.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ICP_SCALES = (4.0, 2.0, 1.0)  # coarse-to-fine ICP: correspondence radius = scale * 1.5 * voxel
FPFH_RADIUS = 5.0  # registration FPFH radius, in voxels
NORMAL_RADIUS = 2.5  # normals from neighbours within this many voxels (at most 30)
FPFH_BINS = 33  # 11 bins for each of FPFH's three angles
FITNESS_RADIUS = 1.5  # a scan point "fits" when a template point lies within this many voxels
RANSAC_ITERATIONS = 10000  # per try; more found no better pose on the shared shapes, at 3x the time
# ICP stops at a scale once fitness and inlier RMSE change by less than this share per iteration.
# open3d's default: a looser 1e-5 stops earlier (fewer iterations for a pose that moves by under
# 1 % of a voxel) but at an iteration that depends on open3d's threaded sums, so the same scan
# registered with another thread count (btp-run against a Triton server) moved its fused map by
# up to 0.3; at 1e-6 ICP reaches the same pose with any thread count
ICP_TOLERANCE = 1e-6
# a pose that fits this share of the scan's points (within FITNESS_RADIUS voxels) ends the search.
# 0.9 let single views in random poses stop at a pose slid part-way along the template (fitness
# 0.67-0.87 at the references' stricter radius, scored as defects); a correct pose fits 0.98 or more
GOOD_FITNESS = 0.97


@dataclass(frozen=True)
class Registration:
    """scan -> template pose: ``points @ transform[:3, :3].T + transform[:3, 3]``.

    transform  float64 [4,4]
    fitness    share of the (downsampled) scan's points with a template point within FITNESS_RADIUS voxels
    rmse       RMS distance of those points (scan units)
    """

    transform: np.ndarray
    fitness: float
    rmse: float


def _cloud(points: np.ndarray, normals: np.ndarray | None = None):
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)  # RANSAC's fallback notes are not errors
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, dtype=np.float64)))
    if normals is not None:
        pc.normals = o3d.utility.Vector3dVector(np.asarray(normals, dtype=np.float64))
    return pc


def part_size(points: np.ndarray) -> float:
    """The bounding-box diagonal of a cloud [M,3] (the unit every registration length is scaled by)."""
    pts = np.asarray(points, dtype=np.float64)
    return float(np.linalg.norm(pts.max(axis=0) - pts.min(axis=0)))


def voxel_down(points: np.ndarray, voxel: float) -> np.ndarray:
    """float32 [m,3]: the mean point of every occupied ``voxel`` cell."""
    return np.asarray(_cloud(points).voxel_down_sample(voxel).points, dtype=np.float32)


def voxel_cells(points: np.ndarray, voxel: float) -> tuple[np.ndarray, np.ndarray]:
    """(cells float32 [c,3]: the mean point of every occupied ``voxel`` cell, cell_of int64 [M]: the
    cell of each point) - a voxel downsampling that also says where each point went, so values of
    the cells gather back to the points without a nearest-neighbour search."""
    pts = np.asarray(points, dtype=np.float32)
    xyz = np.ascontiguousarray(pts.T)  # [3,M]: the per-axis arithmetic on contiguous rows
    grid = ((xyz - xyz.min(axis=1, keepdims=True)) / np.float32(voxel)).astype(np.int64)  # floor of non-negatives
    dims = grid.max(axis=1) + 1
    keys = (grid[0] * dims[1] + grid[1]) * dims[2] + grid[2]
    if int(np.prod(dims)) <= (1 << 26):  # a dense table of the grid: no sort
        occupied = np.bincount(keys, minlength=int(np.prod(dims))) > 0
        cell_of = (np.cumsum(occupied) - 1)[keys]
    else:
        _, cell_of = np.unique(keys, return_inverse=True)
    count = np.bincount(cell_of).astype(np.float64)
    cells = np.stack([np.bincount(cell_of, weights=xyz[d]) for d in range(3)], axis=1) / count[:, None]
    return cells.astype(np.float32), cell_of.astype(np.int64)


def normals(points: np.ndarray, radius: float, max_nn: int = 30, center: np.ndarray | None = None) -> np.ndarray:
    """float32 [m,3] unit normals, oriented away from ``center`` (default: the cloud's centroid; a
    rule that turns with the cloud, so descriptors built on them do not depend on the scan's pose;
    after registration pass the template's centroid, so a partial scan orients them as the
    template does)."""
    import open3d as o3d

    pc = _cloud(points)
    pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    n = np.asarray(pc.normals)
    pts = np.asarray(points, dtype=np.float64)
    center = pts.mean(axis=0) if center is None else np.asarray(center, dtype=np.float64)
    flip = np.einsum("ij,ij->i", n, pts - center) < 0
    n[flip] *= -1
    return n.astype(np.float32)


def fpfh(points: np.ndarray, point_normals: np.ndarray, radius: float, max_nn: int = 50) -> np.ndarray:
    """float32 [m,33] FPFH of every point (neighbours within ``radius``), as open3d computes it."""
    import open3d as o3d

    feat = o3d.pipelines.registration.compute_fpfh_feature(
        _cloud(points, point_normals), o3d.geometry.KDTreeSearchParamHybrid(radius=radius, max_nn=max_nn))
    return np.asarray(feat.data, dtype=np.float32).T.copy()


def _pair_features(d: np.ndarray, dist2: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> tuple[np.ndarray, ...]:
    """The three FPFH angles (alpha in [-pi, pi], phi and theta in [-1, 1]) of point pairs, from
    ``d`` = p2 - p1, its squared length ``dist2`` and the normals, float64 [3,P] (x, y, z rows), by
    open3d's rule (ComputePairFeatures): the frame sits on the point whose normal is the more
    parallel to the line between them; a pair at zero distance, or with a normal along that line,
    has all three zero."""
    norm = np.sqrt(dist2)
    safe = np.where(norm > 0, norm, 1.0)
    a1 = (n1[0] * d[0] + n1[1] * d[1] + n1[2] * d[2]) / safe
    a2 = (n2[0] * d[0] + n2[1] * d[1] + n2[2] * d[2]) / safe
    swap = np.arccos(np.minimum(np.abs(a1), 1.0)) > np.arccos(np.minimum(np.abs(a2), 1.0))
    u, m = np.where(swap, n2, n1), np.where(swap, n1, n2)
    d = np.where(swap, -d, d)
    theta = np.where(swap, -a2, a1)
    v = np.stack([d[1] * u[2] - d[2] * u[1], d[2] * u[0] - d[0] * u[2], d[0] * u[1] - d[1] * u[0]])
    v_norm = np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2])
    v /= np.where(v_norm > 0, v_norm, 1.0)
    w = np.stack([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])
    phi = v[0] * m[0] + v[1] * m[1] + v[2] * m[2]
    alpha = np.arctan2(w[0] * m[0] + w[1] * m[1] + w[2] * m[2], u[0] * m[0] + u[1] * m[1] + u[2] * m[2])
    zero = (norm == 0) | (v_norm == 0)
    return np.where(zero, 0.0, alpha), np.where(zero, 0.0, phi), np.where(zero, 0.0, theta)


def multiscale_fpfh(points: np.ndarray, point_normals: np.ndarray, radii, max_nn: int = 50) -> np.ndarray:
    """float32 [m, 33 * len(radii)]: FPFH at each radius (open3d's compute_fpfh_feature with
    KDTreeSearchParamHybrid(radius, max_nn): the same numbers to float32 rounding), each histogram
    square-rooted (Hellinger: a Euclidean distance between these compares histograms fairly) and
    scaled to unit norm per radius, so that every scale weighs the same.

    All radii share one neighbour search (the ``max_nn`` nearest within the largest radius; a
    smaller radius keeps the prefix within it) and one computation of the pair angles; a radius
    whose neighbourhoods equal a smaller one's (every ``max_nn``-th neighbour nearer than both)
    reuses its histograms."""
    from pykdtree.kdtree import KDTree
    from scipy.sparse import csr_matrix

    pts = np.ascontiguousarray(points, dtype=np.float64)
    nrm = np.ascontiguousarray(np.asarray(point_normals, dtype=np.float64).T)  # [3,n]
    n, k = len(pts), min(max_nn, len(pts))
    if n == 0 or k < 2:
        return np.zeros((n, 33 * len(radii)), dtype=np.float32)
    _, idx = KDTree(pts).query(pts, k=k, distance_upper_bound=float(max(radii)))
    # column 0 is the point itself (open3d's rule too: its loops start at the second neighbour)
    nb = idx.reshape(n, k)[:, 1:].astype(np.int64).ravel()
    found = nb < n
    nb = np.where(found, nb, 0)
    rows = np.repeat(np.arange(n, dtype=np.int64), k - 1)
    xyz = np.ascontiguousarray(pts.T)  # [3,n]: the pairs' arithmetic on contiguous rows
    d = xyz[:, nb] - np.repeat(xyz, k - 1, axis=1)
    dist2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    alpha, phi, theta = _pair_features(d, dist2, np.repeat(nrm, k - 1, axis=1), nrm[:, nb])
    bins = [np.clip(np.floor(11.0 * (alpha + np.pi) / (2.0 * np.pi)).astype(np.int64), 0, 10),
            np.clip(np.floor(11.0 * (phi + 1.0) * 0.5).astype(np.int64), 0, 10) + 11,
            np.clip(np.floor(11.0 * (theta + 1.0) * 0.5).astype(np.int64), 0, 10) + 22]
    slot = [rows * 33 + b for b in bins]
    indptr = np.arange(0, n * (k - 1) + 1, k - 1)
    blocks, last = [], None
    for r in radii:
        inside = found & (dist2 < float(r) * float(r))
        if last is not None and np.array_equal(inside, last):
            blocks.append(blocks[-1])
            continue
        count = np.bincount(rows, weights=inside, minlength=n)  # neighbours besides the point
        # SPFH: each neighbour's three angles, 100 / count per histogram
        step = np.where(inside, 100.0 / np.maximum(count, 1.0)[rows], 0.0)
        spfh = sum(np.bincount(s, weights=step, minlength=33 * n) for s in slot).reshape(n, 33)
        # FPFH: the neighbours' SPFH weighted by 1 / squared distance, each 11-bin block scaled to
        # sum to 100, plus the point's own SPFH
        weight = np.where(inside & (dist2 > 0), 1.0 / np.where(dist2 > 0, dist2, 1.0), 0.0)
        acc = (csr_matrix((weight, nb, indptr), shape=(n, n)) @ spfh).reshape(n, 3, 11)
        total = acc.sum(axis=2, keepdims=True)
        feat = (acc * np.where(total != 0, 100.0 / np.where(total != 0, total, 1.0), 0.0)).reshape(n, 33) + spfh
        feat[count == 0] = 0.0
        h = np.sqrt(np.maximum(feat, 0.0))
        blocks.append(h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12))
        last = inside
    return np.concatenate(blocks, axis=1).astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class Target:
    """What a scan is registered to: the template downsampled at ``voxel``, its normals and FPFH."""

    points: np.ndarray  # float32 [t,3]
    normals: np.ndarray  # float32 [t,3]
    features: np.ndarray  # float32 [t,33]
    voxel: float


def make_target(points: np.ndarray, voxel: float) -> Target:
    """The registration target of a template cloud [T,3] at cell size ``voxel``."""
    pts = voxel_down(points, voxel)
    nrm = normals(pts, NORMAL_RADIUS * voxel)
    return Target(points=pts, normals=nrm, features=fpfh(pts, nrm, FPFH_RADIUS * voxel), voxel=voxel)


def icp(source: np.ndarray, target: Target, init: np.ndarray, scales=ICP_SCALES, iterations: int = 30,
        tolerance: float = ICP_TOLERANCE) -> Registration:
    """Point-to-plane ICP of ``source`` [m,3] onto ``target`` from pose ``init`` [4,4], coarse to
    fine; at each scale at most ``iterations``, fewer once fitness and RMSE change by less than
    ``tolerance`` (relative)."""
    import open3d as o3d

    reg = o3d.pipelines.registration
    src, dst = _cloud(source), _cloud(target.points, target.normals)
    pose = np.asarray(init, dtype=np.float64)
    for scale in scales:
        got = reg.registration_icp(src, dst, 1.5 * scale * target.voxel, pose,
                                   reg.TransformationEstimationPointToPlane(),
                                   reg.ICPConvergenceCriteria(relative_fitness=tolerance, relative_rmse=tolerance,
                                                              max_iteration=iterations))
        pose = np.asarray(got.transformation)
    return evaluate(source, target, pose)


def evaluate(source: np.ndarray, target: Target, pose: np.ndarray, radius: float | None = None) -> Registration:
    """Fitness and RMSE of ``source`` under ``pose`` (scan -> template; a point fits within ``radius``,
    default FITNESS_RADIUS voxels, of its nearest template point): open3d's evaluate_registration
    rule, on one pykdtree query."""
    from pykdtree.kdtree import KDTree

    radius = FITNESS_RADIUS * target.voxel if radius is None else radius
    pose = np.asarray(pose, dtype=np.float64)
    tree = KDTree(np.ascontiguousarray(target.points, dtype=np.float32))
    dist, _ = tree.query(transform(source, pose), k=1, distance_upper_bound=radius)
    inlier = np.isfinite(dist) & (dist < radius)
    fitness = float(inlier.mean()) if len(dist) else 0.0
    rmse = float(np.sqrt(np.mean(np.square(dist[inlier], dtype=np.float64)))) if inlier.any() else 0.0
    return Registration(transform=pose, fitness=fitness, rmse=rmse)


def register(scan: np.ndarray, target: Target, *, tries: int = 3, seed: int = 0,
             good_fitness: float = GOOD_FITNESS) -> Registration:
    """scan [M,3] -> the pose onto ``target`` in any orientation: RANSAC over FPFH matches, then
    coarse-to-fine ICP; up to ``tries`` RANSAC seeds (stopping early at ``good_fitness``), the
    best fitness wins. Also tries the plain centroid alignment (parts that arrive nearly in
    the template's pose, or symmetric ones where features cannot tell poses apart): its coarsest
    ICP scale first, the finer ones at once when that already fits ``good_fitness``, else only if
    RANSAC finds no such pose (an ICP from a wrong pose runs all its iterations; on validation scans
    as given, every centroid alignment that ends above 0.9 fitted 0.98 after the coarsest scale)."""
    import open3d as o3d

    reg = o3d.pipelines.registration
    voxel = target.voxel
    src = voxel_down(scan, voxel)
    shift = np.eye(4)
    shift[:3, 3] = target.points.mean(axis=0) - src.mean(axis=0)
    coarse = icp(src, target, shift, scales=ICP_SCALES[:1])
    centroid = None
    if coarse.fitness >= good_fitness:
        centroid = icp(src, target, coarse.transform, scales=ICP_SCALES[1:])
        if centroid.fitness >= good_fitness:
            return centroid
    # the scan's normals and FPFH only for RANSAC
    src_n = normals(src, NORMAL_RADIUS * voxel)
    feat_src, feat_dst = reg.Feature(), reg.Feature()
    feat_src.data = fpfh(src, src_n, FPFH_RADIUS * voxel).T.astype(np.float64)
    feat_dst.data = target.features.T.astype(np.float64)
    found = None  # the best RANSAC pose
    for t in range(tries):
        o3d.utility.random.seed(seed + t)
        dist = 1.5 * voxel
        got = reg.registration_ransac_based_on_feature_matching(
            _cloud(src, src_n), _cloud(target.points, target.normals), feat_src, feat_dst, True, dist,
            reg.TransformationEstimationPointToPoint(False), 3,
            [reg.CorrespondenceCheckerBasedOnEdgeLength(0.9), reg.CorrespondenceCheckerBasedOnDistance(dist)],
            reg.RANSACConvergenceCriteria(RANSAC_ITERATIONS, 0.999))
        refined = icp(src, target, np.asarray(got.transformation))
        if found is None or refined.fitness > found.fitness:
            found = refined
        if found.fitness >= good_fitness:
            break
    if centroid is None and (found is None or found.fitness < good_fitness):
        centroid = icp(src, target, coarse.transform, scales=ICP_SCALES[1:])
    # a RANSAC pose wins only when it fits strictly better than the centroid alignment
    if centroid is not None and (found is None or centroid.fitness >= found.fitness):
        return centroid
    return found


def transform(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """float32 [M,3]: ``points`` under the 4x4 ``pose``."""
    pose = np.asarray(pose, dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) @ pose[:3, :3].T + pose[:3, 3]).astype(np.float32)


def greedy_coreset(features: np.ndarray, size: int, *, seed: int = 0, project: int = 32) -> np.ndarray:
    """int64 [min(size, n)]: rows of ``features`` [n,d] chosen by greedy k-center (PatchCore's
    coreset): each next row is the one farthest from those chosen. Distances are computed on a
    random Gaussian projection to ``project`` dims (as PatchCore does), which keeps the choice
    close to the full one at a fraction of the cost."""
    n = features.shape[0]
    if n <= size:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    x = features.astype(np.float32)
    if x.shape[1] > project:
        x = x @ rng.standard_normal((x.shape[1], project)).astype(np.float32) / np.sqrt(project)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = int(rng.integers(n))
    dist = np.sum((x - x[chosen[0]]) ** 2, axis=1)
    for i in range(1, size):
        chosen[i] = int(np.argmax(dist))
        dist = np.minimum(dist, np.sum((x - x[chosen[i]]) ** 2, axis=1))
    return chosen
