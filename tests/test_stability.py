"""The canonical sampling order (preprocess.sampling_order = "canonical"): the same point set in
any row order gives the same samples and scores; a dropped point changes little."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from btp.config import tiny_config
from btp.geometry.prepare import prepare
from btp.geometry.sampling import canonical_order, point_hash, voxel_map
from runtime_helpers import BUNNY, PINION, real_scan, tiny_export


def _cfg(order: str, num_points: int = 512):
    cfg = tiny_config()
    cfg.preprocess.num_points = num_points
    cfg.preprocess.sampling_order = order
    return cfg.validate()


@pytest.mark.parametrize("method,m", [("auto", 20000), ("exact", 3000), ("bucket", 20000), ("auto", 400)])
def test_canonical_prepare_depends_on_the_point_set_only(shapes_root, method, m):
    raw = real_scan(shapes_root, n=m, seed=3)
    perm = np.random.default_rng(0).permutation(m)
    for order, same in (("canonical", True), ("input", False)):
        cfg = _cfg(order)
        a, b = prepare(raw, cfg, method), prepare(raw[perm], cfg, method)
        assert np.array_equal(raw[a.sample_idx], raw[perm][b.sample_idx]) is same, order
        assert np.array_equal(a.neighborhood, b.neighborhood) is same, order


def test_canonical_order_sorts_by_value(shapes_root):
    raw = real_scan(shapes_root, n=5000, seed=1)
    raw[10] = raw[20]  # equal points are interchangeable
    order = canonical_order(raw)
    s = raw[order]
    assert sorted(order.tolist()) == list(range(len(raw)))
    keys = [tuple(p) for p in s.tolist()]
    assert keys == sorted(keys)
    assert point_hash(raw[[10]])[0] == point_hash(raw[[20]])[0]


def test_canonical_voxel_map_moves_little_when_a_point_is_dropped(shapes_root):
    raw = real_scan(shapes_root, n=50000, seed=2)
    base = voxel_map(raw, 6000, canonical=True)
    changed = []
    for drop in np.random.default_rng(1).choice(len(raw), 5, replace=False):
        kept = np.delete(raw, drop, axis=0)
        other = voxel_map(kept, 6000, canonical=True)
        a = {tuple(p) for p in raw[base.cell_rep].tolist()}
        b = {tuple(p) for p in kept[other.cell_rep].tolist()}
        changed.append(len(a ^ b))
    # the dropped point can be the representative of its cell: that cell's representative
    # changes (2 entries of the symmetric difference); nothing else moves
    assert max(changed) <= 2, changed
    # the row-order rule re-sizes its grid from every k-th row: a drop shifts that subsample
    plain = {tuple(p) for p in raw[voxel_map(raw, 6000).cell_rep].tolist()}
    kept = np.delete(raw, 0, axis=0)
    assert len(plain ^ {tuple(p) for p in kept[voxel_map(kept, 6000).cell_rep].tolist()}) > 2


def test_anchored_bucket_fps_starts_farthest_from_the_centroid_and_turns_with_the_part(shapes_root, monkeypatch):
    """The canonical rule's bucket FPS starts at the point farthest from the centroid, not at a
    point that fpsample's tree picks: the part turned gives the same samples, and dropping points
    (not that one) never moves the first sample. The bucket FPS does it, not the exact rule it
    falls back on."""
    from scipy.spatial.transform import Rotation

    from btp.geometry import sampling
    from btp.geometry.sampling import _fpsample, bucket_fps, voxel_downsample

    if _fpsample() is None:
        pytest.skip("fpsample >= 1.0 is not installed: the voxel rule runs the exact FPS")

    def no_fallback(*args, **kwargs):
        raise AssertionError("the anchored bucket FPS fell back to the exact rule")

    monkeypatch.setattr(sampling, "fps", no_fallback)
    raw = real_scan(shapes_root, "cgal__pinion.ply", n=8192, seed=6)
    center = raw.mean(0, dtype=np.float64)
    far = int(np.argmax(((raw - center) ** 2).sum(1)))
    picked = bucket_fps(raw, 1024, 5, anchor="centroid")
    assert picked[0] == far and len(set(picked.tolist())) == 1024 and picked.min() >= 0
    assert picked.max() < len(raw)
    # a turn of the part about its centroid (and a shift): the same rows are sampled, in the same
    # order but for a few float32 near-ties of FPS distances
    for degrees in (30.0, 90.0, 170.0):
        turn = Rotation.from_rotvec(np.deg2rad(degrees) * np.array([0.6, -0.48, 0.64])).as_matrix()  # a unit axis
        turned = ((raw - center) @ turn.T + center + 5.0).astype(np.float32)
        got = bucket_fps(turned, 1024, 5, anchor="centroid")
        assert set(got.tolist()) == set(picked.tolist()) and (got == picked).mean() >= 0.99, degrees
    monkeypatch.undo()
    # fewer distinct points than samples: still n samples (the exact rule), every row a real one
    few = np.repeat(raw[:5], 40, axis=0)
    got = bucket_fps(few, 50, 3, anchor="centroid")
    assert len(got) == 50 and got.min() >= 0 and got.max() < len(few)
    base, _ = voxel_downsample(raw, 4096, canonical=True)
    rng = np.random.default_rng(0)
    for _ in range(8):
        drop = rng.choice(len(raw), 8, replace=False)
        kept = np.delete(raw, drop, axis=0)
        got, _ = voxel_downsample(kept, 4096, canonical=True)
        if base[0] not in drop:
            assert np.array_equal(kept[got[0]], raw[base[0]])


@pytest.mark.parametrize("method,m", [("exact", 3000), ("auto", 400), ("auto", 512)])
def test_canonical_exact_rule_and_small_scans_turn_with_the_part(shapes_root, method, m):
    """In the canonical order the exact rule (btp eval, the CUDA chain) starts at the point farthest
    from the centroid, and a scan of M <= N points puts it first, where the patch centers' FPS
    starts: the part turned about any axis gives the same samples and the same patch centers
    (from the first row sorted by x: other ones)."""
    from scipy.spatial.transform import Rotation

    from btp.geometry.sampling import anchored_order

    raw = real_scan(shapes_root, "cgal__pinion.ply", n=m, seed=8)
    center = raw.mean(0, dtype=np.float64)
    cfg = _cfg("canonical")
    a = prepare(raw, cfg, method)
    far = int(np.argmax(((raw - center) ** 2).sum(1)))
    assert anchored_order(raw)[0] == far and a.sample_idx[a.center_idx[0]] == far
    for degrees, axis in ((7.0, (0.6, -0.48, 0.64)), (90.0, (0.0, 0.0, 1.0)), (150.0, (0.48, 0.8, 0.36))):
        turn = Rotation.from_rotvec(np.deg2rad(degrees) * np.array(axis)).as_matrix()
        b = prepare(((raw - center) @ turn.T + center + 3.0).astype(np.float32), cfg, method)
        assert set(a.sample_idx.tolist()) == set(b.sample_idx.tolist()), degrees
        same = a.sample_idx[a.center_idx] == b.sample_idx[b.center_idx]
        assert same.mean() >= 0.98, (degrees, same.mean())  # float32 near-ties of FPS distances


def test_pipeline_scores_follow_the_rows_in_canonical_order(shapes_root, tmp_path_factory):
    from btp.runtime.pipeline import Pipeline

    path, _ = tiny_export(tmp_path_factory)
    pipe = Pipeline(path)
    pipe.cfg = copy.deepcopy(pipe.cfg)
    pipe.cfg.preprocess.sampling_order = "canonical"
    for m in (20000, 300):  # downsampled; every point scored (M <= N)
        raw = real_scan(shapes_root, n=m, seed=4)
        perm = np.random.default_rng(5).permutation(m)
        a, b = pipe(raw), pipe(raw[perm])
        assert a.object_score == b.object_score
        assert np.array_equal(b.point_scores, a.point_scores[perm])
        assert np.array_equal(raw[a.sampled_idx], raw[perm][b.sampled_idx])


@pytest.fixture(scope="module")
def default_pipe(tmp_path_factory):
    """A Pipeline on the shipped default's weights, exported here."""
    pytest.importorskip("torch", reason="exports the default model")
    from btp.config import DEFAULT_MODEL_NAME
    from btp.export.onnx import export_onnx, load_model
    from btp.runtime.pipeline import Pipeline

    path = tmp_path_factory.mktemp("default") / "model.onnx"
    export_onnx(load_model(DEFAULT_MODEL_NAME), path)
    pipe = Pipeline(path)
    assert pipe.cfg.preprocess.sampling_order == "canonical"
    return pipe


