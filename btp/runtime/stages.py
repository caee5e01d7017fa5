"""The runtime's stages as plain functions over numpy arrays (torch-free).

    load -> sanitize -> downsample to N -> normalize -> FPS centres -> kNN group
         -> [engine] -> propagate to N -> interpolate to raw -> object score

Each one is a thin, named step over ``btp.io`` / ``btp.geometry`` so that ``Pipeline`` reads
as its data flow and every step gets its own timing. The order and calls are those of
``btp.train.data.prepare`` / ``btp.eval.scoring`` (downsample the raw scan, then normalise the
N sampled points): the engine sees what the model was trained on. Numbers (N, G, K, C, start index, rgb
fill, interpolation) come from the model's config (``ModelMeta.config``), never from flags.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from btp.config import BTPConfig
from btp.geometry import fps, interpolate_to_raw, knn, normalize, propagate_patch_scores
from btp.geometry.prepare import sample_indices
from btp.io import PointCloud, read_point_cloud
from btp.io.errors import InvalidValuesError, TooFewPointsError


@dataclass
class Prepared:
    """One cloud after preprocessing: everything post-processing needs to map scores back.

    raw_points    float32 [M, 3]  the scan as read (input order, raw units)
    sample_idx    int64 [N]       downsampled points (indices into raw_points)
    points        float32 [N, 3]  the sampled points, normalised (centroid 0, max radius 1)
    center_idx    int64 [G]       FPS centres (indices into the N sampled points)
    patch_idx     int64 [G, K]    kNN of each centre among the N sampled points
    neighborhood  float32 [G, K, C], center float32 [G, 3]: the engine's inputs
    centre/scale  the normalisation: raw_points[sample_idx] = points * scale + centre
    """

    raw_points: np.ndarray
    sample_idx: np.ndarray
    points: np.ndarray
    center_idx: np.ndarray
    patch_idx: np.ndarray
    neighborhood: np.ndarray
    center: np.ndarray
    centre: np.ndarray
    scale: float


def min_points(cfg: BTPConfig) -> int:
    """The fewest points a scan may have: G centres and K neighbours must exist (max(G, K))."""
    return max(cfg.encoder.num_group, cfg.encoder.group_size)


def load(source, cfg: BTPConfig) -> PointCloud:
    """A path (any ``btp.io`` format), a ``PointCloud`` or an array [M, 3] -> PointCloud.

    NaN/inf rows are dropped by ``btp.io`` with a warning; a file with fewer than max(G, K)
    finite points fails (InvalidValuesError / TooFewPointsError, naming the file).
    """
    if isinstance(source, PointCloud):
        return source
    if isinstance(source, (str, Path)):
        return read_point_cloud(source, min_points=min_points(cfg))
    return PointCloud(np.asarray(source))


def sanitize(cloud: PointCloud, cfg: BTPConfig) -> np.ndarray:
    """-> points float32 [M, 3] contiguous, checked.

    Arrays handed in directly get the same rules as files: shape [M, 3], at least max(G, K)
    points, and NaN/inf rows are an error here (dropping them silently would break the
    one-score-per-input-point contract). Colours are not used: the models are trained with
    ``preprocess.rgb_fill`` in the colour channels (btp.train.data), so the runtime feeds the same.
    """
    where = cloud.path
    pts = np.asarray(cloud.points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InvalidValuesError(where, f"points have shape {pts.shape}; expected [M, 3]")
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        raise InvalidValuesError(where, f"{int((~finite).sum())} of {len(pts)} points are NaN/inf; "
                                        "drop them before scoring (btp.io.read_point_cloud does)")
    need = min_points(cfg)
    if pts.shape[0] < need:
        raise TooFewPointsError(where, f"{pts.shape[0]} points, fewer than the model's max(G, K) = {need}: "
                                       "use a denser scan")
    return np.ascontiguousarray(pts, dtype=np.float32)


def downsample_points(raw: np.ndarray, cfg: BTPConfig, method: str = "auto") -> np.ndarray:
    """Indices int64 [N] of N well-spread raw points (exact FPS up to 16k points, bucket FPS above),
    the same call as btp.train.data / btp.eval. A scan of M <= N points is used as it is
    (``arange(M)``, like btp.train.data for M == N): FPS of all its points would only permute them,
    and interpolation back to the raw scan becomes the identity."""
    return sample_indices(raw, cfg.preprocess, method)


def normalize_points(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit sphere of the points (the N sampled ones, or the whole raw scan first when
    ``preprocess.normalize == "unit_sphere_raw"``): -> (normed [N, 3], centre [3], scale)."""
    return normalize(points)


def fps_centres(points: np.ndarray, cfg: BTPConfig) -> np.ndarray:
    """FPS centres int64 [G] among the N sampled points (explicit start index: same on every backend)."""
    return fps(points, cfg.encoder.num_group, cfg.preprocess.fps_start)


