"""Patch scores -> point scores -> raw-scan scores (numpy only)."""
from __future__ import annotations

import numpy as np

from btp.geometry._checks import as_points
from btp.geometry.errors import GeometryError
from btp.geometry.features import self_similarity
from btp.geometry.neighbors import knn, knn_candidates

INTERPOLATION_METHODS = ("nearest", "idw3")


UNCOVERED_RULES = ("nearest_center", "zero")


def top_mean(scores, top_ratio: float) -> float:
    """Mean of the top ``top_ratio`` share of ``scores`` (at least one value)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise GeometryError("top_mean: no scores")
    k = max(1, int(np.ceil(top_ratio * s.size)))
    return float(np.partition(s, s.size - k)[s.size - k:].mean())


def uses_selfsim(scoring) -> bool:
    """Whether this config's object score or point map reads the self-similarity distances."""
    return float(scoring.selfsim_weight) > 0 or float(scoring.selfsim_point_weight) > 0


def selfsim_map(points, scoring) -> np.ndarray:
    """The N sampled points' self-similarity distances [N] as the config asks for them
    (``scoring.selfsim_k``, ``selfsim_exclusion``; `btp.geometry.features.self_similarity`); computed
    once per scan and read by both ``object_score`` and ``point_map``."""
    return self_similarity(points, k=int(scoring.selfsim_k), exclusion=float(scoring.selfsim_exclusion))


def object_score(scoring, engine_object_score: float, global_prob: float, sampled_scores, points=None,
                 selfsim=None) -> float:
    """The object score the product reports, from one scan's engine outputs, the model's own map at
    its sampled points [N] (after ``propagate_patch_scores``, before ``point_map``) and, for the
    self-similarity term, their ``selfsim_map`` [N] or the sampled points themselves [N, 3] (any
    frame: the term ignores scale, position and row order).

    ``scoring.object_source`` (btp/config.py ``ScoringConfig``): "patches" / "points" = the
    engine's own ``object_score`` (computed in the graph); "pooled-points" = ``object_alpha *
    global_prob + (1 - object_alpha) * top_mean(sampled_scores, top_ratio)``, the top share of
    the point map itself, each point counted once (the graph cannot compute it: it does not
    know which patch members are the same point). With ``scoring.selfsim_weight > 0``, plus
    ``selfsim_weight * (top_mean(selfsim, selfsim_top) - selfsim_offset)``."""
    if scoring.object_source != "pooled-points":
        score = float(engine_object_score)
    else:
        alpha = float(scoring.object_alpha)
        local = top_mean(sampled_scores, scoring.top_ratio)
        # alpha 0 does not read global_prob, which is NaN for a graph without the global branch
        score = local if alpha == 0 else alpha * float(global_prob) + (1.0 - alpha) * local
    weight = float(scoring.selfsim_weight)
    if weight > 0:
        if selfsim is None and points is None:
            raise GeometryError("object_score: this model's score has a self-similarity term "
                                "(scoring.selfsim_weight > 0); pass the sampled points or their selfsim_map")
        values = selfsim_map(points, scoring) if selfsim is None else selfsim
        score += weight * (top_mean(values, float(scoring.selfsim_top)) - float(scoring.selfsim_offset))
    return score


def selfsim_score(points, scoring) -> float:
    """The self-similarity statistic of ``object_score``: the mean of the top ``selfsim_top``
    share of the sampled points' `self_similarity` distances."""
    return top_mean(selfsim_map(points, scoring), float(scoring.selfsim_top))


def point_map(sampled_scores, selfsim, scoring, points=None) -> np.ndarray:
    """The map the product shows at the sampled points, float32 [N]: the model's ``sampled_scores``
    [N] as they are, or with ``scoring.selfsim_point_weight > 0`` ``clip(sampled_scores + weight x
    (selfsim - selfsim_point_center), 0, 1)``: lower where the point's geometry is ordinary for the
    part, higher where the part has it nowhere else; the centre (a typical good point's distance)
    leaves the map, and the point threshold's meaning, as the model made them. With
    ``selfsim_point_smooth = k > 1`` that map is then averaged over each point's k nearest sampled
    ``points`` [N, 3] (itself included; the ``knn`` rule, so not the rows' order)."""
    scores = np.asarray(sampled_scores, dtype=np.float32)
    weight = float(scoring.selfsim_point_weight)
    if weight <= 0:
        return scores
    if selfsim is None:
        raise GeometryError("point_map: this model's map has a self-similarity term "
                            "(scoring.selfsim_point_weight > 0); pass the sampled points' selfsim_map")
    values = np.asarray(selfsim, dtype=np.float64)
    if values.shape != scores.shape:
        raise GeometryError(f"point_map: selfsim {values.shape} must match the scores {scores.shape}")
    fused = np.clip(scores + weight * (values - float(scoring.selfsim_point_center)), 0.0, 1.0)
    k = min(int(scoring.selfsim_point_smooth), len(fused))
    if k > 1:
        if points is None:
            raise GeometryError("point_map: this model's map is averaged over neighbours "
                                "(scoring.selfsim_point_smooth > 1); pass the sampled points")
        pts = as_points(points)
        if pts.shape[0] != len(fused):
            raise GeometryError(f"point_map: {pts.shape[0]} points for {len(fused)} scores")
        idx, _ = knn(pts, pts, k)
        fused = fused[idx].mean(axis=1)
    return fused.astype(np.float32)


