"""The GPU path on the product's road: ``Pipeline(preprocess="cuda-emu")`` runs our CUDA kernels'
own source (CPU emulation) through the very Pipeline code that ``preprocess="cuda"`` runs on a GPU,
and must give the scores of ``preprocess="cpu", downsample="exact"``. On a machine with a GPU the
same comparison runs with ``preprocess="cuda"``."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.io import write_point_cloud
from btp.kernels.devices import gpu_unavailable_reason
from btp.runtime import Pipeline
from btp.runtime.device import PreprocessError, resolve_preprocess
from runtime_helpers import REAL_SHAPES, real_scan, tiny_export

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (C++20) not found: the kernel emulation needs it")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def scans(shapes_root):
    # M > N (512) from two real meshes, and one scan of M < N points (all points kept, input order)
    return [real_scan(shapes_root, REAL_SHAPES[0], 1800, seed=1), real_scan(shapes_root, REAL_SHAPES[1], 1300, seed=2),
            real_scan(shapes_root, REAL_SHAPES[2], 400, seed=3)]


def _compare(a, b):
    np.testing.assert_array_equal(a.sampled_idx, b.sampled_idx)
    assert np.abs(a.point_scores - b.point_scores).max() <= 1e-5
    assert np.abs(a.sampled_scores - b.sampled_scores).max() <= 1e-5
    assert abs(a.object_score - b.object_score) <= 1e-5
    np.testing.assert_allclose(a.patch_probs, b.patch_probs, atol=1e-5, rtol=0)


@needs_gxx
def test_cuda_emu_equals_cpu_exact_on_real_shapes(model_path, scans):
    emu = Pipeline(model_path, preprocess="cuda-emu")
    cpu = Pipeline(model_path, preprocess="cpu", downsample="exact")
    assert emu.preprocess == "cuda-emu" and emu.device_chain is not None and cpu.device_chain is None
    for raw in scans:
        got, ref = emu(raw), cpu(raw)
        _compare(got, ref)
        assert list(got.timings) == ["load", "sanitize", "preprocess", "engine", "postprocess", "object_score"]
    launched = {name for name, _ in emu.device_chain.device.launches}
    assert {"btp_fps", "btp_knn_group", "btp_normalize", "btp_scatter_patch_scores", "btp_interpolate_nearest"} <= launched


@needs_gxx
def test_cuda_emu_equals_cpu_exact_in_the_canonical_order(model_path, scans):
    """A model with preprocess.sampling_order = "canonical": the kernels get the rows sorted by
    value, the point farthest from the centroid first, and the scores go back to the input's rows,
    as on the CPU."""
    import copy

    from scipy.spatial.transform import Rotation

    emu = Pipeline(model_path, preprocess="cuda-emu")
    cpu = Pipeline(model_path, preprocess="cpu", downsample="exact")
    for pipe in (emu, cpu):
        pipe.cfg = copy.deepcopy(pipe.cfg)
        pipe.cfg.preprocess.sampling_order = "canonical"
    turn = Rotation.from_rotvec(np.deg2rad(40.0) * np.array([0.6, -0.48, 0.64])).as_matrix()
    for raw in scans:
        got = emu(raw[::-1].copy())
        _compare(got, cpu(raw[::-1].copy()))
        assert got.object_score == emu(raw).object_score
        # both start at the point farthest from the centroid: the part turned, the same samples
        center = raw.mean(0, dtype=np.float64)
        turned = ((raw - center) @ turn.T + center).astype(np.float32)
        moved, same = emu(turned), emu(raw)
        _compare(moved, cpu(turned))
        assert moved.sampled_idx[0] == same.sampled_idx[0] == np.argmax(((raw - center) ** 2).sum(1))
        assert set(moved.sampled_idx.tolist()) == set(same.sampled_idx.tolist())


@needs_gxx
def test_cuda_emu_equals_cpu_exact_with_the_self_similarity_terms(model_path, scans):
    """A config whose object score and point map read the part against itself: the device chain
    gives the same object score, map and raw scores as the CPU (the shown map carried again on the CPU)."""
    import copy

    emu = Pipeline(model_path, preprocess="cuda-emu")
    cpu = Pipeline(model_path, preprocess="cpu", downsample="exact")
    for pipe in (emu, cpu):
        pipe.cfg = copy.deepcopy(pipe.cfg)
        pipe.cfg.scoring.selfsim_weight, pipe.cfg.scoring.selfsim_offset = 0.3, 4.0
        pipe.cfg.scoring.selfsim_point_weight, pipe.cfg.scoring.selfsim_point_center = 0.2, 3.0
        pipe.cfg.scoring.selfsim_point_smooth = 8
    plain = Pipeline(model_path, preprocess="cuda-emu")
    for raw in scans[:2]:
        got = emu(raw)
        _compare(got, cpu(raw))
        assert list(got.timings)[-3:] == ["selfsim", "point_map", "object_score"]
        assert np.abs(got.sampled_scores - plain(raw).sampled_scores).max() > 1e-3  # the term moved the map


@pytest.mark.skipif(gpu_unavailable_reason() is not None, reason=gpu_unavailable_reason() or "")
def test_cuda_equals_cpu_exact_on_real_shapes(model_path, scans):
    gpu = Pipeline(model_path, preprocess="cuda")
    cpu = Pipeline(model_path, preprocess="cpu", downsample="exact")
    for raw in scans:
        _compare(gpu(raw), cpu(raw))


@needs_gxx
def test_btp_run_cuda_emu_equals_cpu_exact_from_the_cli(model_path, scans, tmp_path):
    from btp.cli import app

    scan = write_point_cloud(tmp_path / "part.pcd", scans[0])
    outs = {}
    for name, flags in (("emu", ["--preprocess", "cuda-emu"]), ("cpu", ["--preprocess", "cpu", "--downsample", "exact"])):
        out = tmp_path / name
        result = CliRunner().invoke(app, ["run", str(model_path), str(scan), "--out", str(out), "--heatmap", "none",
                                          *flags])
        assert result.exit_code == 0, result.output
        outs[name] = out
    assert np.abs(np.load(outs["emu"] / "part.npy") - np.load(outs["cpu"] / "part.npy")).max() <= 1e-5
    docs = {name: json.loads((out / "part.json").read_text()) for name, out in outs.items()}
    assert docs["emu"]["preprocess"] == "cuda-emu" and docs["cpu"]["preprocess"] == "cpu"
    assert abs(docs["emu"]["object_score"] - docs["cpu"]["object_score"]) <= 1e-5


def test_auto_takes_the_cpu_without_a_gpu_and_says_why(model_path):
    pipe = Pipeline(model_path)
    reason = gpu_unavailable_reason()
    if reason is None:
        assert pipe.preprocess == "cuda"
    else:
        assert pipe.preprocess == "cpu" and pipe.preprocess_reason == reason and pipe.device_chain is None


def test_choices_the_kernels_cannot_honour_are_refused(model_path, tmp_path):
    from btp.cli import app
    from btp.config import preset

    cfg = Pipeline(model_path, preprocess="cpu").cfg
    with pytest.raises(PreprocessError, match="needs --preprocess cpu"):
        resolve_preprocess("cuda-emu", cfg, "bucket")
    with pytest.raises(PreprocessError, match="unit_sphere_raw"):  # the official preprocessing: CPU only
        resolve_preprocess("cuda-emu", preset("btp-3dad"), "auto")
    assert resolve_preprocess("auto", preset("btp-3dad"), "auto")[0] == "cpu"
    with pytest.raises(PreprocessError, match="choose one of"):
        resolve_preprocess("gpu", cfg, "auto")
    result = CliRunner().invoke(app, ["run", str(model_path), str(tmp_path), "--preprocess", "cuda-emu",
                                      "--downsample", "voxel"])
    assert result.exit_code == 2 and "needs --preprocess cpu" in result.output
    if gpu_unavailable_reason() is not None:
        result = CliRunner().invoke(app, ["run", str(model_path), str(tmp_path), "--preprocess", "cuda"])
        assert result.exit_code == 2 and "no CUDA binding" in result.output
