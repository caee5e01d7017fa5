"""GpuPreprocessor (the runtime's GPU preprocess/postprocess stages) run on the CPU emulation of
the kernels, against the CPU pipeline of btp.geometry on real shapes."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from btp import geometry
from btp.config import tiny_config
from btp.kernels.launch import BlockSizes
from btp.kernels.preprocess import GpuPreprocessor

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (C++20) not found: the kernel emulation needs it")

SMALL = BlockSizes(fps=64, knn=64, elementwise=64)


@pytest.fixture(scope="module")
def raw_scan(bunny_mesh):
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(bunny_mesh)
    points, _ = sample_surface(vertices, faces, 2500, seed=3)
    colors = np.random.default_rng(0).random(points.shape, dtype=np.float32)
    return points.astype(np.float32) * np.float32(40.0) + np.float32(3.0), colors  # off-center, scaled


def cpu_pipeline(raw, colors, n, g, k, c, rgb_fill, start):
    sample_idx = geometry.downsample(raw, n, start, method="exact")
    normed, origin, scale = geometry.normalize(raw[sample_idx])
    groups = geometry.group(normed, g, k, start_idx=start, colors=None if colors is None else colors[sample_idx],
                            rgb_fill=rgb_fill, in_channels=c)
    return sample_idx, normed, origin, scale, groups


@pytest.mark.parametrize("with_colors", [False, True])
def test_prepare_and_scores_match_cpu_pipeline(raw_scan, with_colors):
    from btp.kernels.emu import EmuDevice

    raw, colors = raw_scan
    colors = colors if with_colors else None
    cfg = tiny_config()  # N=512, G=32, K=16, C=6
    cfg.preprocess.fps_start = 5
    pre = GpuPreprocessor.from_config(cfg, device=EmuDevice(), blocks=SMALL)
    got = pre.run(raw, colors)
    n, g, k = cfg.preprocess.num_points, cfg.encoder.num_group, cfg.encoder.group_size
    sample_idx, normed, origin, scale, groups = cpu_pipeline(raw, colors, n, g, k, 6, cfg.preprocess.rgb_fill, 5)
    np.testing.assert_array_equal(got.sample_idx, sample_idx)
    np.testing.assert_array_equal(got.points, normed)
    np.testing.assert_array_equal(got.origin, origin)
    assert got.scale == np.float32(scale)
    np.testing.assert_array_equal(got.center_idx, groups.center_idx)
    np.testing.assert_array_equal(got.patch_idx, groups.patch_idx)
    np.testing.assert_array_equal(got.neighborhood, groups.neighborhood)  # the engine's input
    np.testing.assert_array_equal(got.center, groups.center)

    patch_scores = np.random.default_rng(1).random(g, dtype=np.float32)
    point_scores, raw_scores = pre.scores(patch_scores)
    ref_points = geometry.propagate_patch_scores(patch_scores, groups.patch_idx, groups.center, normed)
    np.testing.assert_allclose(point_scores, ref_points, rtol=0, atol=1e-6)
    ref_raw = geometry.interpolate_to_raw(raw[sample_idx], point_scores, raw, method="nearest")
    np.testing.assert_allclose(raw_scores, ref_raw, rtol=0, atol=1e-6)
    assert raw_scores.shape == (raw.shape[0],)


def test_buffers_are_reused_across_scans_of_different_size(raw_scan):
    from btp.kernels.emu import EmuDevice

    raw, _ = raw_scan
    pre = GpuPreprocessor(256, 16, 8, 3, device=EmuDevice(), blocks=SMALL)
    big = pre.run(raw)
    small = pre.run(raw[:900])  # smaller scan into the larger raw buffers
    np.testing.assert_array_equal(small.sample_idx, geometry.downsample(raw[:900], 256, 0, method="exact"))
    again = pre.run(raw)
    np.testing.assert_array_equal(again.neighborhood, big.neighborhood)


def test_scan_smaller_than_num_points_keeps_all_points(raw_scan):
    # the one rule of btp.geometry.prepare: M <= N keeps all M points, in input order
    from btp.kernels.emu import EmuDevice

    raw = raw_scan[0][:300]
    pre = GpuPreprocessor(512, 32, 16, device=EmuDevice(), blocks=SMALL)
    got = pre.run(raw)
    sample_idx = np.arange(300)
    normed, _, _ = geometry.normalize(raw[sample_idx])
    ref = geometry.group(normed, 32, 16)
    np.testing.assert_array_equal(got.sample_idx, sample_idx)
    np.testing.assert_array_equal(got.neighborhood, ref.neighborhood)
    point_scores, raw_scores = pre.scores(np.linspace(0, 1, 32, dtype=np.float32))
    assert point_scores.shape == (300,) and raw_scores.shape == (300,)
    with pytest.raises(ValueError, match="fewer than the model's max"):
        pre.run(raw[:20])


def test_run_equals_the_cpu_chain_with_exact_downsampling(raw_scan):
    # the device chain is btp.geometry.prepare with method="exact": the one Prepared, field by field
    from btp.geometry.prepare import prepare
    from btp.kernels.emu import EmuDevice

    raw = raw_scan[0]
    cfg = tiny_config()
    pre = GpuPreprocessor.from_config(cfg, device=EmuDevice(), blocks=SMALL)
    for scan in (raw, raw[:400]):  # M > N, and M <= N (all points, in input order)
        got, ref = pre.run(scan), prepare(scan, cfg, "exact")
        for name in ("raw_points", "sample_idx", "points", "center_idx", "patch_idx", "neighborhood", "center",
                     "origin"):
            np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
        assert got.scale == np.float32(ref.scale)


def test_wide_fps_path_for_large_raw_scans(raw_scan):
    # raw scans from fps_wide_from points on take the wide FPS (here forced small); same result,
    # and its scratch buffers are reused from one scan to the next
    from btp.kernels.emu import EmuDevice

    raw = raw_scan[0][:1200]
    wide = BlockSizes(fps=64, knn=64, elementwise=64, fps_wide_from=1000, fps_wide_blocks=3)
    pre = GpuPreprocessor(48, 8, 8, 3, device=EmuDevice(), blocks=wide)
    first = pre.run(raw)
    scratch = dict(pre._wide_scratch)
    np.testing.assert_array_equal(first.sample_idx, geometry.downsample(raw, 48, 0, method="exact"))
    assert "btp_fps_wide_step" in [name for name, _ in pre.device.launches]
    pre.run(raw[::-1].copy())
    assert all(pre._wide_scratch[k] is scratch[k] for k in scratch)
