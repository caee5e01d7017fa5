"""Anomaly-detection metrics at object and point level (sklearn underneath; torch-free).

- ``auroc`` / ``average_precision`` / ``f1_max``: one label and one score per item (an object,
  or a point of the pooled test points of a class). Ties count half (sklearn's ROC).
- ``au_pro``: the standard AU-PRO of the official BTP-3DAD evaluation (``test_standard_aupro.py``),
  same formula. Ground-truth regions are the connected components of each sample's anomalous
  points, two of them linked when at most ``radius_factor`` (2.5) x the median over all their
  1st..``nn_k``-th (6) nearest-anomalous-neighbour distances apart (zero distances dropped, per
  sample). At each of ``num_thresholds`` (200) thresholds evenly spaced from the largest to the
  smallest pooled score, PRO = mean over all regions (all samples) of the share of the region's
  points scored >= threshold, FPR = share of all normal points scored >= threshold. Per distinct
  FPR the highest PRO is kept, (0, 0) is prepended, the curve is integrated with the trapezoid
  rule up to FPR = ``fpr_limit`` (0.3; PRO interpolated there) and divided by ``fpr_limit``.
- F1max: ``f1_max`` groups tied scores (a threshold can only take all of them: the best F1 a
  deployed threshold can reach); ``f1_max_official`` is the official rule, cumulative counts
  along the scores sorted descending (stable order, no tie grouping, eps 1e-12). They differ
  only where scores tie across the classes.

Degenerate inputs (only one class present, no anomalous region, no normal point) give NaN and
a ``DegenerateMetricWarning`` saying why; ``compute_metrics`` collects those reasons in ``notes``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

METRIC_KEYS: tuple[str, ...] = ("o_auroc", "p_auroc", "au_pro", "o_ap", "p_ap", "o_f1max")
EXTRA_KEYS: tuple[str, ...] = ("p_f1max", "o_f1max_official", "p_f1max_official", "p_auroc_sampled",
                                "p_ap_sampled")

PRO_FPR_LIMIT = 0.3
PRO_THRESHOLDS = 200
PRO_RADIUS_FACTOR = 2.5
PRO_NN_K = 6


class DegenerateMetricWarning(UserWarning):
    """A metric is undefined for this input (e.g. only one class); its value is NaN."""


def _binary(labels, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"{what}: {y.shape[0]} labels but {s.shape[0]} scores")
    if not np.isfinite(s).all():
        raise ValueError(f"{what}: scores contain NaN or inf ({int((~np.isfinite(s)).sum())} values)")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{what}: labels must be 0 (normal) or 1 (anomalous)")
    return y.astype(np.int64), s


def _one_class_reason(y: np.ndarray) -> str | None:
    if y.size == 0:
        return "no items"
    if y.min() == y.max():
        return f"only {'anomalous' if y[0] else 'normal'} items ({y.size}); needs both classes"
    return None


def _unit(value: float) -> float:
    """Clip float round-off (sklearn's AP can return 1.0000000000000002) into [0, 1]."""
    return float(min(1.0, max(0.0, value)))


def _nan(what: str, reason: str) -> float:
    warnings.warn(f"{what} undefined: {reason}", DegenerateMetricWarning, stacklevel=3)
    return float("nan")


def auroc(labels, scores) -> float:
    """Area under the ROC curve; ties between a normal and an anomalous item count 1/2."""
    from sklearn.metrics import roc_auc_score

    y, s = _binary(labels, scores, "auroc")
    reason = _one_class_reason(y)
    return _nan("AUROC", reason) if reason else _unit(roc_auc_score(y, s))


def average_precision(labels, scores) -> float:
    """Average precision (sklearn's step-wise area under the precision-recall curve)."""
    from sklearn.metrics import average_precision_score

    y, s = _binary(labels, scores, "average_precision")
    reason = _one_class_reason(y)
    return _nan("AP", reason) if reason else _unit(average_precision_score(y, s))


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds (predict anomalous when score >= threshold)."""
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels, scores) -> tuple[float, float]:
    """(best F1, the threshold that reaches it) over all thresholds (anomalous when score >= it)."""
    from sklearn.metrics import precision_recall_curve

    y, s = _binary(labels, scores, "f1_max")
    reason = _one_class_reason(y)
    if reason:
        return _nan("F1max", reason), float("nan")
    precision, recall, thresholds = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(f1[:-1].argmax())  # the last (P=1, R=0) point has no threshold
    return _unit(f1.max()), float(thresholds[best])


def f1_max_official(labels, scores, eps: float = 1e-12) -> float:
    """Best F1 as the official evaluation computes it: cumulative TP along the scores sorted
    descending (mergesort, no tie grouping), precision = TP / (rank + eps), recall = TP / (P + eps)."""
    y, s = _binary(labels, scores, "f1_max_official")
    reason = _one_class_reason(y)
    if reason:
        return _nan("F1max", reason)
    tp = np.cumsum(y[np.argsort(-s, kind="mergesort")])
    precision = tp / (np.arange(1, y.size + 1) + eps)
    recall = tp / (y.sum() + eps)
    return float(np.nanmax(2 * precision * recall / (precision + recall + eps)))


# ---- AU-PRO ----------------------------------------------------------------------------

def region_radius(anomalous_points: np.ndarray, radius_factor: float = PRO_RADIUS_FACTOR,
                  nn_k: int = PRO_NN_K) -> float:
    """Link radius of one sample's regions: radius_factor x the median over ALL 1st..nn_k-th
    nearest-anomalous-neighbour distances of its anomalous points (zero distances dropped;
    fewer neighbours when it has fewer points). 0 when it has at most one anomalous point."""
    a = np.asarray(anomalous_points, dtype=np.float32)
    if a.shape[0] <= 1:
        return 0.0
    dist = cKDTree(a).query(a, k=min(nn_k + 1, a.shape[0]))[0][:, 1:].reshape(-1)  # column 0: itself
    dist = dist[np.isfinite(dist) & (dist > 0)]
    return float(np.median(dist) * radius_factor) if dist.size else 0.0


def gt_regions(points: np.ndarray, labels: np.ndarray, radius_factor: float = PRO_RADIUS_FACTOR,
               nn_k: int = PRO_NN_K) -> np.ndarray:
    """Connected anomalous regions of one sample: int64 [N], region id 0.. for anomalous points, -1 else.

    Two anomalous points are linked when at most ``region_radius`` apart (float32 coordinates);
    a sample whose radius is 0 (one point, or all coincide) is one region.
    """
    pts = np.asarray(points, dtype=np.float32)
    lab = np.asarray(labels).reshape(-1)
    if pts.ndim != 2 or pts.shape != (lab.shape[0], 3):
        raise ValueError(f"gt_regions: points {pts.shape} and labels {lab.shape} must be [N,3] and [N]")
    region = np.full(lab.shape[0], -1, dtype=np.int64)
    anomalous = np.flatnonzero(lab == 1)
    if anomalous.size == 0:
        return region
    a = pts[anomalous]
    radius = region_radius(a, radius_factor, nn_k)
    if radius <= 0:
        region[anomalous] = 0
        return region
    pairs = cKDTree(a).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else
                       ([], ([], [])), shape=(a.shape[0], a.shape[0]))
    _, comp = connected_components(graph, directed=False)
    region[anomalous] = comp
    return region


def pro_curve(point_scores: Sequence[np.ndarray], point_labels: Sequence[np.ndarray],
              points: Sequence[np.ndarray], num_thresholds: int = PRO_THRESHOLDS,
              radius_factor: float = PRO_RADIUS_FACTOR, nn_k: int = PRO_NN_K) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro): (0, 0) then, per distinct FPR, the highest PRO over ``num_thresholds`` thresholds
    evenly spaced from max + 1e-12 down to min - 1e-12 of the pooled (float32) scores; sorted by fpr."""
    if not (len(point_scores) == len(point_labels) == len(points)):
        raise ValueError("pro_curve: give one score, label and point array per sample")
    region_scores: list[np.ndarray] = []
    normal_scores: list[np.ndarray] = []
    for s, y, p in zip(point_scores, point_labels, points):
        y, s = _binary(y, s, "au_pro")
        s = s.astype(np.float32).astype(np.float64)  # scores are compared as float32 values
        region = gt_regions(p, y, radius_factor, nn_k)
        normal_scores.append(s[y == 0])
        for r in range(int(region.max()) + 1):
            region_scores.append(s[region == r])
    normal = np.concatenate(normal_scores) if normal_scores else np.zeros(0)
    if not region_scores:
        raise _Degenerate("no anomalous points (no ground-truth region)")
    if normal.size == 0:
        raise _Degenerate("no normal points (FPR undefined)")
    pooled = np.concatenate([normal, *region_scores])
    lo, hi = float(pooled.min()), float(pooled.max())
    if lo == hi:
        raise _Degenerate("every point has the same score")
    thresholds = np.linspace(hi + 1e-12, lo - 1e-12, num_thresholds)  # [T]
    fpr = 1.0 - np.searchsorted(np.sort(normal), thresholds, side="left") / normal.size  # share >= t
    overlaps = np.stack([1.0 - np.searchsorted(np.sort(rs), thresholds, side="left") / rs.size
                         for rs in region_scores])  # [R, T]
    pro = overlaps.mean(axis=0)
    unique_fpr, inverse = np.unique(fpr, return_inverse=True)
    best_pro = np.full(unique_fpr.shape, -np.inf)
    np.maximum.at(best_pro, inverse, pro)
    return np.concatenate([[0.0], unique_fpr]), np.concatenate([[0.0], best_pro])


class _Degenerate(Exception):
    pass


def au_pro(point_scores: Sequence[np.ndarray], point_labels: Sequence[np.ndarray],
           points: Sequence[np.ndarray], fpr_limit: float = PRO_FPR_LIMIT,
           num_thresholds: int = PRO_THRESHOLDS, radius_factor: float = PRO_RADIUS_FACTOR,
           nn_k: int = PRO_NN_K) -> float:
    """Normalised area under the PRO curve up to FPR `fpr_limit` (see the module docstring)."""
    try:
        fpr, pro = pro_curve(point_scores, point_labels, points, num_thresholds, radius_factor, nn_k)
    except _Degenerate as err:
        return _nan("AU-PRO", str(err))
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for the points with x <= x_max, closed at x_max with y
    interpolated there (held at the last value when the curve ends before x_max)."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max:
        xs, ys = np.append(xs, x_max), np.append(ys, np.interp(x_max, x, y))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) * 0.5))


