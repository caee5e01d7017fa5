"""The object score's self-similarity term (btp.geometry.features.self_similarity): a point scores
high where its local geometry occurs nowhere else on the part."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from btp.config import ScoringConfig, tiny_config
from btp.geometry.errors import GeometryError
from btp.geometry.features import self_similarity
from btp.geometry.scores import object_score, point_map, selfsim_score
from runtime_helpers import BUNNY, PINION, real_scan


def test_self_similarity_ignores_scale_position_and_row_order(shapes_root):
    pts = real_scan(shapes_root, BUNNY, n=2048, seed=1).astype(np.float64)
    base = self_similarity(pts)
    perm = np.random.default_rng(0).permutation(len(pts))
    again = self_similarity(pts[perm] * 37.0 + np.array([5.0, -2.0, 100.0]))
    assert np.allclose(again, base[perm], rtol=1e-4, atol=1e-4)
    assert np.std(base) > 0.1  # not a constant


def test_a_turn_hardly_moves_the_statistic(shapes_root):
    """The exclusion radius follows the axis-aligned box (a turn changes its diagonal): single
    points move, the top quarter's mean by well under 1 %."""
    pts = real_scan(shapes_root, BUNNY, n=2048, seed=1).astype(np.float64)
    scoring = ScoringConfig(selfsim_weight=1.0)
    base = selfsim_score(pts, scoring)
    for rotvec in ([0.3, -1.1, 0.7], [0.0, 0.0, 0.15], [1.2, 0.4, 0.0]):
        turned = pts @ Rotation.from_rotvec(rotvec).as_matrix().T
        assert selfsim_score(turned, scoring) == pytest.approx(base, rel=5e-3), rotvec


def test_a_twin_elsewhere_makes_every_point_look_normal(shapes_root):
    """The same part twice, side by side: each point finds its twin beyond the exclusion radius,
    so nothing is unusual; one part alone has points with no twin."""
    one = real_scan(shapes_root, PINION, n=1500, seed=2).astype(np.float64)
    size = float(np.linalg.norm(one.max(0) - one.min(0)))
    two = np.concatenate([one, one + np.array([3 * size, 0.0, 0.0])])
    alone, twins = self_similarity(one, k=1), self_similarity(two, k=1)
    assert np.median(alone) > 0.1
    assert twins.max() < 1e-2 * np.median(alone)


def test_it_is_high_on_cracks_and_holes(shapes_root):
    """Sharp synthetic defects on real parts: their points are farther from the rest of the part
    in feature space than the part's own points are (not so for every kind: a smooth bulge or a
    broken-off end can look like geometry the part has elsewhere)."""
    from btp.train.synth import SynthConfig, load_shape, make_anomalous

    cfg = SynthConfig(num_points=4096, noise=0.0)
    for name in (PINION, BUNNY):
        shape = load_shape(shapes_root / name)
        for seed, kind in ((1, "crack"), (5, "hole")):
            sample = make_anomalous(shape, seed=seed, cfg=cfg, defect=kind)
            s = self_similarity(sample.points)
            bad = sample.labels.astype(bool)
            assert s[bad].mean() > 1.15 * s[~bad].mean(), (name, kind, s[bad].mean(), s[~bad].mean())


def test_the_object_score_adds_the_term(shapes_root):
    pts = real_scan(shapes_root, BUNNY, n=1024, seed=4)
    sampled = np.random.default_rng(0).random(len(pts)).astype(np.float32)
    plain = ScoringConfig(object_source="pooled-points", top_ratio=1.0, object_alpha=0.5)
    with_term = ScoringConfig(object_source="pooled-points", top_ratio=1.0, object_alpha=0.5,
                              selfsim_weight=0.25, selfsim_offset=4.0)
    base = object_score(plain, 0.0, 0.3, sampled)
    assert base == pytest.approx(0.5 * 0.3 + 0.5 * sampled.mean())
    stat = selfsim_score(pts, with_term)
    top = np.sort(self_similarity(pts))[-256:].mean()
    assert stat == pytest.approx(top, rel=1e-6)
    assert object_score(with_term, 0.0, 0.3, sampled, points=pts) == pytest.approx(base + 0.25 * (stat - 4.0))
    with pytest.raises(GeometryError, match="sampled points"):
        object_score(with_term, 0.0, 0.3, sampled)


def test_the_config_checks_the_term():
    cfg = tiny_config()
    cfg.scoring.selfsim_weight = -0.1
    with pytest.raises(ValueError, match="selfsim"):
        cfg.validate()
    cfg.scoring.selfsim_weight, cfg.scoring.selfsim_top = 0.2, 0.0
    with pytest.raises(ValueError, match="selfsim"):
        cfg.validate()
    cfg.scoring.selfsim_top = 0.25
    for weight, centre in ((-0.1, 2.0), (float("nan"), 2.0), (0.1, float("inf"))):
        cfg.scoring.selfsim_point_weight, cfg.scoring.selfsim_point_center = weight, centre
        with pytest.raises(ValueError, match="point weight"):
            cfg.validate()


