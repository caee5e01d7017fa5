"""Readers for the public Anomaly-ShapeNet and Real3D-AD folder layouts (torch-free).

Layouts (``root`` holds one folder per class; ``root`` may also be one class folder itself):

- ``anomaly-shapenet``: ``<cls>/train/*.pcd`` (normal templates), ``<cls>/test/*.pcd``,
  ``<cls>/GT/<stem>.txt`` rows ``x y z label``; normal test files have "positive" in the name.
- ``real3d`` (Real3D-AD): ``<cls>/train/*.pcd``, ``<cls>/test/*.pcd``, ``<cls>/gt/<stem>.txt``
  rows ``x y z label``; normal test files have "good" in the name.

Test files whose name contains "template" are not test samples and are skipped (the Real3D-AD
reference loader does the same). Normal test samples and train samples are the scan with
all-zero labels; a GT file beside a normal sample is not read.

Anomalous test samples take points *and* labels from the GT file, as both reference loaders
do. With ``verify_gt=True`` (default) the GT file is checked against its scan first:

1. same row count, else ``GroundTruthMismatchError``;
2. coordinates equal row by row within ``gt_tolerance`` x the scan's bounding-box diagonal; or,
   when the rows are in another order, every GT row has its own scan point within that tolerance
   (a one-to-one nearest-neighbour match) - accepted, the GT order is kept;
3. otherwise ``GroundTruthMismatchError`` naming how many rows have no matching scan point.

A GT that does not come from its scan would give point metrics over the wrong surface, so the
mismatch is an error, not a warning; ``verify_gt=False`` (``btp eval --trust-gt``) trusts the GT
file as the reference loaders do (and skips reading the scan).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from btp.io.errors import DatasetLayoutError, GroundTruthMismatchError, MissingFileError
from btp.io.pointcloud import read_point_cloud

ANOMALY_SHAPENET = "anomaly-shapenet"
REAL3D = "real3d"
LAYOUTS = (ANOMALY_SHAPENET, REAL3D)
SPLITS = ("train", "test")
_GT_DIR = {ANOMALY_SHAPENET: "GT", REAL3D: "gt"}
_NORMAL_MARK = {ANOMALY_SHAPENET: "positive", REAL3D: "good"}
DEFAULT_GT_TOLERANCE = 1e-4  # relative to the scan's bounding-box diagonal
_ABS_TOLERANCE_FLOOR = 1e-6


@dataclass(frozen=True, eq=False, kw_only=True)
class Sample:
    """One data-set sample.

    points        float32 [N, 3]
    labels        int64 [N]   (0 normal, 1 anomalous point; all 0 for train and normal test samples)
    object_label  int         (0 normal, 1 anomalous object)
    cls           class folder name, e.g. "ashtray0"
    path          the scan (.pcd) this sample is
    split         "train" | "test"
    gt_path       the GT file its points and labels came from (anomalous test samples), else None
    """

    points: np.ndarray
    labels: np.ndarray
    object_label: int
    cls: str
    path: Path
    split: str
    gt_path: Path | None = None


@dataclass(frozen=True, kw_only=True)
class SampleFile:
    """Where one sample lives, before reading it (for progress bars: ``len(sample_files(...))``)."""

    cls: str
    path: Path
    split: str
    object_label: int
    gt_path: Path | None


def _class_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        raise MissingFileError(root, "data-set root is not a folder: check the path")
    if _is_class_dir(root):
        return [root]
    return sorted((d for d in root.iterdir() if d.is_dir() and _is_class_dir(d)), key=lambda d: d.name)


def _is_class_dir(d: Path) -> bool:
    return (d / "train").is_dir() or (d / "test").is_dir()


def detect_layout(root: str | os.PathLike) -> str:
    """``"anomaly-shapenet"`` or ``"real3d"`` from the GT folder name (``GT`` / ``gt``), else test names."""
    root = Path(root)
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise DatasetLayoutError(root, "no class folder with a train/ or test/ subfolder found; expected "
                                       "<root>/<cls>/{train,test}/*.pcd (Anomaly-ShapeNet or Real3D-AD)")
    votes = set()
    for d in class_dirs:
        children = {c.name for c in d.iterdir() if c.is_dir()}
        if "GT" in children and "gt" not in children:
            votes.add(ANOMALY_SHAPENET)
        elif "gt" in children and "GT" not in children:
            votes.add(REAL3D)
        else:
            test_names = [p.stem.lower() for p in (d / "test").glob("*.pcd")] if (d / "test").is_dir() else []
            if any(_NORMAL_MARK[ANOMALY_SHAPENET] in s for s in test_names):
                votes.add(ANOMALY_SHAPENET)
            if any(_NORMAL_MARK[REAL3D] in s for s in test_names):
                votes.add(REAL3D)
    if len(votes) == 1:
        return votes.pop()
    if not votes:
        raise DatasetLayoutError(root, "cannot tell the layout: looked for <cls>/GT/ (Anomaly-ShapeNet) or "
                                       "<cls>/gt/ (Real3D-AD), and for 'positive' / 'good' in <cls>/test/*.pcd "
                                       "names, found neither; pass --layout anomaly-shapenet or --layout real3d")
    raise DatasetLayoutError(root, f"class folders disagree on the layout ({sorted(votes)}); X")


def list_classes(root: str | os.PathLike, layout: str | None = None) -> list[str]:
    """Sorted class folder names under ``root`` (a class folder holds ``train/`` or ``test/``)."""
    root = Path(root)
    if layout is not None:
        _check_layout(root, layout)
    return [d.name for d in _class_dirs(root)]


def _check_layout(root: Path, layout: str) -> str:
    if layout not in LAYOUTS:
        raise DatasetLayoutError(root, f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def sample_files(root: str | os.PathLike, layout: str | None = None, split: str = "test",
                 classes: list[str] | tuple[str, ...] | None = None) -> list[SampleFile]:
    """Every sample's files in the deterministic order ``iter_samples`` yields them (class, then file name)."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    layout = _check_layout(root, layout) if layout is not None else detect_layout(root)
    class_dirs = _class_dirs(root)
    by_name = {d.name: d for d in class_dirs}
    if classes is not None:
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise DatasetLayoutError(root, f"no class folder for {unknown}; classes here: {sorted(by_name)}")
        class_dirs = [by_name[c] for c in sorted(set(classes))]
    files: list[SampleFile] = []
    for d in class_dirs:
        split_dir = d / split
        if not split_dir.is_dir():
            continue
        for scan in sorted(split_dir.glob("*.pcd"), key=lambda p: p.name):
            name = scan.stem.lower()
            if split == "train":
                files.append(SampleFile(cls=d.name, path=scan, split=split, object_label=0, gt_path=None))
                continue
            if "template" in name:
                continue
            if _NORMAL_MARK[layout] in name:
                files.append(SampleFile(cls=d.name, path=scan, split=split, object_label=0, gt_path=None))
            else:
                files.append(SampleFile(cls=d.name, path=scan, split=split, object_label=1,
                                        gt_path=d / _GT_DIR[layout] / f"{scan.stem}.txt"))
    return files


