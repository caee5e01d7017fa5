"""btp.runtime: Pipeline end to end on real scans, stages, batching, determinism, calibration, backends."""
from __future__ import annotations

import numpy as np
import pytest

from btp.io import PointCloud
from btp.io.errors import InvalidValuesError, TooFewPointsError
from btp.runtime import BackendError, Pipeline, make_backend
from btp.runtime.calibration import (
    CalibrationError,
    calibrate_threshold,
    find_threshold,
    make_threshold,
    read_threshold,
    sidecar_path,
    write_threshold,
)
from btp.runtime.metadata import ModelMetadataError, read_model_meta
from runtime_helpers import REAL_SHAPES, real_scan, tiny_export, tiny_torch_model

STAGES = ["load", "sanitize", "downsample", "normalize", "fps", "group", "engine", "propagate", "interpolate",
          "object_score"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def pipe(model_path):
    return Pipeline(model_path, backend="ort-cpu", threads=2)


@pytest.fixture(scope="module")
def scans(shapes_root):
    return [real_scan(shapes_root, name, 1500 + 500 * i, seed=i) for i, name in enumerate(REAL_SHAPES)]


def test_pipeline_matches_pytorch_end_to_end(pipe, tmp_path_factory, scans):
    """The torch-free pipeline == btp.eval's PyTorch path (same geometry, torch model) on real scans."""
    from btp.eval.scoring import score_cloud_torch

    loaded = tiny_torch_model(tmp_path_factory)
    for raw in scans:
        got = pipe(raw)
        ref = score_cloud_torch(loaded.model, raw)
        assert abs(got.object_score - ref.object_score) <= 1e-4
        np.testing.assert_array_equal(got.sampled_idx, ref.sampled_idx)
        assert np.abs(got.point_scores - ref.point_scores).max() <= 1e-4


def test_result_contract_raw_resolution_input_order(model_path, pipe, scans):
    raw = scans[1]  # 2000 points, N = 512
    res = pipe(raw)
    assert res.point_scores.shape == (len(raw),) and res.point_scores.dtype == np.float32
    assert res.patch_probs.shape == (32,) and np.all((res.patch_probs > 0) & (res.patch_probs < 1))
    assert list(res.timings) == STAGES and all(v >= 0 for v in res.timings.values())
    assert np.array_equal(res.points, raw)
    # nearest interpolation: every sampled raw point keeps its own score; others take a sampled one
    np.testing.assert_array_equal(res.point_scores[res.sampled_idx], res.sampled_scores)
    assert set(np.unique(res.point_scores)) <= set(np.unique(res.sampled_scores))
    # the exact rule: scores follow the points, not their position in the array (permuting the input
    # permutes the map; FPS starts at index 0, so keep point 0 in place). The voxel rule (auto) takes
    # each cell's lowest index as its representative, so input order may change its samples.
    exact = Pipeline(model_path, backend="ort-cpu", threads=2, downsample="exact")
    perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(len(raw) - 1)])
    ref, res_p = exact(raw), exact(raw[perm])
    assert abs(res_p.object_score - ref.object_score) <= 1e-5
    np.testing.assert_allclose(res_p.point_scores, ref.point_scores[perm], atol=1e-5)


def test_deterministic_across_runs_and_pipelines(model_path, pipe, scans):
    a = pipe(scans[0])
    b = pipe(scans[0])
    c = Pipeline(model_path, threads=2)(scans[0])
    for other in (b, c):
        assert other.object_score == a.object_score
        np.testing.assert_array_equal(other.point_scores, a.point_scores)
        np.testing.assert_array_equal(other.patch_probs, a.patch_probs)


def test_run_batch_equals_one_by_one(pipe, scans):
    single = [pipe(s) for s in scans]
    batched = pipe.run_batch(scans)
    chunked = pipe.run_batch(scans, batch_size=2)
    for s, b, c in zip(single, batched, chunked):
        assert abs(s.object_score - b.object_score) <= 1e-5 and abs(s.object_score - c.object_score) <= 1e-5
        np.testing.assert_allclose(b.point_scores, s.point_scores, atol=1e-5)
    assert batched[0].batch_size == 3 and chunked[2].batch_size == 1


def test_fixed_batch_model_pads(tmp_path_factory, pipe, scans):
    path, _ = tiny_export(tmp_path_factory, batch=2)
    fixed = Pipeline(path)
    assert fixed.meta.batch == 2
    results = fixed.run_batch(scans)  # 3 scans -> chunks of 2, the last padded
    for r, s in zip(results, scans):
        assert abs(r.object_score - pipe(s).object_score) <= 1e-5


def test_pointcloud_and_file_inputs(pipe, scans, tmp_path):
    from btp.io import write_point_cloud

    path = write_point_cloud(tmp_path / "scan.pcd", scans[0])
    from_file = pipe(path)
    from_cloud = pipe(PointCloud(scans[0]))
    assert from_file.path == path and from_file.object_score == from_cloud.object_score