def test_the_point_map_moves_with_the_part_against_itself(shapes_root):
    """clip(map + weight x (distance - centre), 0, 1): down where the geometry is ordinary for the
    part, up where it has it nowhere else, unchanged at the centre; weight 0 = the model's map."""
    pts = real_scan(shapes_root, BUNNY, n=1024, seed=4)
    s = self_similarity(pts)
    model = np.random.default_rng(1).random(len(pts)).astype(np.float32)
    assert np.array_equal(point_map(model, None, ScoringConfig()), model)
    scoring = ScoringConfig(selfsim_point_weight=0.2, selfsim_point_center=float(np.median(s)))
    shown = point_map(model, s, scoring)
    assert shown.dtype == np.float32 and shown.min() >= 0.0 and shown.max() <= 1.0
    expected = np.clip(model + 0.2 * (s.astype(np.float64) - np.median(s)), 0, 1)
    np.testing.assert_allclose(shown, expected, atol=1e-6)
    ordinary, unusual = s < np.median(s), s > np.median(s)
    assert (shown[ordinary] <= model[ordinary] + 1e-7).all() and (shown[unusual] >= model[unusual] - 1e-7).all()
    assert (shown[ordinary] < model[ordinary]).any() and (shown[unusual] > model[unusual]).any()
    with pytest.raises(GeometryError, match="selfsim_map"):
        point_map(model, None, scoring)
    with pytest.raises(GeometryError, match="must match"):
        point_map(model, s[:-1], scoring)


def test_the_smoothed_point_map_is_the_mean_over_neighbours(shapes_root):
    """selfsim_point_smooth = k: the clipped map averaged over each point's k nearest sampled points
    (itself included), the same whatever the rows' order."""
    from scipy.spatial import cKDTree

    pts = real_scan(shapes_root, PINION, n=1024, seed=5)
    s = self_similarity(pts)
    model = np.random.default_rng(2).random(len(pts)).astype(np.float32)
    plain = ScoringConfig(selfsim_point_weight=0.15, selfsim_point_center=2.45)
    smooth = ScoringConfig(selfsim_point_weight=0.15, selfsim_point_center=2.45, selfsim_point_smooth=16)
    clipped = point_map(model, s, plain)
    _, idx = cKDTree(pts.astype(np.float64)).query(pts.astype(np.float64), k=16)
    shown = point_map(model, s, smooth, pts)
    np.testing.assert_allclose(shown, clipped[idx].mean(axis=1), atol=1e-6)
    assert shown.std() < clipped.std()  # smoother
    perm = np.random.default_rng(3).permutation(len(pts))
    np.testing.assert_allclose(point_map(model[perm], s[perm], smooth, pts[perm]), shown[perm], atol=1e-6)
    with pytest.raises(GeometryError, match="sampled points"):
        point_map(model, s, smooth)
    cfg = tiny_config()
    cfg.scoring.selfsim_point_smooth = -1
    with pytest.raises(ValueError, match="point smooth"):
        cfg.validate()


def _tiny_model_with(tmp_path, name: str, **scoring):
    """A fresh tiny model (torch seed 0, the pooled-points object rule) with these scoring settings,
    exported: (LoadedModel, a Pipeline of the file on the exact rule)."""
    from btp.export.onnx import export_onnx, fresh_model
    from btp.runtime.pipeline import Pipeline

    cfg = tiny_config()
    cfg.scoring.object_source, cfg.scoring.top_ratio = "pooled-points", 1.0
    for key, value in scoring.items():
        setattr(cfg.scoring, key, value)
    loaded = fresh_model(cfg.validate(), seed=0)
    return loaded, Pipeline(export_onnx(loaded, tmp_path / f"{name}.onnx").path, downsample="exact", threads=1)


def test_every_path_reads_the_term_from_the_model_file(shapes_root, tmp_path):
    """A model whose config has the term: btp-run's Pipeline and btp eval's PyTorch path give the
    same object score, and it is the score without the term plus weight x (statistic - offset)."""
    pytest.importorskip("torch", reason="exports a model with the term")
    from btp.eval.scoring import score_cloud_torch

    raw = real_scan(shapes_root, PINION, n=1500, seed=3)
    scores = {}
    for weight in (0.0, 0.3):
        loaded, pipe = _tiny_model_with(tmp_path, f"w{weight}", selfsim_weight=weight, selfsim_offset=4.0)
        assert pipe.cfg.scoring.selfsim_weight == weight  # travels in the metadata
        run = pipe(raw)
        torch_path = score_cloud_torch(loaded.model, raw, method="exact")
        assert run.object_score == pytest.approx(torch_path.object_score, abs=1e-5)
        scores[weight] = (run.object_score, selfsim_score(raw[run.sampled_idx], pipe.cfg.scoring))
    (plain, _), (with_term, stat) = scores[0.0], scores[0.3]
    assert with_term == pytest.approx(plain + 0.3 * (stat - 4.0), abs=1e-5)


