"""The CUDA kernels' own source, run on the CPU under btp/kernels/emu/cuda_emu.h, against the
numpy references of btp.geometry: FPS indices exactly, kNN rows exactly (index and dist2, which
includes equal index sets with equal distances), neighborhood/center bit for bit, propagation
and interpolation within 1e-6.

Small blocks (64 or 96 threads = 2 or 3 warps) keep the emulation fast and still exercise the
cross-warp reduction, partial warps of work and partial tiles.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from btp.geometry import fps_reference, group, interpolate_to_raw, knn_reference, propagate_patch_scores
from btp.kernels import ops
from btp.kernels.launch import BlockSizes

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ (C++20) not found: the kernel emulation needs it")

SMALL = BlockSizes(fps=64, knn=64, elementwise=64)
ODD = BlockSizes(fps=96, knn=96, elementwise=96)


@pytest.fixture(scope="module")
def dev():
    from btp.kernels.emu import EmuDevice

    return EmuDevice()


@pytest.fixture(scope="module")
def bunny_points(bunny_mesh) -> np.ndarray:
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(bunny_mesh)
    points, _ = sample_surface(vertices, faces, 3000, seed=0)
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def shape_points(shapes_root) -> list[np.ndarray]:
    from btp.io import load_mesh, sample_surface

    clouds = []
    for name in ("cgal__anchor.ply", "cgal__bull.ply", "cgal__coupling.ply"):
        vertices, faces = load_mesh(shapes_root / name)
        points, _ = sample_surface(vertices, faces, 1500, seed=1)
        clouds.append(points.astype(np.float32))
    return clouds


def lattice(n_side: int) -> np.ndarray:
    """A cubic grid: every FPS step and most kNN rows have exact distance ties."""
    axis = np.arange(n_side, dtype=np.float32) * np.float32(0.25)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    return np.ascontiguousarray(grid)


# ---- FPS -----------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", [SMALL, ODD], ids=["2warps", "3warps"])
def test_fps_random_batch_with_per_cloud_start(dev, blocks):
    rng = np.random.default_rng(0)
    points = rng.normal(size=(3, 700, 3)).astype(np.float32)
    starts = np.array([0, 311, 699])
    got = ops.fps(dev, points, 120, starts, blocks=blocks)
    assert got.shape == (3, 120) and got.dtype == np.int64
    for b in range(3):
        np.testing.assert_array_equal(got[b], fps_reference(points[b], 120, int(starts[b])))


def test_fps_lattice_ties_lowest_index_wins(dev):
    points = lattice(7)  # 343 points
    rng = np.random.default_rng(1)
    shuffled = points[rng.permutation(points.shape[0])]  # ties between non-adjacent indices
    for cloud, start in ((points, 0), (points, 171), (shuffled, 5)):
        got = ops.fps(dev, cloud, 100, start, blocks=SMALL)
        np.testing.assert_array_equal(got, fps_reference(cloud, 100, start))


def test_fps_duplicates_and_more_samples_than_distinct_points(dev):
    rng = np.random.default_rng(2)
    base = rng.random((20, 3), dtype=np.float32)
    points = np.concatenate([base, base[::-1], base])  # every point three times
    got = ops.fps(dev, points, 50, 7, blocks=SMALL)  # only 20 distinct points
    ref = fps_reference(points, 50, 7)
    np.testing.assert_array_equal(got, ref)
    assert len(set(points[got[:20]].tobytes()[i:i + 12] for i in range(0, 240, 12))) == 20


def test_fps_fewer_points_than_threads_and_near_origin_point(dev):
    # 3 points, 64 threads: most threads own no point. The origin must be pickable
    # (pointnet2_ops skips |p|^2 <= 1e-3 and would pick (1, 0.01, 0) instead).
    points = np.array([[0, 0, 0], [1, 0, 0], [1, 0.01, 0]], dtype=np.float32)
    got = ops.fps(dev, points, 3, 1, blocks=SMALL)
    np.testing.assert_array_equal(got, [1, 0, 2])
    np.testing.assert_array_equal(got, fps_reference(points, 3, 1))


def test_fps_float32_rounding_far_from_origin(dev):
    # an offset cloud: differences are rounded to float32 first; an FMA or float64 path
    # would break near-ties here
    rng = np.random.default_rng(3)
    points = (rng.random((500, 3)) * 1e-3 + 1000.0).astype(np.float32)
    np.testing.assert_array_equal(ops.fps(dev, points, 64, 3, blocks=SMALL), fps_reference(points, 64, 3))


def test_fps_real_shapes(dev, bunny_points, shape_points):
    for cloud in (bunny_points, *shape_points):
        np.testing.assert_array_equal(ops.fps(dev, cloud, 128, 0, blocks=SMALL), fps_reference(cloud, 128, 0))


# ---- kNN grouping --------------------------------------------------------------------------

def assert_knn_equal(got_idx, got_d2, points, queries, k):
    ref_idx, ref_d2 = knn_reference(points, queries, k)
    np.testing.assert_array_equal(got_d2, ref_d2)  # equal distances, bit for bit
    for row in range(ref_idx.shape[0]):  # equal index sets (the rule also fixes the order)
        assert set(got_idx[row]) == set(ref_idx[row])
    np.testing.assert_array_equal(got_idx, ref_idx)


@pytest.mark.parametrize("k", [1, 16, 64])
def test_knn_lattice_ties(dev, k):
    points = lattice(6)  # 216 points, many equal distances at the K-th boundary
    center_idx = np.arange(0, 216, 7)  # 31 centers: not a multiple of the block
    got = ops.knn_group(dev, points, center_idx, k, blocks=SMALL)
    assert_knn_equal(got["patch_idx"], got["dist2"], points, points[center_idx], k)


def test_knn_random_batch_partial_tiles(dev):
    rng = np.random.default_rng(4)
    points = rng.normal(size=(2, 600, 3)).astype(np.float32)  # 600 = 2 full tiles of 256 + 88
    center_idx = np.stack([rng.choice(600, 70, replace=False) for _ in range(2)])
    got = ops.knn_group(dev, points, center_idx, 32, blocks=ODD)
    for b in range(2):
        assert_knn_equal(got["patch_idx"][b], got["dist2"][b], points[b], points[b][center_idx[b]], 32)


def test_knn_duplicates(dev):
    rng = np.random.default_rng(5)
    base = rng.random((40, 3), dtype=np.float32)
    points = np.concatenate([base, base, base])
    got = ops.knn_group(dev, points, [0, 45, 119], 8, blocks=SMALL)
    assert_knn_equal(got["patch_idx"], got["dist2"], points, points[[0, 45, 119]], 8)


@pytest.mark.parametrize("in_channels,with_colors", [(6, False), (6, True), (3, False)])
def test_group_matches_geometry_group_bit_for_bit(dev, bunny_points, in_channels, with_colors):
    colors = None
    if with_colors:
        colors = np.random.default_rng(6).random(bunny_points.shape, dtype=np.float32)
    got = ops.group(dev, bunny_points, 100, 32, start_idx=17, colors=colors, rgb_fill=0.25,
                    in_channels=in_channels, blocks=SMALL)
    ref = group(bunny_points, 100, 32, start_idx=17, colors=colors, rgb_fill=0.25, in_channels=in_channels)
    np.testing.assert_array_equal(got.center_idx, ref.center_idx)
    np.testing.assert_array_equal(got.patch_idx, ref.patch_idx)
    assert got.neighborhood.shape == (100, 32, in_channels) and got.neighborhood.dtype == np.float32
    np.testing.assert_array_equal(got.neighborhood, ref.neighborhood)
    np.testing.assert_array_equal(got.center, ref.center)


def test_group_real_shapes_batched(dev, shape_points):
    batch = np.stack(shape_points)  # [3, 1500, 3]
    got = ops.group(dev, batch, 64, 16, start_idx=0, blocks=ODD)
    for b in range(batch.shape[0]):
        ref = group(batch[b], 64, 16)
        np.testing.assert_array_equal(got.center_idx[b], ref.center_idx)
        np.testing.assert_array_equal(got.patch_idx[b], ref.patch_idx)
        np.testing.assert_array_equal(got.neighborhood[b], ref.neighborhood)
        np.testing.assert_array_equal(got.center[b], ref.center)


def test_group_stays_on_device_between_fps_and_knn(dev, bunny_points):
    # enqueue_group chains FPS -> kNN on device buffers: two launches, no download in between
    from btp.kernels.emu import EmuDevice

    counting = EmuDevice()
    downloads = []
    counting.download = lambda buf, _orig=counting.download: downloads.append(1) or _orig(buf)
    pts = counting.upload(bunny_points[None])
    start = counting.upload(np.zeros(1, np.int32))
    out = ops.enqueue_group(counting, pts, None, 1, bunny_points.shape[0], 32, 16, 6, 0.5, start, blocks=SMALL)
    assert [name for name, _ in counting.launches] == ["btp_fps", "btp_knn_group"]
    assert downloads == []
    assert out.neighborhood.shape == (1, 32, 16, 6)


def test_knn_rejects_k_above_64(dev, bunny_points):
    with pytest.raises(ValueError, match="K <= "):
        ops.knn_group(dev, bunny_points, [0, 1], 65, blocks=SMALL)


# ---- scores --------------------------------------------------------------------------------

def test_propagate_matches_geometry_with_uncovered_points(dev, bunny_points):
    # 60 patches of 64 on 3000 points: some points in several patches, ~140 in none (those
    # take their nearest center's score)
    groups = group(bunny_points, 60, 64, start_idx=3)
    patch_scores = np.random.default_rng(7).random(60, dtype=np.float32)
    got = ops.propagate_patch_scores(dev, patch_scores, groups.patch_idx, groups.center, bunny_points,
                                     blocks=SMALL)
    ref = propagate_patch_scores(patch_scores, groups.patch_idx, groups.center, bunny_points)
    counts = np.bincount(groups.patch_idx.ravel(), minlength=bunny_points.shape[0])
    assert (counts == 0).any() and (counts > 1).any()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_propagate_per_point_scores_matches_geometry(dev, bunny_points):
    """A model's per-point scores [G, K]: each point's mean of its own scores in its patches."""
    groups = group(bunny_points, 60, 64, start_idx=3)
    rng = np.random.default_rng(9)
    patch_scores = rng.random(60, dtype=np.float32)
    point_scores = rng.random((60, 64), dtype=np.float32)
    got = ops.propagate_patch_scores(dev, patch_scores, groups.patch_idx, groups.center, bunny_points,
                                     blocks=SMALL, point_scores=point_scores)
    ref = propagate_patch_scores(patch_scores, groups.patch_idx, groups.center, bunny_points,
                                 point_scores=point_scores)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    patch_only = propagate_patch_scores(patch_scores, groups.patch_idx, groups.center, bunny_points)
    assert np.abs(got - patch_only).max() > 0.1


def test_propagate_batched_overlapping_patches(dev, shape_points):
    batch = np.stack(shape_points[:2])
    groups = [group(cloud, 128, 32) for cloud in batch]
    rng = np.random.default_rng(8)
    patch_scores = rng.random((2, 128), dtype=np.float32)
    got = ops.propagate_patch_scores(dev, patch_scores, np.stack([g.patch_idx for g in groups]),
                                     np.stack([g.center for g in groups]), batch, blocks=ODD)
    for b in range(2):
        ref = propagate_patch_scores(patch_scores[b], groups[b].patch_idx, groups[b].center, batch[b])
        np.testing.assert_allclose(got[b], ref, rtol=0, atol=1e-6)


def test_interpolate_nearest_matches_geometry(dev, bunny_points, shapes_root):
    from btp.io import load_mesh, sample_surface

    sampled = bunny_points[fps_reference(bunny_points, 300, 0)]
    scores = np.random.default_rng(9).random(300, dtype=np.float32)
    vertices, faces = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    raw, _ = sample_surface(vertices, faces, 5000, seed=2)  # the "raw scan", denser
    raw = np.concatenate([raw.astype(np.float32), sampled[:10]])  # exact hits too
    got = ops.interpolate_nearest(dev, sampled, scores, raw, blocks=SMALL)
    ref = interpolate_to_raw(sampled, scores, raw, method="nearest")
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[-10:], scores[:10])


# ---- normalisation -------------------------------------------------------------------------

def test_normalize_matches_geometry(dev, bunny_points, shape_points):
    from btp.geometry import normalize

    for cloud in (bunny_points, *shape_points, bunny_points * np.float32(37.0) + np.float32(5.0)):
        got, origin, scale = ops.normalize(dev, cloud, blocks=ODD)
        ref, ref_origin, ref_scale = normalize(cloud)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(origin, ref_origin)
        assert scale == np.float32(ref_scale)


def test_default_gpu_block_sizes(dev, bunny_points):
    # the block sizes the GPU runs (FPS and normalisation 1024 threads = 32 warps, so the second
    # arg-max stage is a full warp; kNN 64; elementwise 256), on a few samples to stay fast
    from btp.geometry import normalize

    defaults = BlockSizes()
    got = ops.group(dev, bunny_points, 16, 16, start_idx=9, blocks=defaults)
    ref = group(bunny_points, 16, 16, start_idx=9)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    normed, _, _ = ops.normalize(dev, bunny_points, blocks=defaults)
    np.testing.assert_array_equal(normed, normalize(bunny_points)[0])


# ---- wide FPS (many blocks per cloud, one launch per step) --------------------------------------

WIDE = BlockSizes(fps=64, knn=64, elementwise=64, fps_wide_from=0, fps_wide_blocks=5)


def test_wide_fps_equals_reference_with_ties_across_blocks(dev, bunny_points):
    # 5 blocks x 64 threads stride the cloud: equal maxima sit in different blocks, and the
    # last-block reduction must still pick the lowest index
    rng = np.random.default_rng(10)
    grid = lattice(7)
    base = rng.random((30, 3), dtype=np.float32)
    clouds = [(grid, 0, 40), (grid[rng.permutation(len(grid))], 100, 40),
              (np.concatenate([base, base, base]), 4, 40), (bunny_points, 11, 32)]
    for cloud, start, s in clouds:
        got = ops.fps(dev, cloud, s, start, blocks=WIDE)
        np.testing.assert_array_equal(got, fps_reference(cloud, s, start))
    assert [name for name, _ in dev.launches[-s:]] == ["btp_fps_wide_init"] + ["btp_fps_wide_step"] * (s - 1)


def test_wide_fps_batch(dev):
    points = np.random.default_rng(11).normal(size=(2, 900, 3)).astype(np.float32)
    got = ops.fps(dev, points, 24, [5, 899], blocks=WIDE)
    for b, start in enumerate((5, 899)):
        np.testing.assert_array_equal(got[b], fps_reference(points[b], 24, start))