def knn_group(points: np.ndarray, center_idx: np.ndarray, cfg: BTPConfig):
    """-> (patch_idx int64 [G, K], neighborhood float32 [G, K, C], center float32 [G, 3]).

    Same rule as ``btp.geometry.group``: ``neighborhood[..., :3] = points[patch_idx] - center``,
    channels 3..5 = ``preprocess.rgb_fill``.
    """
    enc = cfg.encoder
    center = points[center_idx]  # [G, 3]
    patch_idx, _ = knn(points, center, enc.group_size)  # [G, K]
    neighborhood = np.empty((enc.num_group, enc.group_size, enc.in_channels), dtype=np.float32)
    neighborhood[..., :3] = points[patch_idx] - center[:, None, :]
    if enc.in_channels == 6:
        neighborhood[..., 3:] = np.float32(cfg.preprocess.rgb_fill)
    return patch_idx, neighborhood, center


def propagate(patch_probs: np.ndarray, prep: Prepared, cfg: BTPConfig) -> np.ndarray:
    """Patch probabilities [G] -> scores of the N sampled points [N] (mean over containing patches;
    points in no patch by ``scoring.uncovered_points``)."""
    return propagate_patch_scores(patch_probs, prep.patch_idx, prep.center, prep.points, cfg.scoring.uncovered_points)


def interpolate(sampled_scores: np.ndarray, prep: Prepared, cfg: BTPConfig, *, exact: bool = False) -> np.ndarray:
    """Scores of the N sampled points -> every raw point [M] in input order (scoring.raw_interpolation),
    in raw coordinates as btp.eval does.

    ``"nearest"`` runs as one plain k=1 pykdtree query (``nearest_scores``): on a 400k-point scan
    148 -> ~80 ms (benchmarks/results/cpu-findings-2026-11-25.md, proposal 5). It equals
    ``btp.geometry.interpolate_to_raw`` (ties -> lowest index, the rule of btp.eval and the CUDA
    kernel) except where a raw point is at exactly (float32) the same distance from two sampled
    points, where the tree may pick either. ``exact=True`` uses ``interpolate_to_raw`` itself."""
    raw = prep.raw_points
    if len(prep.sample_idx) == len(raw):  # the scan was used as it is (M <= N): identity
        return np.asarray(sampled_scores, dtype=np.float32)
    method = cfg.scoring.raw_interpolation
    if method == "nearest" and not exact:
        return nearest_scores(raw[prep.sample_idx], sampled_scores, raw)
    return interpolate_to_raw(raw[prep.sample_idx], sampled_scores, raw, method=method)


def nearest_scores(sampled_xyz: np.ndarray, sampled_scores: np.ndarray, raw_xyz: np.ndarray) -> np.ndarray:
    """float32 [M]: the score of each raw point's nearest sampled point, one pykdtree k=1 query
    (no tie rule: on an exact distance tie the tree picks one of the tied points)."""
    from pykdtree.kdtree import KDTree

    src = np.ascontiguousarray(sampled_xyz, dtype=np.float32)
    dst = np.ascontiguousarray(raw_xyz, dtype=np.float32)
    _, idx = KDTree(src).query(dst, k=1)
    return np.asarray(sampled_scores, dtype=np.float32)[np.asarray(idx, dtype=np.int64).reshape(-1)]


OPENMP_DEFAULT_THREADS = "1"


def default_openmp_threads() -> bool:
    """Set ``OMP_NUM_THREADS=1`` for this process when it is unset; -> whether it was set here.

    The runtime's kNN and interpolation (pykdtree) run OpenMP threads, ONNX Runtime its own
    intra-op pool: two pools on the same cores oversubscribe them. With one OpenMP thread the
    2048-point e2e went 83.7 -> 45.1 ms at ORT's default threads on the shared 2-vCPU box (group
    9.5 -> 1.3 ms; benchmarks/results/cpu-findings-2026-11-25.md, proposal 1); these queries are
    ~1 ms at N = 2048, too small to gain from threads. An explicit OMP_NUM_THREADS is never
    overridden (e.g. ``OMP_NUM_THREADS=2`` on a dedicated edge box for 400k-point scans).
    OpenMP reads the variable when its runtime loads (the first pykdtree import), so this must
    run before any kNN in the process: ``Pipeline`` calls it first thing in its constructor.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return False
    os.environ["OMP_NUM_THREADS"] = OPENMP_DEFAULT_THREADS
    return True


def object_score(outputs: dict[str, np.ndarray], b: int) -> float:
    """The engine's ``object_score[b]`` = alpha * global_prob + (1 - alpha) * mean(top patch probs)."""
    return float(outputs["object_score"][b])


def read_with_warnings(path: str | Path, cfg: BTPConfig) -> tuple[PointCloud, list[str]]:
    """``load`` a file and return the warnings ``btp.io`` raised (e.g. dropped NaN rows) as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cloud = load(path, cfg)
    return cloud, [str(w.message) for w in caught]
