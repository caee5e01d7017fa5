"""The one CPU chain between a raw scan and the engine, and back (numpy, torch-free).

    raw [M, 3] --check_scan--> float32 [M, 3]
      --downsample (N)--> sample_idx [N] --normalize--> points [N, 3] (+ origin, scale)
      --fps (G)--> center_idx [G] --knn (K)--> patch_idx [G, K], neighborhood [G, K, C], center [G, 3]
    [engine: neighborhood, center -> patch_probs [G]]
    patch_probs --propagate--> sampled scores [N] --interpolate--> raw scores [M]

``prepare(raw, cfg, method) -> Prepared`` and its inverse ``scores_to_raw(patch_probs, prepared,
cfg)`` are used by the runtime (``btp.runtime.Pipeline``), evaluation, training samples, the
export's parity samples, the Triton pre/post steps, and as the reference of the CUDA kernels
(``btp.kernels.preprocess``). Every number comes from the model's ``BTPConfig``:

- ``preprocess.normalize = "unit_sphere"``: downsample the raw scan to N, then center the N
  points at their centroid and divide by their max radius (btp's own models are trained so);
  ``"unit_sphere_raw"``: center and scale the whole raw scan first, then downsample (the
  official BTP-3DAD preprocessing).
- ``preprocess.downsample_start = "fixed"``: the downsampling FPS starts at ``fps_start``;
  ``"seeded-random"``: at ``seeded_start(M, downsample_seed)``, the index the official code's
  ``torch.manual_seed(seed); torch.randint(0, M, (1,))`` draws on the CPU.
- **Scan size**, the one rule: M > N: FPS to N points (``method``: exact | bucket | voxel |
  auto, ``btp.geometry.sampling.downsample``; "voxel", auto's rule for large scans, also
  keeps each raw point's cell, so the way back is a gather; its grid holds about
  ``preprocess.voxel_reps`` cells per sampled point; in the canonical order auto takes the
  anchored "bucket" FPS over all points up to ``AUTO_BUCKET_PER_SAMPLE`` x N points,
  ``resolve_method``); M <= N: all M points (FPS of all of them would only permute them) and the
  interpolation back to the raw scan is a scatter.
  M < max(G, K) is refused (``TooFewPointsError``).
- ``preprocess.sampling_order = "input"``: rows are taken in the file's order (M <= N:
  ``arange(M)``; starts and ties by row index). ``"canonical"``: by value only - M <= N and the
  exact / bucket rules run on the rows sorted by (x, y, z) (``canonical_order``), the voxel rule
  hashes the points (``voxel_map(canonical=True)``) - so any row order of the same points gives
  the same scores, and dropping a few points moves them little. There the exact and bucket rules
  start at the point farthest from the centroid, and a scan of M <= N points puts it first
  (``anchored_order``; the patch centers' FPS starts there): up to 8N points (the voxel rule's
  grid has the file's axes) a turned part gets the same samples.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from btp.config import BTPConfig, PreprocessConfig
from btp.geometry.errors import DegenerateCloudError
from btp.geometry.neighbors import knn, neighborhoods
from btp.geometry.normalize import normalize
from btp.geometry.sampling import (VoxelMap, anchored_order, canonical_order, column_bounds, downsample, fps, point_hash,
                                   resolve_method, voxel_downsample)
from btp.geometry.scores import (interpolate_to_raw, nearest_scores, point_map, propagate_patch_scores, selfsim_map,
                                 uses_selfsim)
from btp.io.errors import InvalidValuesError, TooFewPointsError

# float32 squared distances (FPS, kNN, interpolation) overflow beyond ~1e19 and lose every
# neighbour below ~1e-19: scans outside these bounds are refused with the reason
MAX_ABS_COORDINATE = 1e15
MIN_EXTENT = 1e-12
# a scan must be a surface: float32 must resolve its extent in at least MIN_LEVELS steps (a float32
# scan far from the origin collapses onto a coarse grid), it must hold max(G, K) distinct points, and
# its spread across its main direction must stand above float32 rounding (points on a line are not
# a surface). The spread is measured on a strided subset of at most SURFACE_SUBSET points.
MIN_LEVELS = 256
LINE_RATIO = 1e-6
SURFACE_SUBSET = 16384


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """One scan after the chain: the engine's inputs and all that maps scores back.

    raw_points    float32 [M, 3]  the scan as given (input order, raw units)
    sample_idx    int64 [N]       the downsampled points (indices into raw_points; N = min(N, M))
    points        float32 [N, 3]  the sampled points, normalised (centroid 0, max radius 1)
    origin/scale  the normalisation: raw_points[sample_idx] ~= points * scale + origin (the
                  centroid and max radius; ``center`` below is the patch centers)
    voxel_map     VoxelMap | None the "voxel" rule's raw point -> cell map (None for the other rules
                  and for M <= N): interpolation back to the raw scan is then a gather
    center_idx    int64 [G]       FPS centers (indices into points)
    patch_idx     int64 [G, K]    kNN of each center among points
    neighborhood  float32 [G, K, C], center float32 [G, 3]: the engine's inputs
    (the last four are None when ``prepare(..., group=False)``)
    """

    raw_points: np.ndarray
    sample_idx: np.ndarray
    points: np.ndarray
    origin: np.ndarray
    scale: float
    voxel_map: VoxelMap | None = None
    center_idx: np.ndarray | None = None
    patch_idx: np.ndarray | None = None
    neighborhood: np.ndarray | None = None
    center: np.ndarray | None = None

    @property
    def identity(self) -> bool:
        """True when every raw point was used as it is (M <= N): no interpolation needed."""
        return len(self.sample_idx) == len(self.raw_points)


def min_points(cfg: BTPConfig) -> int:
    """The fewest points a scan may have: G centers and K neighbours must exist (max(G, K))."""
    return max(cfg.encoder.num_group, cfg.encoder.group_size)


def check_scan(points, cfg: BTPConfig, where: str | Path | None = None) -> np.ndarray:
    """-> float32 [M, 3] C-contiguous, or a typed error naming ``where``: shape [M, 3], every
    value finite (btp.io drops NaN/inf rows of files with a warning; an array handed in must not
    have them: dropping them here would break one score per input point), M >= max(G, K), and a
    range float32 distances can measure (|x| <= MAX_ABS_COORDINATE, extent >= MIN_EXTENT), and a
    surface (DegenerateCloudError: all points equal, coordinates float32 resolves in fewer than
    MIN_LEVELS steps, fewer than max(G, K) distinct points, or points on a line)."""
    return _checked_scan(points, cfg, where)[0]


def _checked_scan(points, cfg: BTPConfig, where) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``check_scan`` -> (float32 [M, 3], its per-axis (min, max), which the checks compute)."""
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InvalidValuesError(where, f"points have shape {pts.shape}; expected [M, 3]")
    if pts.dtype.kind not in "fiu":  # dates, booleans, complex numbers, text, objects are not coordinates
        raise InvalidValuesError(where, f"points have dtype {pts.dtype}; expected real numbers (float or int): "
                                        "save the coordinates as a float array")
    need = min_points(cfg)
    if pts.shape[0] < need:
        raise TooFewPointsError(where, f"{pts.shape[0]} points, fewer than the model's max(G, K) = {need}: "
                                       "use a denser scan")
    pts = np.ascontiguousarray(pts, dtype=np.float32)
    # NaN and inf show in the per-column min/max, so these passes check everything
    low, high = column_bounds(pts)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        bad = int((~np.isfinite(pts).all(axis=1)).sum())
        raise InvalidValuesError(where, f"{bad} of {len(pts)} points are NaN/inf; drop those rows before scoring "
                                        "(btp-run drops them from files, with a warning)")
    biggest = float(max(np.abs(low).max(), np.abs(high).max()))
    if biggest > MAX_ABS_COORDINATE:
        raise InvalidValuesError(where, f"coordinates up to {biggest:.3g}, beyond +-{MAX_ABS_COORDINATE:.0e} where "
                                        "float32 distances overflow: check the file's units and byte order (a "
                                        "big-endian or corrupt payload reads as such numbers)")
    extent = float((high - low).max())  # float64 bounds
    if extent == 0.0:
        raise DegenerateCloudError(f"{where or '<array>'}: all {len(pts)} points coincide: a single repeated point "
                                   "is not a surface; check the scan")
    if extent < MIN_EXTENT:
        raise InvalidValuesError(where, f"the scan spans only {extent:.3g} units, below {MIN_EXTENT:.0e} where float32 "
                                        "distances vanish: rescale it (e.g. to millimetres)")
    _check_surface(pts, extent, biggest, need, where)
    return pts, (low, high)


