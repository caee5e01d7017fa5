"""Anomaly-ShapeNet / Real3D-AD readers on tiny trees built from real-mesh samples."""
from __future__ import annotations

import numpy as np
import open3d as o3d
import pytest

from btp.io import Sample, detect_layout, iter_samples, list_classes, load_mesh, sample_surface, write_point_cloud
from btp.io.datasets import sample_files
from btp.io.errors import (
    DatasetLayoutError,
    GroundTruthMismatchError,
    MissingFileError,
    PointCloudError,
    TooFewPointsError,
)

N = 400
MESHES = {"bunny0": "cgal__stanford_bunny.ply", "elephant0": "cgal__elephant.ply"}


@pytest.fixture(scope="module")
def surfaces(shapes_root):
    """One float32 [N,3] sampler per class, from a real mesh."""
    meshes = {cls: load_mesh(shapes_root / name) for cls, name in MESHES.items()}

    def sample(cls: str, seed: int) -> np.ndarray:
        return sample_surface(*meshes[cls], N, seed=seed)[0]

    return sample


def defect(points: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A bulge: points near a random seed point pushed away from the centroid; labels mark them."""
    rng = np.random.default_rng(seed)
    center = points[rng.integers(len(points))]
    radius = 0.15 * np.linalg.norm(points.max(0) - points.min(0))
    labels = (np.linalg.norm(points - center, axis=1) < radius).astype(np.int64)
    moved = points.copy()
    outward = points - points.mean(0)
    moved[labels == 1] += 0.05 * outward[labels == 1]
    return moved.astype(np.float32), labels


def write_gt(path, points, labels, order=None):
    order = np.arange(len(points)) if order is None else order
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, np.column_stack([points[order], labels[order]]), fmt="%.7f %.7f %.7f %d")


def write_scan(path, points, ascii_pcd=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    if ascii_pcd:  # the public data sets ship ascii and binary PCDs
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
        o3d.io.write_point_cloud(str(path), cloud, write_ascii=True)
    else:
        write_point_cloud(path, points)


@pytest.fixture
def shapenet_root(tmp_path, surfaces):
    """Anomaly-ShapeNet: <cls>/train/*template*.pcd, <cls>/test/*.pcd, <cls>/GT/<stem>.txt."""
    root = tmp_path / "Anomaly-ShapeNet"
    truth = {}
    for k, cls in enumerate(MESHES):
        for t in range(2):
            write_scan(root / cls / "train" / f"{cls}_template{t}.pcd", surfaces(cls, 10 * k + t))
        write_scan(root / cls / "test" / f"{cls}_positive0.pcd", surfaces(cls, 10 * k + 2), ascii_pcd=True)
        for j, kind in enumerate(("bulge0", "crack1")):
            points, labels = defect(surfaces(cls, 10 * k + 3 + j), seed=j)
            stem = f"{cls}_{kind}"
            write_scan(root / cls / "test" / f"{stem}.pcd", points, ascii_pcd=j == 0)
            # crack1's GT lists the same points in another order
            order = np.random.default_rng(j).permutation(N) if kind == "crack1" else None
            write_gt(root / cls / "GT" / f"{stem}.txt", points, labels, order)
            truth[stem] = (points if order is None else points[order], labels if order is None else labels[order])
    return root, truth


@pytest.fixture
def real3d_root(tmp_path, surfaces):
    """Real3D-AD: <cls>/train/*.pcd, <cls>/test/<n>_good.pcd / <n>_<defect>.pcd, <cls>/gt/<stem>.txt."""
    root = tmp_path / "Real3D-AD-PCD"
    truth = {}
    cls = "bunny0"
    write_scan(root / cls / "train" / "293_template.pcd", surfaces(cls, 0))
    write_scan(root / cls / "test" / "300_good.pcd", surfaces(cls, 1))
    write_scan(root / cls / "test" / "301_template.pcd", surfaces(cls, 2))  # not a test sample
    points, labels = defect(surfaces(cls, 3), seed=5)
    write_scan(root / cls / "test" / "302_bulge.pcd", points)
    write_gt(root / cls / "gt" / "302_bulge.txt", points, labels)
    truth["302_bulge"] = (points, labels)
    return root, truth


def test_detect_layout_and_classes(shapenet_root, real3d_root, tmp_path):
    assert detect_layout(shapenet_root[0]) == "anomaly-shapenet"
    assert detect_layout(real3d_root[0]) == "real3d"
    assert list_classes(shapenet_root[0]) == sorted(MESHES)
    assert list_classes(real3d_root[0], layout="real3d") == ["bunny0"]
    # a class folder on its own is a one-class data set
    assert detect_layout(shapenet_root[0] / "bunny0") == "anomaly-shapenet"
    assert list_classes(shapenet_root[0] / "bunny0") == ["bunny0"]
    (tmp_path / "nothing" / "cls" / "images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match=r"train/ or test/"):
        detect_layout(tmp_path / "nothing")
    with pytest.raises(MissingFileError):
        detect_layout(tmp_path / "absent")


def test_detect_layout_by_names_and_conflict(tmp_path, surfaces):
    root = tmp_path / "names"
    write_scan(root / "a" / "test" / "a_positive0.pcd", surfaces("bunny0", 0))
    assert detect_layout(root) == "anomaly-shapenet"
    write_scan(root / "b" / "test" / "0_good.pcd", surfaces("bunny0", 1))
    with pytest.raises(DatasetLayoutError, match="disagree"):
        detect_layout(root)
    bare = tmp_path / "bare"
    write_scan(bare / "c" / "test" / "scan.pcd", surfaces("bunny0", 2))
    with pytest.raises(DatasetLayoutError, match=r"GT/.*gt/.*'positive'"):
        detect_layout(bare)


def test_anomaly_shapenet_test_split(shapenet_root):
    root, truth = shapenet_root
    samples = list(iter_samples(root))
    names = [s.path.name for s in samples]
    assert names == ["bunny0_bulge0.pcd", "bunny0_crack1.pcd", "bunny0_positive0.pcd",
                     "elephant0_bulge0.pcd", "elephant0_crack1.pcd", "elephant0_positive0.pcd"]
    for s in samples:
        assert isinstance(s, Sample) and s.split == "test" and s.cls == s.path.stem.split("_")[0]
        assert s.points.dtype == np.float32 and s.labels.dtype == np.int64 and len(s.labels) == len(s.points)
        if "positive" in s.path.name:
            assert s.object_label == 0 and not s.labels.any() and s.gt_path is None
        else:
            points, labels = truth[s.path.stem]
            assert s.object_label == 1 and s.gt_path.parent.name == "GT"
            assert np.allclose(s.points, points, atol=1e-6) and np.array_equal(s.labels, labels)
            assert 0 < s.labels.sum() < len(s.labels)
    # deterministic: same order and content on a second pass
    again = list(iter_samples(root, layout="anomaly-shapenet", split="test"))
    assert [s.path for s in again] == [s.path for s in samples]
    assert all(np.array_equal(a.points, b.points) for a, b in zip(again, samples))


def test_train_split_and_class_filter(shapenet_root):
    root, _ = shapenet_root
    train = list(iter_samples(root, split="train", classes=["elephant0"]))
    assert [s.path.name for s in train] == ["elephant0_template0.pcd", "elephant0_template1.pcd"]
    assert all(s.object_label == 0 and not s.labels.any() and s.split == "train" for s in train)
    assert len(sample_files(root, split="train")) == 4
    with pytest.raises(DatasetLayoutError, match=r"no class folder for \['chair0'\]"):
        list(iter_samples(root, classes=["chair0"]))
    with pytest.raises(ValueError, match="split"):
        list(iter_samples(root, split="val"))


def test_real3d_test_split(real3d_root):
    root, truth = real3d_root
    samples = list(iter_samples(root))
    assert [s.path.name for s in samples] == ["300_good.pcd", "302_bulge.pcd"]  # 301_template skipped
    good, bulge = samples
    assert good.object_label == 0 and not good.labels.any()
    points, labels = truth["302_bulge"]
    assert bulge.object_label == 1 and bulge.gt_path.parent.name == "gt"
    assert np.allclose(bulge.points, points, atol=1e-6) and np.array_equal(bulge.labels, labels)
    assert [s.path.name for s in iter_samples(root, split="train")] == ["293_template.pcd"]


def test_gt_row_count_mismatch(shapenet_root):
    root, truth = shapenet_root
    gt = root / "bunny0" / "GT" / "bunny0_bulge0.txt"
    points, labels = truth["bunny0_bulge0"]
    write_gt(gt, points[:-5], labels[:-5])
    with pytest.raises(GroundTruthMismatchError, match=r"bunny0_bulge0.txt.*395 GT rows.*400 points"):
        list(iter_samples(root, classes=["bunny0"]))


def test_gt_coordinate_mismatch_and_opt_out(shapenet_root, surfaces):
    root, truth = shapenet_root
    gt = root / "elephant0" / "GT" / "elephant0_crack1.txt"
    points, labels = truth["elephant0_crack1"]
    shifted = points.copy()
    shifted[:7] += 0.01 * np.linalg.norm(points.max(0) - points.min(0))
    write_gt(gt, shifted, labels)
    with pytest.raises(GroundTruthMismatchError, match=r"7 of 400 GT rows have no scan point"):
        list(iter_samples(root, classes=["elephant0"]))
    # a GT from another scan entirely
    other = surfaces("elephant0", 99)
    write_gt(gt, other, labels)
    with pytest.raises(GroundTruthMismatchError, match="does not belong to this scan"):
        list(iter_samples(root, classes=["elephant0"]))
    # the reference loaders' behaviour: trust the GT file as is
    trusted = [s for s in iter_samples(root, classes=["elephant0"], verify_gt=False) if s.gt_path == gt]
    assert np.allclose(trusted[0].points, other, atol=1e-6)


def test_missing_gt_and_unlabelled_gt(real3d_root):
    root, truth = real3d_root
    gt = root / "bunny0" / "gt" / "302_bulge.txt"
    points, _ = truth["302_bulge"]
    gt.unlink()
    with pytest.raises(MissingFileError, match=r"302_bulge.txt.*ground truth.*302_bulge.pcd") as err:
        list(iter_samples(root))
    assert err.value.path == gt
    np.savetxt(gt, points)  # x y z only
    with pytest.raises(GroundTruthMismatchError, match="no label column"):
        list(iter_samples(root))


def test_min_points_and_bad_scan_propagate(real3d_root):
    root, _ = real3d_root
    with pytest.raises(TooFewPointsError, match="300_good.pcd"):
        list(iter_samples(root, min_points=N + 1))
    scan = root / "bunny0" / "test" / "300_good.pcd"
    scan.write_bytes(scan.read_bytes()[:-50])
    with pytest.raises(PointCloudError, match="300_good.pcd"):
        list(iter_samples(root))