def test_every_path_shows_the_same_point_map(shapes_root, tmp_path):
    """A model whose config has the point term: btp-run's Pipeline and btp eval's PyTorch path show
    the same map, it is point_map of the same file's map without the term, the raw points carry it,
    and the object score still reads the model's own map."""
    pytest.importorskip("torch", reason="exports a model with the term")
    from btp.eval.scoring import score_cloud_torch

    raw = real_scan(shapes_root, PINION, n=6000, seed=3)
    runs = {}
    for weight in (0.0, 0.2):
        loaded, pipe = _tiny_model_with(tmp_path, f"p{weight}", selfsim_point_weight=weight, selfsim_point_center=3.0,
                                        selfsim_point_smooth=8)
        assert pipe.cfg.scoring.selfsim_point_weight == weight  # travels in the metadata
        runs[weight] = pipe(raw)
        torch_path = score_cloud_torch(loaded.model, raw, method="exact")
        np.testing.assert_allclose(torch_path.sampled_scores, runs[weight].sampled_scores, atol=1e-5)
        np.testing.assert_allclose(torch_path.point_scores, runs[weight].point_scores, atol=1e-5)
    plain, fused = runs[0.0], runs[0.2]
    np.testing.assert_array_equal(plain.sampled_idx, fused.sampled_idx)
    s = self_similarity(raw[fused.sampled_idx])
    expected = point_map(plain.sampled_scores, s, ScoringConfig(selfsim_point_weight=0.2, selfsim_point_center=3.0,
                                                                  selfsim_point_smooth=8), raw[fused.sampled_idx])
    np.testing.assert_allclose(fused.sampled_scores, expected, atol=1e-5)
    assert not np.allclose(fused.sampled_scores, plain.sampled_scores, atol=1e-3)
    np.testing.assert_array_equal(fused.point_scores[fused.sampled_idx], fused.sampled_scores)
    assert fused.object_score == pytest.approx(plain.object_score, abs=1e-6)
    assert "selfsim" in fused.timings and "selfsim" not in plain.timings


def test_btp_export_can_leave_the_term_out(shapes_root, tmp_path):
    """`btp-export --no-selfsim`: the default's weights with the map-mean rule alone - the file says
    so, and its object score is the default's minus the term."""
    pytest.importorskip("torch", reason="exports the default model")
    from typer.testing import CliRunner

    from btp.cli import app
    from btp.io.locations import packaged_model
    from btp.runtime.metadata import read_model_meta
    from btp.runtime.pipeline import Pipeline

    res = CliRunner().invoke(app, ["export", "--no-selfsim", "--out", str(tmp_path / "fast.onnx")])
    assert res.exit_code == 0, res.output
    scoring = read_model_meta(tmp_path / "fast.onnx").config.scoring
    assert scoring.selfsim_weight == 0.0 and scoring.selfsim_point_weight == 0.0
    if packaged_model() is None:
        pytest.skip("the package carries no exported default model (btp/assets/models/*.onnx)")
    raw = real_scan(shapes_root, PINION, n=8192, seed=6)
    full, fast = Pipeline(packaged_model(), threads=1), Pipeline(tmp_path / "fast.onnx", threads=1)
    assert full.cfg.scoring.selfsim_weight > 0
    a, b = full(raw), fast(raw)
    term = full.cfg.scoring.selfsim_weight * (selfsim_score(raw[a.sampled_idx], full.cfg.scoring)
                                              - full.cfg.scoring.selfsim_offset)
    assert b.object_score == pytest.approx(a.object_score - term, abs=1e-5)
    assert "selfsim" in a.timings and "selfsim" not in b.timings
    if full.cfg.scoring.selfsim_point_weight > 0:  # the map shown: the model's, moved by the point term
        np.testing.assert_allclose(a.sampled_scores, point_map(b.sampled_scores, self_similarity(raw[a.sampled_idx]),
                                                                full.cfg.scoring, raw[a.sampled_idx]), atol=1e-5)
    bad = CliRunner().invoke(app, ["export", "--format", "triton", "--no-selfsim", "--out", str(tmp_path / "repo")])
    assert bad.exit_code != 0 and "--selfsim" in " ".join(bad.output.split())
