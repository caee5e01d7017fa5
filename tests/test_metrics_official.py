"""btp.metrics against an independent re-implementation of the official BTP-3DAD formulas
(test_standard_aupro.py): AU-PRO within 1e-6 and the official F1max, on random inputs.

The reference below is written from the formulas, deliberately the slow way (per-threshold
loops, a union-find over radius neighbours), sharing no code with btp.metrics.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from sklearn.metrics import average_precision_score, roc_auc_score

from btp.metrics import au_pro, auroc, average_precision, f1_max, f1_max_official


def _ref_regions(points, labels):
    pos = np.flatnonzero(labels)
    if pos.size == 0:
        return []
    if pos.size == 1:
        return [pos]
    p = points[pos].astype(np.float32)
    d, _ = cKDTree(p).query(p, k=min(7, p.shape[0]))
    d = d[:, 1:].reshape(-1)
    d = d[np.isfinite(d) & (d > 0)]
    radius = float(np.median(d) * 2.5) if d.size else 0.0
    if radius <= 0:
        return [pos]
    parent = list(range(pos.size))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, nbrs in enumerate(cKDTree(p).query_ball_point(p, r=radius)):
        for j in nbrs:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[rj] = ri
    groups = {}
    for local, original in enumerate(pos):
        groups.setdefault(find(local), []).append(original)
    return [np.asarray(g) for g in groups.values()]


def _ref_au_pro(scores_list, labels_list, points_list, limit=0.3, n_thr=200):
    scores_list = [np.asarray(s, np.float32) for s in scores_list]
    labels_list = [np.asarray(y).astype(bool) for y in labels_list]
    regions = [_ref_regions(np.asarray(p, np.float32), y) for p, y in zip(points_list, labels_list)]
    n_normal = sum(int((~y).sum()) for y in labels_list)
    if sum(len(r) for r in regions) == 0 or n_normal == 0:
        return float("nan")
    alls = np.concatenate(scores_list)
    lo, hi = float(alls.min()), float(alls.max())
    fprs, pros = [], []
    for t in np.linspace(hi + 1e-12, lo - 1e-12, n_thr):
        fp, overlaps = 0, []
        for s, y, regs in zip(scores_list, labels_list, regions):
            pred = s >= t
            fp += int((pred & ~y).sum())
            overlaps += [float(pred[r].mean()) for r in regs]
        fprs.append(fp / n_normal)
        pros.append(float(np.mean(overlaps)))
    fprs, pros = np.array(fprs), np.array(pros)
    order = np.argsort(fprs, kind="mergesort")
    fprs, pros = fprs[order], pros[order]
    uf = np.unique(fprs)
    up = np.array([pros[fprs == f].max() for f in uf])
    f = np.concatenate([[0.0], uf])
    p = np.concatenate([[0.0], up])
    keep = f <= limit
    cf, cp = f[keep], p[keep]
    if cf[-1] < limit:
        cf, cp = np.append(cf, limit), np.append(cp, np.interp(limit, f, p))
    return float(np.trapz(cp, cf) / limit) if hasattr(np, "trapz") else float(np.trapezoid(cp, cf) / limit)


def _ref_f1max(y, s, eps=1e-12):
    y = np.asarray(y).astype(int)
    order = np.argsort(-np.asarray(s), kind="mergesort")
    tp = np.cumsum(y[order])
    prec = tp / (np.arange(1, len(y) + 1) + eps)
    rec = tp / (y.sum() + eps)
    return float(np.nanmax(2 * prec * rec / (prec + rec + eps)))


def _random_class(rng, n_samples, quantise):
    """Samples of clustered points with 0-3 blob-shaped anomalous regions each; scores optionally
    quantised so that ties across classes happen."""
    scores, labels, points = [], [], []
    for _ in range(n_samples):
        n = int(rng.integers(200, 600))
        pts = rng.normal(size=(n, 3)).astype(np.float32)
        lab = np.zeros(n, int)
        for _ in range(int(rng.integers(0, 4))):
            center = pts[rng.integers(n)]
            lab[np.linalg.norm(pts - center, axis=1) < rng.uniform(0.2, 0.6)] = 1
        s = rng.random(n) * 0.7 + 0.3 * lab * rng.random(n)
        if quantise:
            s = np.round(s * 20) / 20
        scores.append(s)
        labels.append(lab)
        points.append(pts)
    if not any(y.any() for y in labels):
        labels[0][:5] = 1
    return scores, labels, points


@pytest.mark.parametrize("seed", range(6))
def test_au_pro_equals_the_official_formula(seed):
    rng = np.random.default_rng(seed)
    scores, labels, points = _random_class(rng, n_samples=int(rng.integers(1, 5)), quantise=seed % 2 == 1)
    ours = au_pro(scores, labels, points)
    ref = _ref_au_pro(scores, labels, points)
    assert ours == pytest.approx(ref, abs=1e-6)


def test_au_pro_single_point_regions_and_duplicates():
    rng = np.random.default_rng(11)
    pts = rng.normal(size=(300, 3)).astype(np.float32)
    pts[10:20] = pts[10]  # ten coinciding anomalous points: radius 0 -> one region
    lab = np.zeros(300, int)
    lab[10:20] = 1
    lab[200] = 1  # a lone anomalous point in a second sample
    s = rng.random(300)
    args = ([s, s[::-1].copy()], [lab, np.eye(1, 300, 200, dtype=int)[0]], [pts, pts])
    assert au_pro(*args) == pytest.approx(_ref_au_pro(*args), abs=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_f1max_official_and_the_other_metrics(seed):
    rng = np.random.default_rng(100 + seed)
    y = (rng.random(500) < 0.2).astype(int)
    s = np.round(rng.random(500) + 0.3 * y, 1)  # heavy ties
    assert f1_max_official(y, s) == pytest.approx(_ref_f1max(y, s), abs=1e-9)
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    # with ties the tie-grouped rule can only be lower or equal (it cannot split a tie)
    assert f1_max(y, s) <= f1_max_official(y, s) + 1e-12


def test_f1max_rules_agree_without_ties():
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.3).astype(int)
    s = rng.random(300) + 0.2 * y
    assert f1_max(y, s) == pytest.approx(f1_max_official(y, s), abs=1e-9)
