"""FPFH descriptors per patch (the GFCM's supervision target), via open3d."""
from __future__ import annotations

import numpy as np

from btp.geometry._checks import as_points
from btp.geometry.errors import GeometryError


def fpfh_patches(points, patch_idx, gfcm_cfg) -> np.ndarray:
    """33-d FPFH of each patch: max over the patch's points of their open3d FPFH.

    points [N, 3], patch_idx int [G, K] -> float32 [G, 33].
    Normals: open3d ``estimate_normals`` with a hybrid search (``gfcm_cfg.normal_radius``,
    ``gfcm_cfg.normal_max_nn``), orientation as open3d leaves it; FPFH: open3d
    ``compute_fpfh_feature`` (``gfcm_cfg.fpfh_radius``, ``gfcm_cfg.fpfh_max_nn``). The radii are
    in the cloud's units: pass normalised points (unit sphere), as the spec's radii assume.
    ``gfcm_cfg`` is a ``btp.config.GFCMConfig`` (or anything with those four attributes).
    """
    import open3d as o3d

    pts = as_points(points)
    pidx = np.asarray(patch_idx)
    if pidx.ndim != 2 or not np.issubdtype(pidx.dtype, np.integer):
        raise GeometryError(f"patch_idx: expected integer [G, K], got {pidx.dtype} {pidx.shape}")
    if pidx.size and (pidx.min() < 0 or pidx.max() >= pts.shape[0]):
        raise GeometryError(f"patch_idx: indices outside [0, {pts.shape[0]})")
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts.astype(np.float64)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(
        radius=float(gfcm_cfg.normal_radius), max_nn=int(gfcm_cfg.normal_max_nn)))
    feature = o3d.pipelines.registration.compute_fpfh_feature(
        cloud, o3d.geometry.KDTreeSearchParamHybrid(
            radius=float(gfcm_cfg.fpfh_radius), max_nn=int(gfcm_cfg.fpfh_max_nn)))
    per_point = np.asarray(feature.data, dtype=np.float32).T  # [N, 33]
    return np.ascontiguousarray(per_point[pidx].max(axis=1))  # [G, 33]