def test_the_default_model_scores_the_same_scan_the_same(shapes_root, default_pipe):
    """The shipped default: its rows permuted give the same object score, and one point dropped
    moves it by at most ``DROP_BOUND`` (README, "The default model")."""
    # the pinion: without the anchored bucket FPS, 3 of these 8 drops move its score by 0.006-0.011
    raw = real_scan(shapes_root, "cgal__pinion.ply", n=8192, seed=6)
    rng = np.random.default_rng(7)
    base = default_pipe(raw).object_score
    assert default_pipe(raw[rng.permutation(len(raw))]).object_score == base
    dropped = [default_pipe(np.delete(raw, i, axis=0)).object_score for i in rng.choice(len(raw), 8, replace=False)]
    assert max(abs(d - base) for d in dropped) <= DROP_BOUND, (base, dropped)


def test_the_default_model_scores_a_turned_scan_the_same(shapes_root, default_pipe):
    """The part turned by 5-10 degrees about its centroid moves the default's score by at most
    ``POSE_BOUND``: the samples of a scan of up to 8N points turn with it, and the model reads each
    patch in its own frame (with the start at the box's corner: moves of up to 0.024)."""
    from scipy.spatial.transform import Rotation

    from btp.geometry.sampling import _fpsample

    if _fpsample() is None:
        pytest.skip("fpsample >= 1.0 is not installed (no aarch64 wheel): scans of up to 8N points take the "
                    "voxel rule, whose grid is in the file's axes")
    raw = real_scan(shapes_root, "cgal__pinion.ply", n=8192, seed=6)
    base = default_pipe(raw).object_score
    center = raw.mean(0, dtype=np.float64)
    rng = np.random.default_rng(7)
    turned = []
    for _ in range(4):
        axis = rng.normal(size=3)
        turn = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.deg2rad(rng.uniform(5, 10))).as_matrix()
        turned.append(default_pipe(((raw - center) @ turn.T + center).astype(np.float32)).object_score)
    assert max(abs(t - base) for t in turned) <= POSE_BOUND, (base, turned)