def propagate_patch_scores(patch_scores, patch_idx, center, points, uncovered: str = "nearest_center",
                           point_scores=None) -> np.ndarray:
    """Each point's score = mean of the scores of the patches that contain it.

    patch_scores [G], patch_idx int [G, K], center [G, 3], points [N, 3] -> float32 [N].
    ``point_scores [G, K]`` (a model with per-point scores, ``gfcm.point_dim > 0``): a point takes
    the mean of its own scores in the patches that contain it instead; the uncovered rule still
    reads ``patch_scores``.
    A point listed twice in one patch counts twice (index_add semantics, as the spec's
    ``index_add / counts``). Points in no patch (``scoring.uncovered_points``): ``"nearest_center"``
    takes the score of their nearest center (``knn`` rule: ties -> lowest center index);
    ``"zero"`` gives 0. With a leading batch dim on every argument ([B,G], [B,G,K], [B,G,3],
    [B,N,3]) returns [B, N]. Sums are accumulated in float64.
    """
    if uncovered not in UNCOVERED_RULES:
        raise GeometryError(f"propagate_patch_scores: uncovered={uncovered!r}; choose one of {UNCOVERED_RULES}")
    scores = np.asarray(patch_scores)
    if scores.ndim == 2:
        return np.stack([propagate_patch_scores(scores[b], patch_idx[b], center[b], points[b], uncovered,
                                                None if point_scores is None else point_scores[b])
                         for b in range(scores.shape[0])])
    pts = as_points(points)
    ctr = as_points(center, "center")
    pidx = np.asarray(patch_idx)
    n_points = pts.shape[0]
    if scores.ndim != 1 or pidx.ndim != 2 or pidx.shape[0] != scores.shape[0] \
            or ctr.shape[0] != scores.shape[0]:
        raise GeometryError(f"propagate_patch_scores: expected patch_scores [G], patch_idx [G, K], "
                            f"center [G, 3]; got {scores.shape}, {pidx.shape}, {ctr.shape}")
    if pidx.size and (pidx.min() < 0 or pidx.max() >= n_points):
        raise GeometryError(f"patch_idx: indices outside [0, {n_points}) for points {pts.shape}")
    if point_scores is not None:
        point_scores = np.asarray(point_scores)
        if point_scores.shape != pidx.shape:
            raise GeometryError(f"propagate_patch_scores: point_scores {point_scores.shape} must match "
                                f"patch_idx {pidx.shape} (one score per point of every patch)")
    flat_idx = pidx.reshape(-1)
    values = (np.repeat(scores.astype(np.float64), pidx.shape[1]) if point_scores is None
              else point_scores.reshape(-1).astype(np.float64))
    sums = np.bincount(flat_idx, weights=values, minlength=n_points)  # [N]
    counts = np.bincount(flat_idx, minlength=n_points)  # [N]
    covered = counts > 0
    out = np.empty(n_points, dtype=np.float32)
    out[covered] = sums[covered] / counts[covered]
    if not covered.all() and uncovered == "zero":
        out[~covered] = 0.0
    elif not covered.all():
        nearest, _ = knn(ctr, pts[~covered], 1)  # [U, 1]
        out[~covered] = scores[nearest[:, 0]]
    return out


def interpolate_to_raw(sampled_xyz, sampled_scores, raw_xyz, method: str = "nearest") -> np.ndarray:
    """Scores of the N sampled points carried to the M raw points.

    sampled_xyz [N, 3], sampled_scores [N], raw_xyz [M, 3] -> float32 [M].
    - ``"nearest"``: the score of the nearest sampled point (``knn`` rule, ties -> lowest index).
    - ``"idw3"``: inverse-distance weighted mean over the 3 nearest sampled points,
      weights ``1 / distance``; a raw point that coincides with a sampled point takes its score.
    Both return ``sampled_scores`` unchanged when ``raw_xyz`` is ``sampled_xyz`` (distinct points).
    """
    src = as_points(sampled_xyz, "sampled_xyz")
    dst = as_points(raw_xyz, "raw_xyz", min_points=0)
    scores = np.asarray(sampled_scores, dtype=np.float32)
    if scores.shape != (src.shape[0],):
        raise GeometryError(f"sampled_scores: shape {scores.shape}, expected [{src.shape[0]}] "
                            f"(one score per sampled point)")
    if method == "nearest":
        idx, _ = knn_candidates(src, dst, 1, extra=1)  # [M, 1]
        return scores[idx[:, 0]]
    if method == "idw3":
        k = min(3, src.shape[0])
        idx, dist2 = knn_candidates(src, dst, k, extra=1)  # [M, k]
        weights = 1.0 / np.sqrt(np.maximum(dist2.astype(np.float64), 1e-24))  # [M, k]
        out = (weights * scores[idx]).sum(axis=1) / weights.sum(axis=1)
        exact = dist2[:, 0] == 0
        out[exact] = scores[idx[exact, 0]]
        return out.astype(np.float32)
    raise GeometryError(f"interpolate_to_raw: method={method!r}; choose one of {INTERPOLATION_METHODS} "
                        f"(scoring.raw_interpolation in btp/config.py)")


def nearest_scores(sampled_xyz: np.ndarray, sampled_scores: np.ndarray, raw_xyz: np.ndarray) -> np.ndarray:
    """float32 [M]: the score of each raw point's nearest sampled point by one plain pykdtree k=1
    query. Equals ``interpolate_to_raw(method="nearest")`` except where a raw point is at exactly
    (float32) the same distance from two sampled points: the tree then picks either, the exact
    rule the lowest index. On a 400k-point scan it takes about half the time of the exact rule
    (benchmarks/results/cpu-findings-2026-11-25.md, proposal 5)."""
    from pykdtree.kdtree import KDTree

    src = np.ascontiguousarray(sampled_xyz, dtype=np.float32)
    dst = np.ascontiguousarray(raw_xyz, dtype=np.float32)
    _, idx = KDTree(src).query(dst, k=1)
    return np.asarray(sampled_scores, dtype=np.float32)[np.asarray(idx, dtype=np.int64).reshape(-1)]
