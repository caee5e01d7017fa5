"""Defect regions: the points at or above the point threshold, grouped into connected regions.

    regions = defect_regions(points, scores, point_threshold)
    regions[0].center, regions[0].extent, regions[0].points, regions[0].peak, regions[0].mean

Two hot points belong to the same region when a chain of hot points joins them with no step
longer than ``LINK_SPACINGS`` sampling spacings; the sampling spacing is the median distance from
a point of the scan to its nearest neighbour, so the radius follows the scanner's density.
Coordinates and sizes are in the scan's own units (pass the scan's own frame). Torch-free: a
k-d tree (pykdtree) for the spacing, scipy for the links and their connected components.

Memory stays bounded on huge hot sets (a 5M-point scan of an untrained model can be half hot):
beyond MAX_LINKED hot points an evenly strided subset of MAX_LINKED is linked, with the radius
widened by sqrt(hot / MAX_LINKED) (a surface sample's spacing grows with the square root of the
thinning), and every hot point joins the region of its nearest linked point - counts, centers,
extents, peaks and means still cover every hot point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LINK_SPACINGS = 4.0  # hot points closer than this many sampling spacings are connected (about 11
# neighbours on average for random surface samples, well above where such samples fall apart)
SPACING_SAMPLE = 8192  # points whose nearest-neighbour distance estimates the spacing
MAX_LINKED = 200_000  # hot points linked pairwise at most; beyond, an even subset is linked (below)


@dataclass(frozen=True, kw_only=True)
class Region:
    """One connected region of points at or above the point threshold.

    center   [3]  mean of its points, in the scan's units
    extent   [3]  size along the scan's x, y, z (max - min of its points)
    points   int  how many points it holds
    peak     float  its highest point score
    mean     float  its mean point score
    """

    center: tuple[float, float, float]
    extent: tuple[float, float, float]
    points: int
    peak: float
    mean: float

    def as_dict(self) -> dict:
        return {"center": list(self.center), "extent": list(self.extent), "points": self.points,
                "peak": self.peak, "mean": self.mean}


def sampling_spacing(points: np.ndarray, sample: int = SPACING_SAMPLE) -> float:
    """Median nearest-neighbour distance of (an evenly strided subset of) the scan's points, each
    measured against the whole scan; 0.0 for fewer than two distinct points."""
    from pykdtree.kdtree import KDTree

    pts = np.ascontiguousarray(points, dtype=np.float64)
    if len(pts) < 2:
        return 0.0
    queries = pts[np.linspace(0, len(pts) - 1, min(sample, len(pts))).astype(np.int64)]
    dist, _ = KDTree(pts).query(queries, k=2)
    nearest = dist[:, 1]
    nearest = nearest[nearest > 0]  # duplicate points say nothing about the spacing
    return float(np.median(nearest)) if len(nearest) else 0.0


def defect_regions(points: np.ndarray, scores: np.ndarray, point_threshold: float, *,
                   spacing: float | None = None, link_spacings: float = LINK_SPACINGS,
                   min_points: int = 1, max_linked: int = MAX_LINKED) -> list[Region]:
    """Regions of the points with ``scores >= point_threshold``, largest first (then by peak).

    ``points`` [M, 3] and ``scores`` [M] (NaN counts as below the threshold); ``spacing``: the
    sampling spacing (default: ``sampling_spacing(points)``); regions with fewer than
    ``min_points`` points are left out; ``max_linked``: see the module's note on huge hot sets."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    pts = np.asarray(points, dtype=np.float64)
    sc = np.asarray(scores, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) != len(sc):
        raise ValueError(f"points {pts.shape} and scores {sc.shape}: expected [M, 3] and [M]")
    hot = np.flatnonzero(np.nan_to_num(sc, nan=-np.inf) >= point_threshold)
    if len(hot) == 0:
        return []
    if spacing is None:
        spacing = sampling_spacing(pts)
    hp = pts[hot]
    radius = max(link_spacings * spacing, 0.0)
    linked = np.arange(len(hot))
    if len(hot) > max_linked:
        linked = np.linspace(0, len(hot) - 1, max_linked).astype(np.int64)
        radius *= np.sqrt(len(hot) / max_linked)
    pairs = cKDTree(hp[linked]).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])),
                       shape=(len(linked), len(linked)))
    count, label = connected_components(graph, directed=False)
    if len(linked) < len(hot):  # every hot point joins the region of its nearest linked point
        from pykdtree.kdtree import KDTree

        _, nearest = KDTree(np.ascontiguousarray(hp[linked])).query(np.ascontiguousarray(hp), k=1)
        label = label[nearest.astype(np.int64)]
    regions = []
    for k in range(count):
        members = np.flatnonzero(label == k)
        if len(members) < min_points:
            continue
        p, s = hp[members], sc[hot[members]]
        regions.append(Region(center=tuple(float(c) for c in p.mean(axis=0)),
                              extent=tuple(float(e) for e in np.ptp(p, axis=0)),
                              points=int(len(members)), peak=float(s.max()), mean=float(s.mean())))
    regions.sort(key=lambda r: (-r.points, -r.peak))
    return regions