def _check_surface(pts: np.ndarray, extent: float, biggest: float, need: int, where) -> None:
    """DegenerateCloudError unless the points [M, 3] can be a surface (``check_scan``'s last rules)."""
    name = where or "<array>"
    step = float(np.spacing(np.float32(biggest)))  # float32's resolution at the largest coordinate
    if extent / step < MIN_LEVELS:
        raise DegenerateCloudError(
            f"{name}: float32 coordinates near {biggest:.3g} are resolved only to {step:.3g} units and the scan "
            f"spans {extent:.3g}: its points have collapsed onto a coarse grid. Save the scan as float64 (btp "
            "centers float64 coordinates before the float32 cast) or subtract the offset before saving")
    distinct = _few_distinct(pts, need)
    if distinct is not None:
        raise DegenerateCloudError(
            f"{name}: only {distinct} distinct points (the others repeat them), fewer than the model's "
            f"max(G, K) = {need}: repeated points are not a surface; check the scan")
    subset = pts[::max(1, len(pts) // SURFACE_SUBSET)].astype(np.float64)  # [S, 3]
    spread = np.sqrt(np.maximum(np.linalg.eigvalsh(_covariance(subset))[::-1], 0.0))  # std per axis
    if spread[1] <= max(LINE_RATIO * spread[0], 2.0 * step):
        raise DegenerateCloudError(
            f"{name}: the points lie on a line (spread {spread[1]:.3g} across it against {spread[0]:.3g} "
            "along it): a line is not a surface; check the scan (one scan line, or a failed reconstruction)")


def _covariance(points: np.ndarray) -> np.ndarray:
    """float64 [3, 3] covariance of points [S, 3] by column products (np.cov's GEMM costs
    milliseconds more on a few cores that ONNX Runtime's threads are using)."""
    centered = points - points.mean(axis=0)
    cols = [np.ascontiguousarray(centered[:, i]) for i in range(3)]
    cov = np.empty((3, 3))
    for i in range(3):
        for j in range(i, 3):
            cov[i, j] = cov[j, i] = float(np.multiply(cols[i], cols[j]).sum())
    return cov / max(len(points) - 1, 1)


def _few_distinct(pts: np.ndarray, need: int) -> int | None:
    """The number of distinct rows of ``pts`` when it is below ``need``, else None. A strided
    subset's point hashes settle the common case (equal points, equal hashes: a hash count never
    exceeds the distinct rows); all rows are compared only when the subset repeats itself."""
    subset = pts[::max(1, len(pts) // 4096)]
    if len(np.unique(point_hash(subset))) >= need:
        return None
    distinct = len(np.unique(pts, axis=0)) if len(subset) < len(pts) else len(np.unique(subset, axis=0))
    return distinct if distinct < need else None


def seeded_start(n_points: int, seed: int = 0) -> int:
    """First draw of ``torch.randint(0, n_points, (1,))`` after ``torch.manual_seed(seed)`` on the
    CPU: torch's generator is MT19937 (seeded by init_genrand) and takes ``next32 % n`` for
    ranges below 2**32. Computed here without torch (the edge runtime has none)."""
    if not 0 < n_points < 2 ** 32:
        raise ValueError(f"seeded_start: n_points={n_points} outside 1..2**32-1")
    mt = [0] * 624
    mt[0] = seed & 0xFFFFFFFF
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
    y = (mt[0] & 0x80000000) | (mt[1] & 0x7FFFFFFF)  # the first twist, element 0 only
    y = mt[397] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y % n_points


def downsample_start(n_points: int, pre: PreprocessConfig) -> int:
    return seeded_start(n_points, pre.downsample_seed) if pre.downsample_start == "seeded-random" else pre.fps_start


def sample_indices(points: np.ndarray, pre: PreprocessConfig, method: str = "auto",
                   bounds=None) -> tuple[np.ndarray, VoxelMap | None]:
    """-> (int64 [min(N, M)]: the downsampled rows of ``points`` [M, 3] (all of them when M <= N),
    the voxel rule's map or None). ``bounds``: the points' per-axis (min, max), if known."""
    m, n = points.shape[0], pre.num_points
    canonical = pre.sampling_order == "canonical"
    if m <= n:
        return (anchored_order(points) if canonical else np.arange(m, dtype=np.int64)), None
    start = downsample_start(m, pre)
    if resolve_method(method, m, n, canonical=canonical) == "voxel":
        return voxel_downsample(points, n, start, bounds, pre.voxel_reps, canonical=canonical)
    if canonical:  # the input-order rule on the rows sorted by value
        order = canonical_order(points)
        return order[downsample(points[order], n, start, method, anchored=True)], None
    return downsample(points, n, start, method), None


def _untimed(stage: str):
    return nullcontext()


def prepare(raw, cfg: BTPConfig, method: str = "auto", *, group: bool = True, where: str | Path | None = None,
            timer=_untimed) -> Prepared:
    """raw [M, 3] -> Prepared (the module docstring gives the rules).

    ``method``: the downsampling rule for M > N (``exact`` is the one the CUDA kernels run);
    ``group=False`` stops after normalisation (scorers of the N points, e.g. the baselines);
    ``where``: the file named in errors; ``timer(stage)``: a context manager around each stage
    (sanitize, downsample, normalize, fps, group), e.g. the Pipeline's per-stage timings.
    """
    pre, enc = cfg.preprocess, cfg.encoder
    with timer("sanitize"):
        raw, bounds = _checked_scan(raw, cfg, where)
    if pre.normalize == "unit_sphere_raw":  # the whole scan first, then sample it
        with timer("normalize"):
            normed_raw, origin, scale = normalize(raw)  # [M, 3]
        with timer("downsample"):
            sample_idx, vmap = sample_indices(normed_raw, pre, method)  # [N]
            points = np.ascontiguousarray(normed_raw[sample_idx])  # [N, 3]
    else:
        with timer("downsample"):
            sample_idx, vmap = sample_indices(raw, pre, method, bounds)  # [N]
        with timer("normalize"):
            points, origin, scale = normalize(raw[sample_idx])  # [N, 3]
    if not group:
        return Prepared(raw_points=raw, sample_idx=sample_idx, points=points, origin=origin, scale=float(scale),
                        voxel_map=vmap)
    with timer("fps"):
        center_idx = fps(points, enc.num_group, pre.fps_start)  # [G]
    with timer("group"):
        center = points[center_idx]  # [G, 3]
        patch_idx, _ = knn(points, center, enc.group_size)  # [G, K]
        neighborhood = neighborhoods(points, patch_idx, center, enc.in_channels, pre.rgb_fill)  # [G, K, C]
    return Prepared(raw_points=raw, sample_idx=sample_idx, points=points, origin=origin, scale=float(scale),
                    voxel_map=vmap, center_idx=center_idx, patch_idx=patch_idx, neighborhood=neighborhood,
                    center=center)


def engine_batch(prepared: list[Prepared], fixed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (neighborhood [B, G, K, C], center [B, G, 3]) of the scans; a graph with a fixed batch
    ``fixed`` > B gets copies of the first scan as padding (their outputs are ignored)."""
    neighborhood = np.stack([p.neighborhood for p in prepared])
    center = np.stack([p.center for p in prepared])
    if fixed and len(prepared) < fixed:
        return pad_batch(neighborhood, fixed), pad_batch(center, fixed)
    return neighborhood, center


def pad_batch(array: np.ndarray, size: int) -> np.ndarray:
    """[B, ...] -> [size, ...] with copies of row 0 appended (B <= size)."""
    return np.concatenate([array, np.repeat(array[:1], size - len(array), 0)]) if len(array) < size else array


def propagate(patch_probs: np.ndarray, prepared: Prepared, cfg: BTPConfig, point_probs=None) -> np.ndarray:
    """Patch probabilities [G] -> scores of the N sampled points [N] (mean over the patches that
    contain a point; points in no patch by ``scoring.uncovered_points``). ``point_probs [G, K]``:
    the model's own per-point probabilities in each patch (``patch_point_probs``), averaged the same way."""
    return propagate_patch_scores(patch_probs, prepared.patch_idx, prepared.center, prepared.points,
                                  cfg.scoring.uncovered_points, point_probs)


def interpolate(sampled_scores: np.ndarray, prepared: Prepared, cfg: BTPConfig, *, exact: bool = False) -> np.ndarray:
    """Scores of the N sampled points -> every raw point [M] in input order, in raw coordinates
    (``scoring.raw_interpolation``).

    - ``exact``: every raw point by the rule itself; ties go to the lowest index
      (``interpolate_to_raw``, the rule of the CUDA kernel).
    - otherwise, with the voxel rule's map: the rule is evaluated at the R cell representatives
      only, and every raw point takes its cell's value (a gather). The representative lies in
      the point's own cell, so its nearest sample is at most 2 cell diagonals farther from the
      point than the point's own nearest sample (triangle inequality); ``tests/test_geometry.py``
      pins that bound.
    - otherwise ``"nearest"`` runs as one k=1 tree query over the raw points (``nearest_scores``).
    """
    if prepared.identity:  # every raw point was sampled, maybe in another order (canonical)
        values = np.empty(len(prepared.raw_points), dtype=np.float32)
        values[prepared.sample_idx] = sampled_scores
        return values
    raw = prepared.raw_points
    method = cfg.scoring.raw_interpolation
    vmap = None if exact else prepared.voxel_map
    targets = raw if vmap is None else raw[vmap.cell_rep]
    if method == "nearest" and not exact:
        values = nearest_scores(raw[prepared.sample_idx], sampled_scores, targets)
    else:
        values = interpolate_to_raw(raw[prepared.sample_idx], sampled_scores, targets, method=method)
    return values if vmap is None else values[vmap.cell_of_raw]


def scores_to_raw(patch_probs: np.ndarray, prepared: Prepared, cfg: BTPConfig, *, exact: bool = False,
                  timer=_untimed, point_probs=None) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``prepare``: patch probabilities [G] (and per-point ones [G, K] when the
    model has them) -> (sampled scores [N], raw scores [M])."""
    with timer("propagate"):
        sampled = propagate(patch_probs, prepared, cfg, point_probs)
    with timer("interpolate"):
        raw = interpolate(sampled, prepared, cfg, exact=exact)
    return sampled, raw


@dataclass(frozen=True, kw_only=True)
class ScanMaps:
    """One scan's maps after the engine, at its N sampled points and its M raw points.

    model    float32 [N]  the model's own map (``propagate``): the object score reads it
    sampled  float32 [N]  the map the product shows there (``btp.geometry.scores.point_map``)
    raw      float32 [M]  ``sampled`` carried to every raw point (``interpolate``)
    selfsim  float32 [N] or None: the sampled points' self-similarity distances, when the config
             reads them (``scoring.selfsim_weight`` or ``selfsim_point_weight`` > 0)
    """

    model: np.ndarray
    sampled: np.ndarray
    raw: np.ndarray
    selfsim: np.ndarray | None


def score_maps(patch_probs: np.ndarray, prepared: Prepared, cfg: BTPConfig, *, exact: bool = False,
               timer=_untimed, point_probs=None) -> ScanMaps:
    """``scores_to_raw`` with the config's self-similarity: patch probabilities [G] -> the model's
    map at the sampled points -> their self-similarity distances (stage "selfsim", once a scan)
    -> the map shown (``point_map``) -> every raw point."""
    with timer("propagate"):
        model = propagate(patch_probs, prepared, cfg, point_probs)
    shown, selfsim = shown_map(model, prepared.raw_points[prepared.sample_idx], cfg, timer)
    with timer("interpolate"):
        raw = interpolate(shown, prepared, cfg, exact=exact)
    return ScanMaps(model=model, sampled=shown, raw=raw, selfsim=selfsim)


def shown_map(model: np.ndarray, sampled_points: np.ndarray, cfg: BTPConfig, timer=_untimed):
    """The model's map at the N sampled points [N] and the points [N, 3] -> (the map shown [N], their
    self-similarity distances [N] or None when the config reads none; stage "selfsim")."""
    if not uses_selfsim(cfg.scoring):
        return model, None
    with timer("selfsim"):
        selfsim = selfsim_map(sampled_points, cfg.scoring)
        return point_map(model, selfsim, cfg.scoring, sampled_points), selfsim
