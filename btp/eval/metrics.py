"""Anomaly-detection metrics at object and point level (sklearn underneath; torch-free).

- ``auroc`` / ``average_precision`` / ``f1_max``: one label and one score per item (an object,
  or a point of the pooled test points of a class). Ties count half (sklearn's ROC).
- ``au_pro``: the standard per-region overlap curve for point clouds. Ground-truth regions are
  the connected components of each sample's anomalous points, two of them linked when closer
  than ``radius_factor`` x the median distance from an anomalous point to its ``nn_k``-th
  nearest anomalous neighbour (2.5 x 6-NN, per sample). At each of ``num_thresholds`` (200)
  thresholds spread evenly between the smallest and largest pooled score, PRO = mean over all
  regions (all samples) of the share of the region's points scored >= threshold, FPR = share of
  all normal points (all samples) scored >= threshold. The curve starts at (0, 0) (threshold
  above every score), is integrated with the trapezoid rule up to FPR = ``fpr_limit`` (0.3; PRO
  linearly interpolated there) and divided by ``fpr_limit``, so a perfect detector scores 1.

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
EXTRA_KEYS: tuple[str, ...] = ("p_f1max", "p_auroc_sampled", "p_ap_sampled")

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


# ---- AU-PRO ----------------------------------------------------------------------------

def gt_regions(points: np.ndarray, labels: np.ndarray, radius_factor: float = PRO_RADIUS_FACTOR,
               nn_k: int = PRO_NN_K) -> np.ndarray:
    """Connected anomalous regions of one sample: int64 [N], region id 0.. for anomalous points, -1 else.

    Link radius = radius_factor x median over anomalous points of the distance to their nn_k-th
    nearest anomalous neighbour (fewer neighbours when the sample has fewer anomalous points).
    """
    pts = np.asarray(points, dtype=np.float64)
    lab = np.asarray(labels).reshape(-1)
    if pts.ndim != 2 or pts.shape != (lab.shape[0], 3):
        raise ValueError(f"gt_regions: points {pts.shape} and labels {lab.shape} must be [N,3] and [N]")
    region = np.full(lab.shape[0], -1, dtype=np.int64)
    anomalous = np.flatnonzero(lab == 1)
    if anomalous.size == 0:
        return region
    if anomalous.size == 1:
        region[anomalous] = 0
        return region
    a = pts[anomalous]
    tree = cKDTree(a)
    k = min(nn_k, a.shape[0] - 1)
    kth = tree.query(a, k=k + 1)[0][:, k]  # column 0 is the point itself
    radius = radius_factor * float(np.median(kth))
    pairs = tree.query_pairs(max(radius, 0.0), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])) if len(pairs) else
                       ([], ([], [])), shape=(a.shape[0], a.shape[0]))
    _, comp = connected_components(graph, directed=False)
    region[anomalous] = comp
    return region


def pro_curve(point_scores: Sequence[np.ndarray], point_labels: Sequence[np.ndarray],
              points: Sequence[np.ndarray], num_thresholds: int = PRO_THRESHOLDS,
              radius_factor: float = PRO_RADIUS_FACTOR, nn_k: int = PRO_NN_K) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at `num_thresholds` evenly spaced thresholds, plus the (0, 0) start; sorted by fpr."""
    if not (len(point_scores) == len(point_labels) == len(points)):
        raise ValueError("pro_curve: give one score, label and point array per sample")
    region_scores: list[np.ndarray] = []
    normal_scores: list[np.ndarray] = []
    for s, y, p in zip(point_scores, point_labels, points):
        y, s = _binary(y, s, "au_pro")
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
    thresholds = np.linspace(pooled.min(), pooled.max(), num_thresholds)  # [T]
    normal_sorted = np.sort(normal)
    fpr = 1.0 - np.searchsorted(normal_sorted, thresholds, side="left") / normal.size  # share >= t
    overlaps = np.stack([1.0 - np.searchsorted(np.sort(rs), thresholds, side="left") / rs.size
                         for rs in region_scores])  # [R, T]
    pro = overlaps.mean(axis=0)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    order = np.lexsort((pro, fpr))
    return fpr[order], pro[order]


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
    return _unit(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], y interpolated at x_max."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and (~inside).any():
        j = np.flatnonzero(~inside)[0]  # first point beyond the limit
        x0, y0, x1, y1 = x[j - 1], y[j - 1], x[j], y[j]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_max), np.append(ys, y_at)
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
