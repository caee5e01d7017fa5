"""Geometry ops of the BTP pipeline, torch-free: numpy in, numpy out (contracts: docs/design.md).

CPU reference *and* fast CPU path of the runtime's preprocessing. The FPS and kNN rules that
every backend (incl. the CUDA kernels in btp.kernels) must reproduce are written out in
``btp.geometry.sampling`` and ``btp.geometry.neighbors``.
"""
from btp.geometry.errors import DegenerateCloudError, GeometryError
from btp.geometry.features import fpfh_patches
from btp.geometry.neighbors import Groups, group, group_batch, knn, knn_reference, neighborhoods
from btp.geometry.normalize import denormalize, normalize
from btp.geometry.sampling import downsample, fps, fps_reference
from btp.geometry.scores import interpolate_to_raw, nearest_scores, object_score, propagate_patch_scores, top_mean

__all__ = [
    "normalize", "denormalize",
    "fps", "fps_reference", "downsample",
    "knn", "knn_reference",
    "group", "group_batch", "Groups", "neighborhoods",
    "fpfh_patches",
    "propagate_patch_scores", "interpolate_to_raw", "nearest_scores", "object_score", "top_mean",
    "GeometryError", "DegenerateCloudError",
]