def iter_samples(root: str | os.PathLike, layout: str | None = None, split: str = "test",
                 classes: list[str] | tuple[str, ...] | None = None, *, min_points: int = 1,
                 verify_gt: bool = True, gt_tolerance: float = DEFAULT_GT_TOLERANCE) -> Iterator[Sample]:
    """Yield every sample of ``split`` in sorted order (class, then file name), reading lazily.

    ``min_points`` is passed to ``read_point_cloud`` (e.g. the model's N); see the module
    docstring for how GT files are checked (``verify_gt``, ``gt_tolerance``).
    """
    for entry in sample_files(root, layout, split, classes):
        yield read_sample(entry, min_points=min_points, verify_gt=verify_gt, gt_tolerance=gt_tolerance)


def read_sample(entry: SampleFile, *, min_points: int = 1, verify_gt: bool = True,
                gt_tolerance: float = DEFAULT_GT_TOLERANCE) -> Sample:
    """Read one ``SampleFile`` into a ``Sample`` (points and labels from the GT file when anomalous)."""
    if entry.gt_path is None:
        cloud = read_point_cloud(entry.path, min_points=min_points)
        labels = np.zeros(len(cloud), dtype=np.int64)
        return Sample(points=cloud.points, labels=labels, object_label=entry.object_label, cls=entry.cls,
                      path=entry.path, split=entry.split)
    if not entry.gt_path.is_file():
        raise MissingFileError(entry.gt_path, f"ground truth for the anomalous scan {entry.path.name} is missing "
                                              f"(expected {entry.gt_path.parent.name}/{entry.gt_path.name}); "
                                              "normal test scans need 'positive'/'good' in their name")
    gt = read_point_cloud(entry.gt_path, min_points=min_points)
    if gt.labels is None:
        raise GroundTruthMismatchError(entry.gt_path, "the GT file has no label column; expected rows x y z label")
    if verify_gt:
        scan = read_point_cloud(entry.path, min_points=min_points)
        check_ground_truth(scan.points, gt.points, entry.gt_path, entry.path, gt_tolerance)
    return Sample(points=gt.points, labels=gt.labels, object_label=entry.object_label, cls=entry.cls, path=entry.path,
                  split=entry.split, gt_path=entry.gt_path)


def check_ground_truth(scan_points: np.ndarray, gt_points: np.ndarray, gt_path: Path, scan_path: Path,
                       tolerance: float = DEFAULT_GT_TOLERANCE) -> None:
    """Raise ``GroundTruthMismatchError`` unless ``gt_points [M,3]`` are ``scan_points [N,3]`` (any row order).

    ``tolerance`` is relative to the scan's bounding-box diagonal (text files round coordinates).
    """
    if scan_points.shape[0] != gt_points.shape[0]:
        raise GroundTruthMismatchError(
            gt_path, f"{gt_points.shape[0]} GT rows but the scan {scan_path.name} has {scan_points.shape[0]} points; "
                     "the GT must list every scan point (btp eval --trust-gt takes the GT file as it is)")
    diagonal = float(np.linalg.norm(scan_points.max(axis=0) - scan_points.min(axis=0)))
    tol = max(tolerance * diagonal, _ABS_TOLERANCE_FLOOR)
    row_error = np.abs(scan_points.astype(np.float64) - gt_points.astype(np.float64)).max(axis=1)  # [N]
    if float(row_error.max()) <= tol:
        return
    from scipy.spatial import cKDTree

    distance, nearest = cKDTree(scan_points).query(gt_points, k=1)  # [M], [M]
    unmatched = int(np.count_nonzero(distance > tol))
    duplicates = int(gt_points.shape[0] - np.unique(nearest[distance <= tol]).shape[0] - unmatched)
    if unmatched == 0 and duplicates == 0:
        return
    raise GroundTruthMismatchError(
        gt_path, f"{unmatched} of {gt_points.shape[0]} GT rows have no scan point of {scan_path.name} within "
                 f"{tol:.3g} (largest gap {float(distance.max()):.3g})"
                 + (f" and {duplicates} rows share a scan point" if duplicates else "")
                 + "; the GT does not belong to this scan (btp eval --trust-gt takes the GT file as it is)")
