"""Metrics against hand-computed cases (AUROC with ties, F1max, AP, AU-PRO on two regions)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from btp.metrics import (
    DegenerateMetricWarning,
    au_pro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
    f1_max_threshold,
    gt_regions,
    mean_metrics,
    pro_curve,
)


def test_auroc_counts_ties_half():
    # pairs (pos, neg): 0.5>0.1 -> 1, 0.5=0.5 -> 1/2, 0.9>both -> 2  => 3.5 / 4
    assert auroc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert auroc([0, 1], [0.3, 0.3]) == pytest.approx(0.5)
    assert auroc([1, 0, 1, 0], [0.2, 0.4, 0.6, 0.8]) == pytest.approx(0.25)


def test_f1max_threshold_by_hand():
    # >= 0.35 flags {0.35, 0.4, 0.8}: P 2/3, R 1, F1 0.8; >= 0.8: F1 2/3; >= 0.4: F1 0.5
    f1, threshold = f1_max_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)


def test_f1max_by_hand():
    # thresholds 0.9: P1 R1/3 F.5 | 0.8: .5/.33 F.4 | 0.7: 2/3,2/3 F.667 | 0.3: .5,.667 | 0.2: .6, 1 -> F .75
    assert f1_max([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.3, 0.2]) == pytest.approx(0.75)
    assert f1_max([0, 1], [0.1, 0.9]) == pytest.approx(1.0)


def test_average_precision_by_hand():
    # ranked: 1 (P=1), 0, 1 (P=2/3) -> AP = (1 + 2/3) / 2
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(5 / 6)


def test_one_class_gives_nan_with_reason():
    with pytest.warns(DegenerateMetricWarning, match="only normal"):
        assert math.isnan(auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    with pytest.warns(DegenerateMetricWarning, match="only anomalous"):
        assert math.isnan(f1_max([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="2 labels but 3 scores"):
        auroc([0, 1], [0.1, 0.2, 0.3])


def _two_region_sample():
    """Region A: 7 points in a line (step 0.1); region B: 8 points 10 units away; 10 normal points far off."""
    a = np.array([[0.1 * i, 0, 0] for i in range(7)])
    b = np.array([[10 + 0.1 * i, 0, 0] for i in range(8)])
    normal = np.array([[50 + i, 50, 0] for i in range(10)], dtype=float)
    points = np.concatenate([a, b, normal])
    labels = np.array([1] * 15 + [0] * 10)
    # A all 1.0; B: 2 x 1.0, 2 x 0.5, 4 x 0.0; normals: 1 x 1.0, 2 x 0.5, 7 x 0.0
    scores = np.array([1.0] * 7 + [1, 1, .5, .5, 0, 0, 0, 0] + [1, .5, .5] + [0] * 7)
    return points, labels, scores


def test_gt_regions_finds_the_two_regions():
    points, labels, _ = _two_region_sample()
    region = gt_regions(points, labels)
    assert set(region[:7]) == {region[0]} and set(region[7:15]) == {region[7]} and region[0] != region[7]
    assert (region[15:] == -1).all()
    assert region.max() == 1


def test_au_pro_two_regions_by_hand():
    points, labels, scores = _two_region_sample()
    # thresholds in (0.5, 1]: FPR 0.1, overlap A 1, B 0.25 -> PRO 0.625
    #            in (0, 0.5]: FPR 0.3, overlap A 1, B 0.5  -> PRO 0.75
    #            0          : FPR 1,   PRO 1;  start (0, 0)
    # area to 0.3 = 0.1 * 0.625 / 2 + 0.2 * (0.625 + 0.75) / 2 = 0.16875 -> / 0.3 = 0.5625
    fpr, pro = pro_curve([scores], [labels], [points])
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == 1
    assert au_pro([scores], [labels], [points]) == pytest.approx(0.5625)
    # the same regions split over two samples give the same curve (regions and FPR are pooled)
    s1, s2 = np.r_[0:7, 15:20], np.r_[7:15, 20:25]
    split = au_pro([scores[s1], scores[s2]], [labels[s1], labels[s2]], [points[s1], points[s2]])
    assert split == pytest.approx(0.5625)


def test_au_pro_perfect_and_reversed():
    points, labels, _ = _two_region_sample()
    assert au_pro([labels.astype(float)], [labels], [points]) == pytest.approx(1.0)
    # reversed: every threshold flags all normals before any anomaly, so the curve is (0,0) -> (1,1)
    # and the official linear interpolation at FPR 0.3 gives PRO 0.3: area 0.045 / 0.3 = 0.15
    assert au_pro([1.0 - labels], [labels], [points]) == pytest.approx(0.15)


def test_au_pro_without_anomalies_is_nan():
    points, labels, scores = _two_region_sample()
    with pytest.warns(DegenerateMetricWarning, match="no anomalous"):
        assert math.isnan(au_pro([scores], [np.zeros_like(labels)], [points]))


def test_compute_metrics_collects_notes_and_means():
    points, labels, scores = _two_region_sample()
    rep = compute_metrics([0, 0], [0.1, 0.2], [np.zeros(25, int), np.zeros(25, int)], [scores, scores],
                          [points, points])
    assert math.isnan(rep.values["o_auroc"]) and "only normal" in rep.notes["o_auroc"]
    assert rep.json_values()["o_auroc"] is None
    good = compute_metrics([0, 1], [0.1, 0.9], [np.zeros(25, int), labels], [scores, scores], [points, points],
                           sampled_labels=[labels], sampled_scores=[scores])
    assert good.values["o_auroc"] == 1.0 and not good.notes
    assert 0 < good.values["p_auroc"] < 1 and "p_auroc_sampled" in good.values
    mean = mean_metrics({"a": rep.values, "b": good.values})
    assert mean["o_auroc"] == 1.0  # NaN of class a is left out
