"""Point-cloud IO, mesh sampling and data-set readers (torch-free).

    from btp.io import read_point_cloud, write_point_cloud, heat_colors, load_mesh, sample_surface
    from btp.io import PointCloud, Sample, detect_layout, iter_samples, list_classes
    from btp.io.errors import PointCloudError, TooFewPointsError, ...
"""
from __future__ import annotations

from btp.io.colors import heat_colors
from btp.io.datasets import (
    LAYOUTS,
    Sample,
    SampleFile,
    check_ground_truth,
    detect_layout,
    iter_samples,
    list_classes,
    read_sample,
    sample_files,
)
from btp.io.errors import (
    DatasetLayoutError,
    EmptyCloudError,
    FileTooLargeError,
    GroundTruthMismatchError,
    InvalidValuesError,
    MalformedFileError,
    MissingFileError,
    PointCloudError,
    TooFewPointsError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from btp.io.mesh import load_mesh, sample_surface
from btp.io.pointcloud import (READ_SUFFIXES, WRITE_SUFFIXES, PointCloud, cloud_from_array, read_point_cloud,
                               write_point_cloud)

__all__ = [
    "PointCloud", "read_point_cloud", "cloud_from_array", "write_point_cloud", "heat_colors", "READ_SUFFIXES", "WRITE_SUFFIXES",
    "load_mesh", "sample_surface",
    "Sample", "SampleFile", "LAYOUTS", "detect_layout", "iter_samples", "list_classes", "sample_files",
    "read_sample", "check_ground_truth",
    "PointCloudError", "MissingFileError", "UnsupportedFormatError", "EmptyCloudError", "InvalidValuesError",
    "TooFewPointsError", "GroundTruthMismatchError", "TruncatedFileError", "MalformedFileError",
    "DatasetLayoutError", "FileTooLargeError",
]
