"""Unit-sphere normalisation (preprocess.normalize = "unit_sphere") and its inverse."""
from __future__ import annotations

import numpy as np

from btp.geometry._checks import as_points
from btp.geometry.errors import DegenerateCloudError


def normalize(points) -> tuple[np.ndarray, np.ndarray, float]:
    """Move the centroid to the origin and divide by the max radius.

    points [N, 3] -> (normed float32 [N, 3], origin float32 [3], scale float) with
    ``normed = (points - origin) / scale`` and max ``|normed|`` = 1. The centroid and radius are
    accumulated in float64. Raises DegenerateCloudError if all points coincide (scale 0).
    """
    pts = as_points(points)
    origin64 = pts.mean(axis=0, dtype=np.float64)  # [3]
    centered = pts.astype(np.float64) - origin64  # [N, 3]
    scale = float(np.sqrt((centered * centered).sum(axis=1).max()))
    if not scale > 0.0 or not np.isfinite(scale):
        raise DegenerateCloudError(
            f"normalize: all {pts.shape[0]} points coincide (max radius {scale}), so the cloud has "
            f"no extent to scale; check the scan (a single repeated point is not a surface)")
    normed = (centered / scale).astype(np.float32)
    return normed, origin64.astype(np.float32), scale


def denormalize(normed, origin, scale: float) -> np.ndarray:
    """Inverse of ``normalize``: normed [..., 3] -> float32 [..., 3] = normed * scale + origin."""
    arr = np.asarray(normed, dtype=np.float64)
    return (arr * float(scale) + np.asarray(origin, dtype=np.float64)).astype(np.float32)
