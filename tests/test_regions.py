"""Defect regions (btp.runtime.regions) on scans sampled from real meshes with synthetic defects
of known place and size: the hot points of each defect form one region, centered on it."""
from __future__ import annotations

import numpy as np
import pytest

from btp.runtime.regions import defect_regions, sampling_spacing
from runtime_helpers import real_scan


def _defect_scores(points, center, radius, seed=0):
    """Scores of a scan with a defect: 0.9 fading to 0.6 inside ``radius`` of ``center``, noise
    in [0, 0.4) elsewhere (below a 0.5 point threshold)."""
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0.0, 0.4, len(points))
    d = np.linalg.norm(points - center, axis=1)
    inside = d < radius
    scores[inside] = 0.9 - 0.3 * d[inside] / radius
    return scores.astype(np.float32), inside


@pytest.mark.parametrize("n", [4000, 40000])
def test_one_region_centered_on_the_defect(shapes_root, n):
    pts = real_scan(shapes_root, n=n, seed=5)
    center = pts[123]
    radius = 0.03 * np.ptp(pts, axis=0).max()  # a cap small enough that the surface's bend barely moves its mean
    scores, inside = _defect_scores(pts, center, radius)
    spacing = sampling_spacing(pts)
    regions = defect_regions(pts, scores, 0.5)
    assert len(regions) == 1, regions
    r = regions[0]
    assert np.linalg.norm(np.array(r.center) - center) <= 2 * spacing
    assert r.points == int(inside.sum())
    assert r.peak == pytest.approx(scores[inside].max()) and r.mean == pytest.approx(scores[inside].mean())
    assert np.allclose(r.extent, np.ptp(pts[inside], axis=0))
    assert max(r.extent) <= 2 * radius


def test_two_defects_give_two_regions_in_scan_units(shapes_root):
    pts = real_scan(shapes_root, name="cgal__pinion.ply", n=20000, seed=6).astype(np.float64) * 25.0 + 1000.0
    far = np.argmax(np.linalg.norm(pts - pts[0], axis=1))
    radius = 0.05 * np.ptp(pts, axis=0).max()
    s1, in1 = _defect_scores(pts, pts[0], radius, seed=1)
    s2, in2 = _defect_scores(pts, pts[far], radius, seed=1)
    scores = np.maximum(s1, s2)
    regions = defect_regions(pts, scores, 0.5)
    assert len(regions) == 2
    centers = sorted((np.array(r.center) for r in regions), key=lambda c: np.linalg.norm(c - pts[0]))
    # in the scan's own (scaled, shifted) units: each region is exactly its defect's points
    assert np.allclose(centers[0], pts[in1].mean(axis=0)) and np.allclose(centers[1], pts[in2].mean(axis=0))
    assert sorted(r.points for r in regions) == sorted([int(in1.sum()), int(in2.sum())])


def test_no_hot_point_no_region_and_nan_is_cold(shapes_root):
    pts = real_scan(shapes_root, n=2000, seed=7)
    scores = np.full(len(pts), 0.2, dtype=np.float32)
    scores[:10] = np.nan
    assert defect_regions(pts, scores, 0.5) == []
    with pytest.raises(ValueError, match="expected"):
        defect_regions(pts, scores[:-1], 0.5)


def test_a_huge_hot_set_is_linked_through_a_subset_with_the_same_regions(shapes_root):
    pts = real_scan(shapes_root, name="cgal__pinion.ply", n=30000, seed=8).astype(np.float64)
    far = np.argmax(np.linalg.norm(pts - pts[0], axis=1))
    radius = 0.25 * np.ptp(pts, axis=0).max()  # two large hot caps: thousands of hot points each
    s1, _ = _defect_scores(pts, pts[0], radius, seed=2)
    s2, _ = _defect_scores(pts, pts[far], radius, seed=2)
    scores = np.maximum(s1, s2)
    exact = defect_regions(pts, scores, 0.5)
    bounded = defect_regions(pts, scores, 0.5, max_linked=1500)  # far fewer than the hot points
    assert sum(r.points for r in exact) > 3 * 1500
    spacing = sampling_spacing(pts)
    for a, b in zip(exact[:2], bounded[:2]):  # the same two regions, give or take a few stray points
        assert abs(a.points - b.points) <= 0.01 * a.points and a.peak == b.peak
        assert np.linalg.norm(np.array(a.center) - np.array(b.center)) <= 2 * spacing
    assert sum(r.points for r in bounded) == sum(r.points for r in exact)  # every hot point in a region