def test_sparse_scan_uses_all_points_and_says_so(pipe, scans, tmp_path_factory):
    from btp.eval.scoring import score_cloud_torch

    raw = scans[0][:300]  # G = 32 <= 300 < N = 512
    res = pipe(raw)
    assert res.point_scores.shape == (300,)
    np.testing.assert_array_equal(res.sampled_idx, np.arange(300))  # used as it is, no FPS permutation
    np.testing.assert_array_equal(res.point_scores, res.sampled_scores)
    assert any("fewer than the model's N" in w for w in res.warnings)
    # same scores as btp.eval's torch path, which FPS-permutes the 300 points first
    ref = score_cloud_torch(tiny_torch_model(tmp_path_factory).model, raw)
    assert np.abs(ref.point_scores - res.point_scores).max() <= 1e-4
    assert abs(ref.object_score - res.object_score) <= 1e-4


def test_bad_arrays_are_refused_with_reasons(pipe, scans):
    nan = scans[0].copy()
    nan[5] = np.nan
    with pytest.raises(InvalidValuesError, match="NaN"):
        pipe(nan)
    with pytest.raises(TooFewPointsError, match="max\\(G, K\\)"):
        pipe(scans[0][:10])
    with pytest.raises(InvalidValuesError, match="expected \\[M, 3\\]"):
        pipe(scans[0][:, :2])


def test_model_metadata_errors(tmp_path):
    with pytest.raises(ModelMetadataError, match="btp-export"):
        read_model_meta(tmp_path / "none.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model")
    with pytest.raises(ModelMetadataError):
        read_model_meta(junk)


def test_backends(model_path):
    meta = read_model_meta(model_path)
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("tpu", model_path, meta)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(BackendError, match="CUDAExecutionProvider"):
            make_backend("ort-cuda", model_path, meta)
    assert make_backend("ort-cpu", model_path, meta, threads=1).name == "ort-cpu"


def test_openvino_backends_match_onnx_runtime(model_path, scans, monkeypatch):
    """--backend openvino (float32) gives ORT's scores; openvino-bf16 runs the same graph in
    bfloat16 where the CPU has it (looser); without the package: a BackendError saying what to install."""
    pytest.importorskip("openvino")
    ort_pipe = Pipeline(model_path)
    for name, tol in (("openvino", 1e-4), ("openvino-bf16", 0.2)):
        pipe = Pipeline(model_path, backend=name, threads=1)
        assert pipe.backend.name == name
        for scan in scans[:2]:
            a, b = ort_pipe(scan), pipe(scan)
            np.testing.assert_allclose(b.point_scores, a.point_scores, atol=tol, rtol=0)
            assert abs(b.object_score - a.object_score) <= tol
    import sys
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendError, match="btp-edge\\[openvino\\]"):
        make_backend("openvino", model_path, read_model_meta(model_path))


def test_calibration_quantile_margin_and_sidecar(model_path, tmp_path):
    assert calibrate_threshold([0.2, 0.4, 0.3], 1.0, 0.05) == pytest.approx(0.45)
    assert calibrate_threshold([0.0, 1.0], 0.5, 0.0) == pytest.approx(0.5)
    with pytest.raises(CalibrationError):
        calibrate_threshold([], 1.0, 0.0)
    th = make_threshold(model_path, [0.41, 0.43], 1.0, 0.01, "btp-tiny")
    assert sidecar_path(model_path).name == "tiny.threshold.json"
    copy = tmp_path / "m.onnx"
    copy.write_bytes(model_path.read_bytes())
    write_threshold(sidecar_path(copy), th)
    assert find_threshold(copy).value == pytest.approx(0.44)
    other = tmp_path / "other.onnx"
    other.write_bytes(model_path.read_bytes() + b"\x00")  # a different file
    with pytest.raises(CalibrationError, match="another model"):
        read_threshold(sidecar_path(copy), other)


def test_nearest_fast_path_equals_the_exact_rule_on_real_scans(shapes_root):
    # the runtime's plain k=1 tree query == btp.geometry.interpolate_to_raw (ties -> lowest index)
    # on real scans, which have no exact distance ties; exact=True is the rule itself
    from btp.config import tiny_config
    from btp.geometry import interpolate_to_raw, nearest_scores
    from btp.geometry.prepare import sample_indices

    cfg = tiny_config()
    for i, name in enumerate(REAL_SHAPES):
        raw = real_scan(shapes_root, name, 30000, seed=i)
        sample_idx = sample_indices(raw, cfg.preprocess)[0]
        scores = np.random.default_rng(i).random(len(sample_idx), dtype=np.float32)
        ref = interpolate_to_raw(raw[sample_idx], scores, raw, method="nearest")
        np.testing.assert_array_equal(nearest_scores(raw[sample_idx], scores, raw), ref)


def test_pipeline_defaults_openmp_threads_only_when_unset(model_path, monkeypatch):
    from btp.runtime.pipeline import default_openmp_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    Pipeline(model_path)
    assert default_openmp_threads() is False
    import os
    assert os.environ["OMP_NUM_THREADS"] == "2"
    monkeypatch.delenv("OMP_NUM_THREADS")
    Pipeline(model_path)
    assert os.environ["OMP_NUM_THREADS"] == "1"
