"""Unit-sphere normalisation (preprocess.normalize = "unit_sphere") and its inverse."""
from __future__ import annotations

import numpy as np

from btp.geometry._checks import as_points
from btp.geometry.errors import DegenerateCloudError


def normalize(points) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre at the centroid and divide by the max radius.

    points [N, 3] -> (normed float32 [N, 3], centre float32 [3], scale float) with
    ``normed = (points - centre) / scale`` and max ``|normed|`` = 1. The centroid and radius are
    accumulated in float64. Raises DegenerateCloudError if all points coincide (scale 0).
    """
    pts = as_points(points)
    centre64 = pts.mean(axis=0, dtype=np.float64)  # [3]
    centred = pts.astype(np.float64) - centre64  # [N, 3]
    scale = float(np.sqrt((centred * centred).sum(axis=1).max()))
    if not scale > 0.0 or not np.isfinite(scale):
        raise DegenerateCloudError(
            f"normalize: all {pts.shape[0]} points coincide (max radius {scale}), so the cloud has "
            f"no extent to scale; check the scan (a single repeated point is not a surface)")
    normed = (centred / scale).astype(np.float32)
    return normed, centre64.astype(np.float32), scale


def denormalize(normed, centre, scale: float) -> np.ndarray:
    """Inverse of ``normalize``: normed [..., 3] -> float32 [..., 3] = normed * scale + centre."""
    arr = np.asarray(normed, dtype=np.float64)
    return (arr * float(scale) + np.asarray(centre, dtype=np.float64)).astype(np.float32)
