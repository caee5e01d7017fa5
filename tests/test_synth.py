"""Synthetic defects on real meshes: labels where geometry changed, label shares, determinism, layout."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from btp.io import detect_layout, iter_samples
from btp.train.data import defect_kind
from btp.train.synth import (
    ALL_DEFECT_TYPES,
    DEFECT_TYPES,
    SynthConfig,
    SynthError,
    SynthPlan,
    apply_defect,
    list_shapes,
    load_shape,
    make_anomalous,
    make_normal,
    sample_seed,
    write_dataset,
)

SMALL = SynthConfig(num_points=1024)
MESHES = ("stanford_bunny", "hex_nut", "fandisk")


@pytest.fixture(scope="module")
def shapes(shapes_root):
    paths = list_shapes(shapes_root)
    return {name: load_shape(paths[name], name) for name in MESHES}


@pytest.fixture(scope="module")
def bunny_cloud(shapes):
    shape = shapes["stanford_bunny"]
    points, normals = shape.sample(3000, np.random.default_rng(7))
    return shape, points, normals


@pytest.mark.parametrize("kind", ["bulge", "dent", "crack", "groove"])
def test_displacement_labels_are_exactly_the_moved_points(bunny_cloud, kind):
    shape, points, normals = bunny_cloud
    d = apply_defect(points, normals, kind, np.random.default_rng(3), SMALL, size=shape.size)
    assert d.keep.all() and len(d.points) == len(points)
    moved = np.linalg.norm(d.points - points, axis=1)
    thr = SMALL.label_threshold * shape.size
    np.testing.assert_array_equal(d.labels, (moved > thr).astype(np.int64))
    assert SMALL.frac_range[0] <= d.labels.mean() <= SMALL.frac_range[1]
    # the deepest move is within the requested depth range (1-5 % of the object size)
    lo, hi = SMALL.depth_range
    assert lo * shape.size * 0.5 <= moved.max() <= hi * shape.size * 1.0001
    # bulges go out along the normal, dents/cracks/grooves go in
    center = d.params["center"]
    sign = np.sign((d.points - points)[d.labels == 1] @ normals[center])
    assert (sign == (1 if kind == "bulge" else -1)).all()


@pytest.mark.parametrize("kind", ["added", "scratch"])
def test_added_material_goes_out_with_a_steep_rim_and_a_scratch_is_shallow(bunny_cloud, kind):
    shape, points, normals = bunny_cloud
    d = apply_defect(points, normals, kind, np.random.default_rng(3), SMALL, size=shape.size)
    assert d.keep.all() and len(d.points) == len(points)
    move = d.points - points
    moved = np.linalg.norm(move, axis=1)
    thr = SMALL.label_threshold * shape.size
    np.testing.assert_array_equal(d.labels, (moved > thr).astype(np.int64))
    assert SMALL.frac_range[0] <= d.labels.mean() <= SMALL.frac_range[1]
    center = d.params["center"]
    sign = np.sign(move[d.labels == 1] @ normals[center])
    assert (sign == (1 if kind == "added" else -1)).all()
    if kind == "scratch":  # a third of a crack's depth, long and narrow
        assert moved.max() <= SMALL.depth_range[1] * shape.size / 3 * 1.0001
        assert d.params["length"] >= 20 * d.params["width"] * 0.999
    else:  # no taller than wide; the rim is steep: at 90 % of the radius a cap still stands at 44 %
        assert d.params["height"] <= d.params["radius"] + 1e-12
        dist = np.linalg.norm(points - points[center], axis=1) / (d.params["radius"] * shape.size)
        ring = (dist > 0.85) & (dist < 0.95) & (moved > 0)
        assert ring.any()
        assert np.median(moved[ring]) > 0.3 * d.params["height"] * shape.size


def test_a_chip_bevels_a_curved_spot(shapes):
    shape = shapes["hex_nut"]
    points, normals = shape.sample(3000, np.random.default_rng(7))
    d = apply_defect(points, normals, "chip", np.random.default_rng(2), SMALL, size=shape.size)
    moved = np.linalg.norm(d.points - points, axis=1)
    thr = SMALL.label_threshold * shape.size
    np.testing.assert_array_equal(d.labels, (moved > thr).astype(np.int64))
    assert SMALL.frac_range[0] <= d.labels.mean() <= SMALL.frac_range[1]
    # the center is an edge: the normals around it disagree far more than around a random point
    tree = cKDTree(points)
    spread = lambda i: 1.0 - np.linalg.norm(normals[tree.query(points[i], k=16)[1]].mean(axis=0))
    c = d.params["edge_center"]
    assert spread(c) > np.quantile([spread(i) for i in range(0, 3000, 10)], 0.8)
    # material goes: the labelled points move into the part (against their own normals)
    assert ((d.points - points)[d.labels == 1] * normals[d.labels == 1]).sum(axis=1).mean() < 0


def test_every_kind_is_drawn_where_a_shape_has_fewer_samples_than_kinds():
    drawn = {defect_kind(ALL_DEFECT_TYPES, 6, s, i) for s in range(3) for i in range(6)}
    assert drawn == set(ALL_DEFECT_TYPES)
    # six kinds, six samples per shape: every shape gets each once, in order (recipes before it)
    assert [defect_kind(DEFECT_TYPES, 6, 5, i) for i in range(6)] == list(DEFECT_TYPES)
    assert [defect_kind(DEFECT_TYPES, 10, 3, i) for i in range(10)] == [DEFECT_TYPES[i % 6] for i in range(10)]


def test_hole_removes_material_and_labels_its_rim(bunny_cloud):
    shape, points, normals = bunny_cloud
    d = apply_defect(points, normals, "hole", np.random.default_rng(5), SMALL, size=shape.size)
    removed = ~d.keep
    assert removed.sum() > 0
    np.testing.assert_array_equal(d.points, points)  # nothing moves, material goes
    rim = (d.labels == 1) & d.keep
    assert rim.sum() == d.labels.sum() > 0
    # every rim point is next to the hole; unlabelled kept points are farther than every rim point
    dist_to_hole = cKDTree(points[removed]).query(points[d.keep])[0]
    rim_dist = cKDTree(points[removed]).query(points[rim])[0]
    assert rim_dist.max() < dist_to_hole[d.labels[d.keep] == 0].min() + 1e-9
    assert rim_dist.max() < 4 * d.params["rim"] * shape.size


def test_broken_piece_adds_a_labelled_fracture_face(bunny_cloud):
    shape, points, normals = bunny_cloud
    d = apply_defect(points, normals, "broken", np.random.default_rng(11), SMALL, size=shape.size)
    n_orig = len(points)
    new_rows = d.points[n_orig:]
    assert len(new_rows) == d.params["face_points"] > 0
    assert (d.labels[n_orig:] == 1).all()
    assert (~d.keep[:n_orig]).sum() > 0  # a piece is gone
    np.testing.assert_array_equal(d.points[:n_orig], points)


def test_label_share_in_range_over_seeds_and_types(shapes):
    lo, hi = SMALL.frac_range
    for name, shape in shapes.items():
        for kind in ALL_DEFECT_TYPES:
            for seed in (0, 1):
                s = make_anomalous(shape, seed, SMALL, kind)
                assert s.points.shape == (SMALL.num_points, 3) and s.points.dtype == np.float32
                assert s.labels.dtype == np.int64 and s.object_label == 1 and s.defect == kind
                assert lo <= s.anomalous_fraction <= hi, (name, kind, seed, s.anomalous_fraction)


def test_normal_samples_are_clean_and_on_the_surface(shapes):
    shape = shapes["hex_nut"]
    cfg = SynthConfig(num_points=1024, noise=0.0, pose_deg=0.0, pose_shift=0.0)
    s = make_normal(shape, 4, cfg)
    assert s.object_label == 0 and s.labels.sum() == 0 and s.defect is None
    # without pose/noise the points lie on the mesh: each is near a dense surface sample
    dense, _ = shape.sample(200_000, np.random.default_rng(0))
    gap = cKDTree(dense).query(s.points)[0]
    assert np.median(gap) < 0.01 * shape.size


def test_partial_scans_see_one_side(shapes):
    shape = shapes["stanford_bunny"]
    full = make_normal(shape, 2, SynthConfig(num_points=1024, pose_deg=0, pose_shift=0, noise=0))
    part = make_normal(shape, 2, SynthConfig(num_points=1024, pose_deg=0, pose_shift=0, noise=0, partial_prob=1.0))
    assert part.params["partial"] and not full.params["partial"]
    # the partial scan covers less of the surface: many full-scan points have no partial point nearby
    gap = cKDTree(part.points).query(full.points)[0]
    spacing = np.median(cKDTree(full.points).query(full.points, k=2)[0][:, 1])
    assert (gap > 4 * spacing).mean() > 0.2


def test_deterministic_by_seed(shapes):
    shape = shapes["fandisk"]
    a, b = make_anomalous(shape, 9, SMALL), make_anomalous(shape, 9, SMALL)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    c = make_anomalous(shape, 10, SMALL, a.defect)
    assert not np.array_equal(a.points, c.points)


def test_unknown_defect_is_a_clear_error(shapes):
    with pytest.raises(SynthError, match="unknown defect"):
        make_anomalous(shapes["hex_nut"], 0, SMALL, "scratchy")


@pytest.mark.parametrize("layout,gt_dir,normal_mark", [("anomaly-shapenet", "GT", "positive"), ("real3d", "gt", "good")])
def test_written_dataset_reads_back_with_btp_io(shapes_root, tmp_path, layout, gt_dir, normal_mark):
    plan = SynthPlan(per_class_train=1, per_class_test_good=1, per_class_test_bad=2, seed=3, layout=layout)
    cfg = SynthConfig(num_points=512)
    write_dataset(shapes_root, tmp_path, ["hex_nut", "spot"], plan, cfg)
    assert detect_layout(tmp_path) == layout
    assert (tmp_path / "spot" / gt_dir).is_dir()
    test = list(iter_samples(tmp_path, layout))
    assert [s.object_label for s in test].count(1) == 4 and len(test) == 6
    for s in test:
        assert (normal_mark in s.path.name) == (s.object_label == 0)
        assert s.points.shape == (512, 3)
        assert (s.labels.sum() > 0) == bool(s.object_label)
    # the GT rows are the scan's points with the generator's labels
    spot_bulge = next(s for s in test if s.cls == "spot" and "bulge" in s.path.name)
    again = make_anomalous(load_shape(list_shapes(shapes_root)["spot"], "spot"),
                           sample_seed(3, "spot", "bad", 0), cfg, "bulge")
    np.testing.assert_array_equal(spot_bulge.labels, again.labels)
    np.testing.assert_allclose(spot_bulge.points, again.points, atol=2e-6)
    train = list(iter_samples(tmp_path, layout, split="train"))
    assert len(train) == 2 and all(s.labels.sum() == 0 for s in train)


def test_same_seed_writes_identical_files(shapes_root, tmp_path):
    plan = SynthPlan(per_class_train=0, per_class_test_good=1, per_class_test_bad=1, seed=5)
    cfg = SynthConfig(num_points=256)
    write_dataset(shapes_root, tmp_path / "a", ["hex_nut"], plan, cfg)
    write_dataset(shapes_root, tmp_path / "b", ["hex_nut"], plan, cfg)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*") if p.suffix != ".json")
    assert len(files) == 3
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_cli_synth_writes_real3d_layout(shapes_root, tmp_path):
    from btp.cli import app

    result = CliRunner().invoke(app, ["data", "synth", "--shapes", str(shapes_root), "--out", str(tmp_path),
                                      "--classes", "hex_nut", "--per-class-train", "1", "--per-class-test-good", "1",
                                      "--per-class-test-bad", "1", "--points", "256", "--layout", "real3d"])
    assert result.exit_code == 0, result.output
    assert detect_layout(tmp_path) == "real3d"
    assert len(list((tmp_path / "hex_nut" / "gt").glob("*.txt"))) == 1
    bad = CliRunner().invoke(app, ["data", "synth", "--shapes", str(shapes_root), "--out", str(tmp_path / "x"),
                                   "--classes", "no_such_mesh"])
    assert bad.exit_code == 2 and "no_such_mesh" in bad.output


def test_cli_synth_split_keeps_only_that_side_of_the_zero_shot_split(shapes_root, tmp_path):
    from btp.cli import app
    from btp.train.split import zero_shot_split

    split = zero_shot_split(shapes_root)
    assert "fandisk" in split.names("heldout") and "hex_nut" in split.names("train")
    result = CliRunner().invoke(app, ["data", "synth", "--shapes", str(shapes_root), "--out", str(tmp_path),
                                      "--classes", "fandisk,hex_nut", "--split", "heldout", "--per-class-train", "0",
                                      "--per-class-test-good", "1", "--per-class-test-bad", "0", "--points", "256"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["fandisk"]
