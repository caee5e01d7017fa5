"""Typed errors of ``btp.io``: every one names the file, the reason and, where there is one, the fix.

All subclass :class:`PointCloudError` (itself a :class:`btp.errors.BTPError` and a
:class:`ValueError`), so callers can catch one family or one precise case::

    try:
        cloud = read_point_cloud(path, min_points=cfg.preprocess.num_points)
    except TooFewPointsError as err:
        print(err.path, err.reason)
"""
from __future__ import annotations

from pathlib import Path

from btp.errors import BTPError


class PointCloudError(BTPError, ValueError):
    """A point-cloud, mesh or data-set file that cannot be used; ``.path`` and ``.reason`` say why."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = Path(path) if path is not None else None
        self.reason = reason
        where = str(self.path) if self.path is not None else "<array>"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep path/reason when pickled (multiprocessing data loaders)
        return (type(self), (self.path, self.reason))


class MissingFileError(PointCloudError):
    """The file (or a ground-truth file a sample needs) does not exist."""


class UnsupportedFormatError(PointCloudError):
    """The file extension is not one this module reads or writes (the message lists those it does)."""


class EmptyCloudError(PointCloudError):
    """The file parses but holds no points (or a mesh holds no triangles)."""


class InvalidValuesError(PointCloudError):
    """NaN/inf rows were dropped and fewer than ``min_points`` finite rows remain."""


class TooFewPointsError(PointCloudError):
    """Fewer points than the caller needs (``min_points``, e.g. the model's N or K)."""


class GroundTruthMismatchError(PointCloudError):
    """A ground-truth file's row count or coordinates do not match the scan it labels."""


class TruncatedFileError(PointCloudError):
    """The file ends before the data its header announces (an interrupted copy or download)."""


class MalformedFileError(PointCloudError):
    """The file's content cannot be parsed (bad header, wrong column count, missing npz key)."""


class FileTooLargeError(PointCloudError):
    """The file is over the size one scan may have (``btp.io.pointcloud.max_file_bytes``)."""


class DatasetLayoutError(PointCloudError):
    """A data-set root does not look like Anomaly-ShapeNet or Real3D-AD (the message says what was looked for)."""


__all__ = [
    "PointCloudError",
    "MissingFileError",
    "UnsupportedFormatError",
    "EmptyCloudError",
    "InvalidValuesError",
    "TooFewPointsError",
    "GroundTruthMismatchError",
    "TruncatedFileError",
    "MalformedFileError",
    "FileTooLargeError",
    "DatasetLayoutError",
]