# ---- everything for one class ----------------------------------------------------------

@dataclass
class MetricReport:
    """Metric name -> value (NaN when undefined) and name -> why it is undefined."""

    values: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    def json_values(self) -> dict[str, float | None]:
        """Values with NaN -> None (JSON has no NaN)."""
        return {k: (None if not np.isfinite(v) else float(v)) for k, v in self.values.items()}


def compute_metrics(object_labels: Sequence[int], object_scores: Sequence[float],
                    point_labels: Sequence[np.ndarray], point_scores: Sequence[np.ndarray],
                    points: Sequence[np.ndarray],
                    sampled_labels: Sequence[np.ndarray] | None = None,
                    sampled_scores: Sequence[np.ndarray] | None = None) -> MetricReport:
    """All metrics of one class: objects, pooled points of the raw scans (+ AU-PRO on them), and
    - when given - pooled points of the N sampled points (``p_auroc_sampled``, ``p_ap_sampled``)."""
    report = MetricReport()
    pooled_y = np.concatenate([np.asarray(y).reshape(-1) for y in point_labels]) if point_labels else np.zeros(0)
    pooled_s = np.concatenate([np.asarray(s).reshape(-1) for s in point_scores]) if point_scores else np.zeros(0)
    jobs = {
        "o_auroc": lambda: auroc(object_labels, object_scores),
        "p_auroc": lambda: auroc(pooled_y, pooled_s),
        "au_pro": lambda: au_pro(point_scores, point_labels, points),
        "o_ap": lambda: average_precision(object_labels, object_scores),
        "p_ap": lambda: average_precision(pooled_y, pooled_s),
        "o_f1max": lambda: f1_max(object_labels, object_scores),
        "p_f1max": lambda: f1_max(pooled_y, pooled_s),
        "o_f1max_official": lambda: f1_max_official(object_labels, object_scores),
        "p_f1max_official": lambda: f1_max_official(pooled_y, pooled_s),
    }
    if sampled_labels is not None and sampled_scores is not None:
        sy = np.concatenate([np.asarray(y).reshape(-1) for y in sampled_labels])
        ss = np.concatenate([np.asarray(s).reshape(-1) for s in sampled_scores])
        jobs["p_auroc_sampled"] = lambda: auroc(sy, ss)
        jobs["p_ap_sampled"] = lambda: average_precision(sy, ss)
    for name, job in jobs.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DegenerateMetricWarning)
            report.values[name] = job()
        reasons = [str(w.message) for w in caught if issubclass(w.category, DegenerateMetricWarning)]
        if reasons:
            report.notes[name] = reasons[0]
    return report


def mean_metrics(per_class: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean over classes of each metric, ignoring NaN (NaN when no class has a value)."""
    keys = [k for k in (*METRIC_KEYS, *EXTRA_KEYS) if any(k in m for m in per_class.values())]
    out = {}
    for k in keys:
        vals = np.array([m[k] for m in per_class.values() if k in m and m[k] is not None], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[k] = float(vals.mean()) if vals.size else float("nan")
    return out
