"""The CUDA kernels on a real GPU, through each CUDA binding (pycuda, cuda-python), against
btp.geometry's CPU path, on random clouds and real shapes at N = 2k, 40k, 400k, 2M (override
with BTP_GPU_SIZES="2048,40000").

Skipped with the precise reason where a binding, the CUDA driver or a GPU is missing
(run benchmarks/gpu_check.sh on an NVIDIA machine).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from btp import geometry
from btp.kernels import ops
from btp.kernels.devices import BINDINGS, gpu_unavailable_reason, unavailable_reasons

REASON = gpu_unavailable_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
SIZES = [int(s) for s in os.environ.get("BTP_GPU_SIZES", "2048,40000,400000,2000000").split(",")]


@pytest.fixture(scope="module", params=BINDINGS)
def cuda_dev(request):
    from btp.kernels.devices import open_device

    why = unavailable_reasons()[request.param]
    if why:
        pytest.skip(why)
    dev = open_device(request.param)
    yield dev
    dev.close()


def cloud(kind: str, n: int, shapes_root) -> np.ndarray:
    if kind == "random":
        return np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
    if kind == "lattice":
        side = int(round(n ** (1 / 3)))
        axis = np.arange(side, dtype=np.float32) * np.float32(0.5)
        return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3).copy()
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    points, _ = sample_surface(vertices, faces, n, seed=0)
    return points.astype(np.float32)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["random", "shape", "lattice"])
def test_fps_equals_cpu(cuda_dev, shapes_root, kind, n):
    points = cloud(kind, n, shapes_root)
    g = 512 if n <= 40000 else 2048
    np.testing.assert_array_equal(ops.fps(cuda_dev, points, g, 7), geometry.fps(points, g, 7))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["random", "shape", "lattice"])
def test_knn_group_equals_cpu(cuda_dev, shapes_root, kind, n):
    points = cloud(kind, n, shapes_root)
    center_idx = geometry.fps(points, 512, 0) if n <= 40000 else np.random.default_rng(0).choice(len(points), 512, replace=False)
    got = ops.knn_group(cuda_dev, points, center_idx, 32)
    ref_idx, ref_d2 = geometry.knn(points, points[center_idx], 32)
    np.testing.assert_array_equal(got["dist2"], ref_d2)
    np.testing.assert_array_equal(got["patch_idx"], ref_idx)
    np.testing.assert_array_equal(got["neighborhood"][..., :3], points[ref_idx] - points[center_idx][:, None])
    assert (got["neighborhood"][..., 3:] == np.float32(0.5)).all()


@pytest.mark.parametrize("n", [n for n in SIZES if n <= 400000])
def test_group_propagate_interpolate_equal_cpu(cuda_dev, shapes_root, n):
    points = cloud("shape", n, shapes_root)
    got = ops.group(cuda_dev, points, 512, 32, start_idx=3)
    ref = geometry.group(points, 512, 32, start_idx=3)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    patch_scores = np.random.default_rng(1).random(512, dtype=np.float32)
    np.testing.assert_allclose(ops.propagate_patch_scores(cuda_dev, patch_scores, ref.patch_idx, ref.center, points),
                               geometry.propagate_patch_scores(patch_scores, ref.patch_idx, ref.center, points),
                               rtol=0, atol=1e-6)
    sampled = points[ref.center_idx]
    raw = cloud("random", 50000, shapes_root) * np.float32(0.05)
    np.testing.assert_allclose(ops.interpolate_nearest(cuda_dev, sampled, patch_scores, raw),
                               geometry.interpolate_to_raw(sampled, patch_scores, raw, "nearest"), rtol=0, atol=1e-6)


def test_preprocessor_on_gpu_equals_cpu_pipeline(cuda_dev, shapes_root):
    from btp.config import btp_mini_config
    from btp.kernels.preprocess import GpuPreprocessor

    cfg = btp_mini_config()
    raw = cloud("shape", 100000, shapes_root)
    pre = GpuPreprocessor.from_config(cfg, device=cuda_dev)
    got = pre.run(raw)
    n, g, k = cfg.preprocess.num_points, cfg.encoder.num_group, cfg.encoder.group_size
    sample_idx = geometry.downsample(raw, n, cfg.preprocess.fps_start, method="exact")
    normed, _, _ = geometry.normalize(raw[sample_idx])
    ref = geometry.group(normed, g, k, start_idx=cfg.preprocess.fps_start)
    np.testing.assert_array_equal(got.sample_idx, sample_idx)
    np.testing.assert_array_equal(got.normed, normed)
    np.testing.assert_array_equal(got.neighborhood[0], ref.neighborhood)
    np.testing.assert_array_equal(got.center[0], ref.center)