def test_stability_variants_hold_the_same_points_or_the_part_turned_a_little(shapes_root):
    from btp.benchmarks.stability import variants

    raw = real_scan(shapes_root, n=2000, seed=8)
    out = variants(raw, 3, 2, 0.01, np.random.default_rng(0), poses=4, pose_deg=10.0)
    assert len(out) == 1 + 3 + 2 + 4 and out[0] is raw
    rows = {tuple(p) for p in raw.tolist()}
    for perm in out[1:4]:
        assert len(perm) == len(raw) and {tuple(p) for p in perm.tolist()} == rows
    for drop in out[4:6]:
        assert len(drop) == len(raw) - 20 and {tuple(p) for p in drop.tolist()} <= rows
    center = raw.mean(0, dtype=np.float64)
    angles = []
    for pose in out[6:]:
        assert pose.dtype == raw.dtype and pose.shape == raw.shape
        # a rigid turn about the centroid: distances to it and between rows kept, by at most 10 degrees
        np.testing.assert_allclose(np.linalg.norm(pose - center, axis=1), np.linalg.norm(raw - center, axis=1),
                                   rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.linalg.norm(pose[1:] - pose[:-1], axis=1),
                                   np.linalg.norm(raw[1:] - raw[:-1], axis=1), rtol=1e-4, atol=1e-4)
        a, b = raw - center, pose - center
        u, _, vt = np.linalg.svd(a.T @ b)
        turn = (u @ vt).T
        angles.append(np.degrees(np.arccos(np.clip((np.trace(turn) - 1) / 2, -1, 1))))
    assert 0 < min(angles) and max(angles) <= 10.0 + 1e-3
    # the row orders and drops are drawn before the poses: adding poses does not change them
    plain = variants(raw, 3, 2, 0.01, np.random.default_rng(0))
    assert len(plain) == 6 and all(np.array_equal(x, y) for x, y in zip(plain, out[:6]))


def test_stability_report_on_real_scans(shapes_root, tmp_path_factory):
    """`btp-bench stability`'s measure: in canonical order the row orders give the same samples (the
    scores of one batched call agree to float noise); drops and poses are reported per scan and
    summarised, in the JSON and the table."""
    from btp.benchmarks.stability import run_stability, stability_markdown, test_scans
    from btp.io import write_point_cloud

    path, _ = tiny_export(tmp_path_factory)
    root = tmp_path_factory.mktemp("sets")
    for i, name in enumerate((PINION, BUNNY)):
        folder = root / f"part{i}" / "test"
        folder.mkdir(parents=True)
        write_point_cloud(folder / "good_0.pcd", real_scan(shapes_root, name, n=3000, seed=i))
    files = test_scans([root])
    assert [f.parent.parent.name for f in files] == ["part0", "part1"]
    data = run_stability(path, files, orders=("canonical",), permutations=3, drops=3, poses=3, timing_scans=1,
                         timing_turns=1)
    for row in data["scans"]:
        got = row["canonical"]
        assert got["perm_std"] < 1e-6
        assert got["drop_std"] >= 0.0 and got["pose_std"] > 0.0  # an untrained model still sees the pose
    summary = data["summary"]["canonical"]
    assert summary["pose_std"]["max"] == max(r["canonical"]["pose_std"] for r in data["scans"])
    table = stability_markdown(data)
    assert "pose std median" in table and "3 poses" in table
    none = run_stability(path, files[:1], orders=("canonical",), permutations=2, drops=2, poses=0, timing_scans=1,
                         timing_turns=1)
    assert none["scans"][0]["canonical"]["pose_std"] is None and "pose_std" not in none["summary"]["canonical"]
    assert "pose std" not in stability_markdown(none)


DROP_BOUND = 0.003  # the goal of models/btp-geo-4k.md, "Stability" (std <= 0.003 on every scan)
POSE_BOUND = 0.001  # the same card: a scan of up to 8N points turned moves it by float noise only
