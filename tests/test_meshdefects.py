"""btp.eval.meshdefects, the evaluation-only defect maker: labels exactly where the geometry
changed, deterministic by seed, and never reachable from the training side."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from btp.eval.meshdefects import MESH_DEFECT_TYPES, MeshDefectConfig, make_mesh_sample, write_mesh_defect_dataset
from btp.io import load_mesh, read_point_cloud

CFG = MeshDefectConfig(noise=0.0)


@pytest.fixture(scope="module")
def part(shapes_root):
    """A real mesh (fandisk) with a small second component beside it (a 'pin': a scaled-down bunny)."""
    v, f = load_mesh(shapes_root / "common3d__fandisk.ply")
    pv, pf = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    size = np.linalg.norm(np.ptp(v, axis=0))
    pv = (pv - pv.mean(0)) / np.linalg.norm(np.ptp(pv, axis=0)) * 0.12 * size + v[np.argmax(v[:, 2])]
    pv[:, 2] += v[:, 2].max() - 0.01 * size - pv[:, 2].min()  # standing on the top, like a pin
    return np.concatenate([v, pv]), np.concatenate([f, pf + len(v)]), size, float(v[:, 2].max())


def _dense(v, f, n=200_000):
    from btp.io import sample_surface

    return cKDTree(sample_surface(v, f, n, seed=9)[0])


def test_normal_samples_lie_on_the_surface_and_are_deterministic(part):
    v, f, size, _ = part
    a, b = make_mesh_sample(v, f, 5, None, CFG), make_mesh_sample(v, f, 5, None, CFG)
    np.testing.assert_array_equal(a.points, b.points)
    assert a.object_label == 0 and a.labels.sum() == 0
    assert _dense(v, f).query(a.points)[0].max() < 0.01 * size


def test_extra_material_labels_the_points_off_the_original_surface(part):
    v, f, size, _ = part
    s = make_mesh_sample(v, f, 3, "extra_material", CFG)
    d = _dense(v, f).query(s.points)[0]
    assert s.object_label == 1 and 0.002 <= s.labels.mean() <= 0.25
    # anomalous: off the surface (the maker measures on a dense sample: up to its spacing closer)
    assert (d[s.labels == 1] > CFG.label_threshold * size * 0.6).all()
    assert np.median(d[s.labels == 0]) < 0.002 * size  # the rest: on it


def test_bend_labels_the_moved_points_only(part):
    v, f, size, _ = part
    s = make_mesh_sample(v, f, 4, "bend", CFG)
    d = _dense(v, f).query(s.points)[0]
    assert s.labels.any() and (d[s.labels == 0] < CFG.label_threshold * size + 0.003 * size).mean() > 0.99
    bad = s.points[s.labels == 1]
    assert np.linalg.norm(bad - bad.mean(0), axis=1).max() < 0.35 * size  # one local region


def test_missing_part_removes_the_small_component(part):
    v, f, size, top = part
    s = make_mesh_sample(v, f, 2, "missing_part", CFG)
    assert s.params["how"] == "component" and s.labels.any()
    normal = make_mesh_sample(v, f, 2, None, CFG)
    # the pin sits at the top: the defective scan has (almost) no points up there, the normal one does
    assert (normal.points[:, 2] > top + 0.02 * size).sum() > 50
    assert (s.points[:, 2] > top + 0.02 * size).sum() == 0


def test_every_kind_fits_a_single_solid(shapes_root):
    v, f = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    for kind in MESH_DEFECT_TYPES:
        s = make_mesh_sample(v, f, 1, kind, CFG)
        assert s.defect == kind and 0.002 <= s.labels.mean() <= 0.25


def test_writes_a_public_layout(shapes_root, tmp_path):
    out = tmp_path / "mesh"
    summary = write_mesh_defect_dataset(shapes_root, out, ["stanford_bunny"], per_class_good=1, per_class_bad=3,
                                        log=lambda *_: None)
    files = sorted(p.name for p in (out / "stanford_bunny" / "test").iterdir())
    assert len(files) == 4 and sum("positive" in n for n in files) == 1
    gt = sorted((out / "stanford_bunny" / "GT").iterdir())
    assert len(gt) == 3
    rows = np.loadtxt(gt[0])
    cloud = read_point_cloud(out / "stanford_bunny" / "test" / (gt[0].stem + ".pcd"))
    np.testing.assert_allclose(rows[:, :3], cloud.points, atol=1e-5)
    assert set(np.unique(rows[:, 3])) == {0.0, 1.0}
    assert set(summary["classes"]["stanford_bunny"]) == {Path(n).stem for n in files if "positive" not in n}


def test_the_training_side_never_imports_it():
    root = Path(__file__).resolve().parents[1] / "btp" / "train"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any("meshdefects" in n for n in names), path


def test_partial_scans_see_one_side_and_keep_the_defect_in_view(part):
    """cfg.partial: what one camera sees - fewer points than a full scan, on one side of the
    part (the hidden side is empty), deterministic by seed, the defect in view and labelled."""
    from dataclasses import replace

    v, f, size, _ = part
    cfg = replace(CFG, partial=True, num_points=4096)
    full = make_mesh_sample(v, f, 5, None, replace(cfg, partial=False, num_points=3 * 4096))
    good, again = make_mesh_sample(v, f, 5, None, cfg), make_mesh_sample(v, f, 5, None, cfg)
    np.testing.assert_array_equal(good.points, again.points)
    assert 256 <= len(good.points) <= 4096 and good.labels.sum() == 0
    view = np.asarray(good.params["partial_view"])
    # the points facing away from the camera are gone: the far half along the view is thinner
    depth_full = (full.points - full.points.mean(0)) @ view
    depth_seen = (good.points - full.points.mean(0)) @ view
    assert (depth_seen < np.quantile(depth_full, 0.1)).mean() < 0.05
    bad = make_mesh_sample(v, f, 3, "extra_material", cfg)
    assert bad.object_label == 1 and 0.002 <= bad.labels.mean() <= 0.25 and len(bad.points) <= 4096
