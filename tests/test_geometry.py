"""btp.geometry: every fast path against its plain reference, on real mesh samples and on
clouds built to have exact ties (lattices, duplicated points) and float32 near-ties."""
from __future__ import annotations

import subprocess
import sys

import fpsample
import numpy as np
import pytest
from scipy.spatial import cKDTree

from btp.config import GFCMConfig
from btp.geometry import (DegenerateCloudError, GeometryError, Groups, denormalize, downsample,
                          fpfh_patches, fps, fps_reference, group, group_batch, interpolate_to_raw,
                          knn, knn_reference, normalize, propagate_patch_scores)
from btp.io import load_mesh, sample_surface

MESHES = ["cgal__stanford_bunny.ply", "cgal__chinese_dragon.ply", "cgal__anchor.ply"]


@pytest.fixture(scope="module")
def mesh_clouds(shapes_root) -> dict[str, np.ndarray]:
    """2048 points sampled from each of three real meshes (float32 [2048, 3])."""
    clouds = {}
    for i, name in enumerate(MESHES):
        vertices, faces = load_mesh(shapes_root / name)
        clouds[name] = sample_surface(vertices, faces, 2048, seed=i)[0]
    return clouds


@pytest.fixture(scope="module")
def bunny_20k(shapes_root) -> np.ndarray:
    vertices, faces = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    return sample_surface(vertices, faces, 20000, seed=7)[0]


def lattice(n_per_axis: int, spacing: float = 0.1) -> np.ndarray:
    """[n^3, 3] grid: every FPS step and every kNN row has exact distance ties."""
    axis = np.arange(n_per_axis, dtype=np.float32) * np.float32(spacing)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)


def duplicated(cloud: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """Each point `copies` times, in shuffled order."""
    rng = np.random.default_rng(seed)
    return np.repeat(cloud, copies, axis=0)[rng.permutation(len(cloud) * copies)]


# ---- torch-free -------------------------------------------------------------------------------

def test_geometry_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import btp.geometry, numpy as np\n"
            "p = np.random.default_rng(0).random((64, 3), dtype=np.float32)\n"
            "g = btp.geometry.group(p, 8, 4)\n"
            "assert g.neighborhood.shape == (8, 4, 6)\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# ---- FPS ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MESHES)
def test_fps_matches_reference_on_real_meshes(mesh_clouds, name):
    cloud = mesh_clouds[name]
    for start in (0, 1234, len(cloud) - 1):
        expected = fps_reference(cloud, 512, start)
        got = fps(cloud, 512, start)
        assert got.dtype == np.int64 and got.shape == (512,)
        np.testing.assert_array_equal(got, expected)
        assert got[0] == start
        assert len(np.unique(got)) == 512


def test_fps_start_index_changes_the_sequence(mesh_clouds):
    cloud = mesh_clouds[MESHES[0]]
    a, b = fps(cloud, 64, 0), fps(cloud, 64, 10)
    assert a[0] == 0 and b[0] == 10 and not np.array_equal(a, b)


@pytest.mark.parametrize("start", [0, 5, 100, 215])
def test_fps_lattice_ties_lowest_index_wins(start):
    grid = lattice(6)  # 216 points
    expected = fps_reference(grid, 216, start)
    np.testing.assert_array_equal(fps(grid, 216, start), expected)
    # step 2 by hand: the farthest points from the start are lattice corners at equal distance
    d2 = ((grid - grid[start]) ** 2).sum(1)
    assert expected[1] == np.flatnonzero(d2 == d2.max()).min()
    assert len(np.unique(expected)) == 216  # lattice points are distinct: all picked once


def test_fps_duplicated_points_and_exhaustion(mesh_clouds):
    base = mesh_clouds[MESHES[1]][:40]
    cloud = duplicated(base, 3, seed=1)  # 120 points, 40 distinct positions
    for start in (0, 77):
        expected = fps_reference(cloud, 60, start)
        np.testing.assert_array_equal(fps(cloud, 60, start), expected)
        # 40 distinct positions first, then every min-distance is 0 -> lowest index, repeatedly
        assert len(np.unique(cloud[expected[:40]], axis=0)) == 40
        assert (expected[40:] == 0).all()


def test_fps_float32_defines_near_ties(mesh_clouds):
    # an offset cloud with a tiny spread: float32 rounding of the differences decides the order
    cloud = (mesh_clouds[MESHES[0]][:1500] * np.float32(1e-3) + np.float32(300.0)).astype(np.float32)
    np.testing.assert_array_equal(fps(cloud, 300, 3), fps_reference(cloud, 300, 3))
    # float64 input is cast to float32 first: same indices as the float32 cloud
    np.testing.assert_array_equal(fps(cloud.astype(np.float64), 300, 3), fps_reference(cloud, 300, 3))


def test_fps_float32_tie_that_float64_breaks():
    # a = (1,0,0) and b with float32 |b|^2 == 1 exactly but float64 |b|^2 > 1: under the float32
    # rule they tie and the lower index (a) wins; a float64 evaluation would pick b
    rng = np.random.default_rng(0)
    while True:
        v = rng.normal(size=3)
        b = (v / np.linalg.norm(v)).astype(np.float32)
        f32 = (b[0] * b[0] + b[1] * b[1]) + b[2] * b[2]
        if f32 == np.float32(1.0) and float((b.astype(np.float64) ** 2).sum()) > 1.0:
            break
    cloud = np.array([[0, 0, 0], [1, 0, 0], b, [0.1, 0, 0]], dtype=np.float32)
    assert fps_reference(cloud, 2, 0)[1] == 1
    assert fps(cloud, 2, 0)[1] == 1
    assert int(np.argmax((cloud.astype(np.float64) ** 2).sum(1))) == 2


def test_fpsample_traps_pinned(mesh_clouds):
    """Why fps() reverses the cloud, and why the bucket variant is never the FPS rule."""
    grid = lattice(5)
    # fpsample vanilla breaks ties towards the highest index (the rule says lowest)
    vanilla = fpsample.fps_sampling(grid, 20, start_idx=0).astype(np.int64)
    assert not np.array_equal(vanilla, fps_reference(grid, 20, 0))
    # fpsample 1.0.2 bucket FPS does not start at start_idx (anchors.md)
    cloud = mesh_clouds[MESHES[0]]
    for start in (0, 17, 2000):
        bucket = fpsample.bucket_fps_kdline_sampling(cloud, 64, 5, start_idx=start)
        assert bucket[0] != start


def test_fps_errors_name_the_fix(mesh_clouds):
    cloud = mesh_clouds[MESHES[0]]
    with pytest.raises(GeometryError, match="fps_start"):
        fps(cloud, 10, start_idx=len(cloud))
    with pytest.raises(GeometryError, match="n_samples"):
        fps(cloud[:5], 6)
    with pytest.raises(GeometryError, match=r"\[N, 3\]"):
        fps(np.zeros((10, 6), np.float32), 2)
    bad = cloud[:10].copy()
    bad[3, 1] = np.nan
    with pytest.raises(GeometryError, match="NaN"):
        fps(bad, 2)


# ---- downsampling of raw scans ------------------------------------------------------------------

def _coverage(cloud: np.ndarray, idx: np.ndarray) -> float:
    """Max distance of a cloud point to its nearest sample (smaller = better spread)."""
    return float(cKDTree(cloud[idx]).query(cloud, k=1)[0].max())


def test_downsample_methods(bunny_20k):
    exact = downsample(bunny_20k, 256, 11, method="exact")
    np.testing.assert_array_equal(exact, fps(bunny_20k, 256, 11))
    reference_cover = _coverage(bunny_20k, exact)
    for method in ("bucket", "voxel", "auto"):
        first = downsample(bunny_20k, 256, 11, method=method)
        np.testing.assert_array_equal(first, downsample(bunny_20k, 256, 11, method=method))
        assert first.dtype == np.int64 and first.shape == (256,)
        assert len(np.unique(first)) == 256 and 0 <= first.min() and first.max() < len(bunny_20k)
        assert _coverage(bunny_20k, first) < 1.5 * reference_cover, method
    # auto: the voxel rule at every size
    np.testing.assert_array_equal(downsample(bunny_20k[:5000], 128, 3),
                                  downsample(bunny_20k[:5000], 128, 3, method="voxel"))
    np.testing.assert_array_equal(downsample(bunny_20k, 256, 11),
                                  downsample(bunny_20k, 256, 11, method="voxel"))
    with pytest.raises(GeometryError, match="choose one of"):
        downsample(bunny_20k, 256, method="random")


@pytest.fixture(scope="module")
def scans_100k(shapes_root) -> dict[str, np.ndarray]:
    """100 000-point scans of two real meshes (scanner density): a curved organic one and a
    mechanical one with flat faces and sharp edges."""
    scans = {}
    for i, name in enumerate(["cgal__stanford_bunny.ply", "cgal__anchor.ply"]):
        vertices, faces = load_mesh(shapes_root / name)
        scans[name] = sample_surface(vertices, faces, 100_000, seed=20 + i)[0]
    return scans


def test_voxel_map_cells_and_representatives(scans_100k, monkeypatch):
    """The voxel rule's map: deterministic; every cell's representative is the lowest raw index
    of the cell; the points of a cell lie within one voxel of each other per axis; about the
    target number of cells; the dense grid and the sorted-keys path give the same map."""
    from btp.geometry import sampling

    for name, scan in scans_100k.items():
        target = 2048 * sampling.VOXEL_REPS_PER_SAMPLE
        vmap = sampling.voxel_map(scan, target)
        again = sampling.voxel_map(scan.copy(), target)
        np.testing.assert_array_equal(vmap.cell_rep, again.cell_rep)
        np.testing.assert_array_equal(vmap.cell_of_raw, again.cell_of_raw)
        cells = len(vmap.cell_rep)
        assert 0.5 * target <= cells <= 2 * target, (name, cells)
        assert vmap.cell_of_raw.dtype == np.int32 and vmap.cell_of_raw.shape == (len(scan),)
        assert set(np.unique(vmap.cell_of_raw)) == set(range(cells))  # every cell has points, all are listed
        lowest = np.full(cells, len(scan))
        np.minimum.at(lowest, vmap.cell_of_raw, np.arange(len(scan)))
        np.testing.assert_array_equal(vmap.cell_rep, lowest)
        spread = np.abs(scan - scan[vmap.cell_rep[vmap.cell_of_raw]]).max()
        assert spread <= vmap.voxel * (1 + 1e-5), (name, spread, vmap.voxel)
        monkeypatch.setattr(sampling, "DENSE_GRID_MAX_CELLS", 0)  # the sorted-keys path
        sparse = sampling.voxel_map(scan, target)
        monkeypatch.undo()
        np.testing.assert_array_equal(sparse.cell_rep, vmap.cell_rep)
        np.testing.assert_array_equal(sparse.cell_of_raw, vmap.cell_of_raw)


def test_voxel_downsampling_is_deterministic_and_spread(scans_100k):
    from btp.geometry.sampling import voxel_downsample

    for name, scan in scans_100k.items():
        idx, vmap = voxel_downsample(scan, 2048, 5)
        idx2, _ = voxel_downsample(scan, 2048, 5)
        np.testing.assert_array_equal(idx, idx2)
        assert idx.dtype == np.int64 and len(np.unique(idx)) == 2048
        assert np.isin(idx, vmap.cell_rep).all()  # samples are representatives
        exact_cover = _coverage(scan, fps(scan, 2048, 5))
        assert _coverage(scan, idx) < 1.5 * exact_cover, name
        # with the scan checks' bounds the points are taken as checked: the same samples
        from btp.geometry.sampling import column_bounds

        np.testing.assert_array_equal(voxel_downsample(scan, 2048, 5, column_bounds(scan))[0], idx)
    bad = next(iter(scans_100k.values())).copy()
    bad[7] = np.nan
    with pytest.raises(GeometryError, match="NaN"):  # without them, they are checked
        voxel_downsample(bad, 2048, 5)


def test_voxel_gather_interpolation_within_its_bound_of_the_exact_rule(scans_100k):
    """``interpolate`` with the voxel map against the exact nearest-neighbour rule, on 100k-point
    real scans: each raw point takes the sample nearest its cell's representative, which is at
    most 2 cell diagonals farther from the point than its own nearest sample (the documented
    approximation); where both rules pick the same sample the scores are equal; on these scans
    most points get the very same sample, and more of them with finer cells."""
    from dataclasses import replace

    from btp.config import btp_mini_config
    from btp.geometry.prepare import interpolate, prepare

    base = btp_mini_config()
    agree = {}
    for (name, scan), reps in [(item, reps) for item in scans_100k.items() for reps in (base.preprocess.voxel_reps, 8)]:
        cfg = replace(base, preprocess=replace(base.preprocess, voxel_reps=reps))
        prep = prepare(scan, cfg, group=False)
        assert prep.voxel_map is not None  # auto above 16384 points
        labels = np.arange(len(prep.sample_idx), dtype=np.float32)  # score = the sample's own index
        fast = interpolate(labels, prep, cfg).astype(np.int64)
        exact = interpolate(labels, prep, cfg, exact=True).astype(np.int64)
        sampled = scan[prep.sample_idx]
        d_fast = np.linalg.norm(scan - sampled[fast], axis=1)
        d_exact = np.linalg.norm(scan - sampled[exact], axis=1)
        bound = 2 * np.sqrt(3) * prep.voxel_map.voxel
        assert (d_exact <= d_fast + 1e-6).all()  # the exact rule is the nearest
        assert (d_fast - d_exact <= bound * (1 + 1e-5)).all(), (name, (d_fast - d_exact).max(), bound)
        same = fast == exact
        agree[name, reps] = same.mean()
        assert same.mean() > 0.5, (name, reps, same.mean())
        scores = np.random.default_rng(0).random(len(labels)).astype(np.float32)
        np.testing.assert_array_equal(interpolate(scores, prep, cfg)[same],
                                      interpolate(scores, prep, cfg, exact=True)[same])
    for name in scans_100k:
        assert agree[name, 8] > agree[name, base.preprocess.voxel_reps], (name, agree)


def test_prepare_keeps_a_voxel_map_only_for_the_voxel_rule(bunny_20k):
    from btp.config import btp_mini_config
    from btp.geometry.prepare import prepare

    cfg = btp_mini_config()
    assert prepare(bunny_20k, cfg, "exact", group=False).voxel_map is None
    assert prepare(bunny_20k, cfg, "bucket", group=False).voxel_map is None
    assert prepare(bunny_20k[:2000], cfg, "voxel", group=False).voxel_map is None  # M <= N: all points
    assert prepare(bunny_20k[:3000], cfg, group=False).voxel_map is not None  # auto: voxel for any M > N
    assert prepare(bunny_20k, cfg, group=False).voxel_map is not None


def test_voxel_cells_per_sample_come_from_the_model_config(scans_100k):
    """``preprocess.voxel_reps`` sizes the voxel grid of the runtime chain: about that many cells
    per sampled point, the same samples as ``voxel_downsample`` with that ``reps``; fewer cells,
    other samples; a value below 1 is refused by the config and by the rule."""
    from dataclasses import replace

    from btp.config import btp_mini_config
    from btp.geometry.prepare import prepare
    from btp.geometry.sampling import voxel_downsample

    scan = next(iter(scans_100k.values()))
    base = btp_mini_config()
    n = base.preprocess.num_points
    cells = {}
    for reps in (2, 6):
        cfg = replace(base, preprocess=replace(base.preprocess, voxel_reps=reps)).validate()
        prep = prepare(scan, cfg, group=False)
        cells[reps] = len(prep.voxel_map.cell_rep)
        assert 0.5 * reps * n <= cells[reps] <= 2 * reps * n, (reps, cells[reps])
        np.testing.assert_array_equal(prep.sample_idx, voxel_downsample(scan, n, cfg.preprocess.fps_start, reps=reps)[0])
    assert cells[2] < cells[6]
    with pytest.raises(ValueError, match="voxel_reps"):
        replace(base, preprocess=replace(base.preprocess, voxel_reps=0)).validate()
    with pytest.raises(GeometryError, match="reps"):
        voxel_downsample(scan, n, 0, reps=0)


# ---- kNN ----------------------------------------------------------------------------------------

def _assert_sorted_rule(points, queries, idx, dist2):
    """Rows sorted by (dist2, index) and dist2 recomputed by the float32 rule."""
    diff = points[idx] - queries[:, None, :]
    recomputed = (diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1]) + diff[..., 2] * diff[..., 2]
    np.testing.assert_array_equal(dist2, recomputed)
    order_ok = (dist2[:, 1:] > dist2[:, :-1]) | ((dist2[:, 1:] == dist2[:, :-1]) & (idx[:, 1:] > idx[:, :-1]))
    assert order_ok.all()


@pytest.mark.parametrize("name", MESHES)
def test_knn_matches_reference_on_real_meshes(mesh_clouds, name):
    cloud = mesh_clouds[name]
    centers = cloud[fps(cloud, 256, 0)]
    off_cloud = centers + np.float32(0.003)  # queries that are not cloud points
    for queries in (centers, off_cloud):
        idx, dist2 = knn(cloud, queries, 32)
        ref_idx, ref_dist2 = knn_reference(cloud, queries, 32)
        assert idx.dtype == np.int64 and dist2.dtype == np.float32 and idx.shape == (256, 32)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_array_equal(dist2, ref_dist2)
        _assert_sorted_rule(cloud, queries, idx, dist2)
        # independent check of the reference itself: scipy's distances
        tree_dist, _ = cKDTree(cloud.astype(np.float64)).query(queries.astype(np.float64), k=32)
        np.testing.assert_allclose(np.sqrt(ref_dist2), tree_dist, rtol=1e-5, atol=1e-6)


def test_knn_ties_on_lattice_and_duplicates(mesh_clouds):
    grid = lattice(7)  # 343 points, each row full of equal distances, also at the k-th boundary
    queries = grid[::5]
    for k in (1, 7, 19, 27):
        idx, dist2 = knn(grid, queries, k)
        ref_idx, ref_dist2 = knn_reference(grid, queries, k)
        np.testing.assert_array_equal(dist2, ref_dist2)
        np.testing.assert_array_equal(idx, ref_idx)  # even the boundary ties: lowest indices get in
        _assert_sorted_rule(grid, queries, idx, dist2)
        # as index sets with equal distances (what other backends are compared by)
        for row in range(len(queries)):
            assert set(idx[row]) == set(ref_idx[row])
    dup = duplicated(mesh_clouds[MESHES[2]][:200], 4, seed=3)
    idx, dist2 = knn(dup, dup[:50], 10)
    ref_idx, ref_dist2 = knn_reference(dup, dup[:50], 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(dist2, ref_dist2)
    assert (dist2[:, :4] == 0).all()  # a duplicated query finds its 4 copies first


def test_knn_edge_cases(mesh_clouds):
    cloud = mesh_clouds[MESHES[0]][:50]
    idx, dist2 = knn(cloud, cloud[:3], 50)  # k == N: the whole cloud, sorted
    np.testing.assert_array_equal(idx, knn_reference(cloud, cloud[:3], 50)[0])
    assert sorted(idx[0]) == list(range(50)) and (idx[:, 0] == [0, 1, 2]).all()
    empty_idx, empty_dist2 = knn(cloud, np.zeros((0, 3), np.float32), 4)
    assert empty_idx.shape == (0, 4) and empty_dist2.shape == (0, 4)
    with pytest.raises(GeometryError, match="k="):
        knn(cloud, cloud[:2], 51)


# ---- grouping -----------------------------------------------------------------------------------

def test_group_contract(mesh_clouds):
    cloud = mesh_clouds[MESHES[0]]
    groups = group(cloud, 128, 16, start_idx=5)
    assert isinstance(groups, Groups)
    np.testing.assert_array_equal(groups.center_idx, fps(cloud, 128, 5))
    np.testing.assert_array_equal(groups.center, cloud[groups.center_idx])
    np.testing.assert_array_equal(groups.patch_idx, knn(cloud, groups.center, 16)[0])
    assert groups.neighborhood.shape == (128, 16, 6) and groups.neighborhood.dtype == np.float32
    np.testing.assert_array_equal(groups.neighborhood[..., :3],
                                  cloud[groups.patch_idx] - groups.center[:, None, :])
    assert (groups.neighborhood[..., 3:] == np.float32(0.5)).all()
    np.testing.assert_array_equal(groups.patch_idx[:, 0], groups.center_idx)  # distinct points

    colours = np.random.default_rng(0).random(cloud.shape, dtype=np.float32)
    coloured = group(cloud, 128, 16, start_idx=5, colors=colours)
    np.testing.assert_array_equal(coloured.neighborhood[..., 3:], colours[coloured.patch_idx])
    xyz_only = group(cloud, 128, 16, start_idx=5, rgb_fill=0.2, in_channels=3)
    assert xyz_only.neighborhood.shape == (128, 16, 3)
    with pytest.raises(GeometryError, match="in_channels"):
        group(cloud, 128, 16, in_channels=4)


def test_group_batch_stacks_per_cloud_results(mesh_clouds):
    batch = np.stack([mesh_clouds[name] for name in MESHES[:2]])  # [2, 2048, 3]
    batched = group_batch(batch, 64, 8, start_idx=3)
    assert batched.neighborhood.shape == (2, 64, 8, 6) and batched.center.shape == (2, 64, 3)
    for b in range(2):
        single = group(batch[b], 64, 8, start_idx=3)
        for got, expected in zip(batched, single):
            np.testing.assert_array_equal(got[b], expected)


# ---- normalisation ------------------------------------------------------------------------------

def test_normalize_round_trip(mesh_clouds):
    cloud = mesh_clouds[MESHES[1]] * np.float32(40.0) + np.float32([5, -3, 100])
    normed, origin, scale = normalize(cloud)
    assert normed.dtype == np.float32 and origin.dtype == np.float32 and origin.shape == (3,)
    np.testing.assert_allclose(normed.mean(0), 0.0, atol=1e-6)
    assert np.linalg.norm(normed, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(denormalize(normed, origin, scale), cloud, rtol=0, atol=1e-4)


def test_normalize_degenerate_cloud():
    with pytest.raises(DegenerateCloudError, match="coincide"):
        normalize(np.tile(np.float32([1, 2, 3]), (10, 1)))


# ---- FPFH ---------------------------------------------------------------------------------------

def test_fpfh_patches_shape_and_histograms(mesh_clouds):
    normed, _, _ = normalize(mesh_clouds[MESHES[0]])
    groups = group(normed, 64, 16)
    features = fpfh_patches(normed, groups.patch_idx, GFCMConfig())
    assert features.shape == (64, 33) and features.dtype == np.float32
    assert np.isfinite(features).all() and (features >= 0).all()
    # open3d FPFH = three 11-bin histograms, each summing to 200 per point (own SPFH 100 +
    # distance-weighted neighbours' 100); the max over a patch's points sums to >= 200 per block
    blocks = features.reshape(64, 3, 11).sum(-1)
    assert (blocks >= 200 - 1e-2).all()
    # a patch made of one point repeated = that point's own FPFH (max of equal rows)
    single = fpfh_patches(normed, np.full((1, 16), groups.center_idx[0]), GFCMConfig())
    np.testing.assert_allclose(single.reshape(3, 11).sum(-1), 200.0, rtol=1e-4)
    with pytest.raises(GeometryError, match="patch_idx"):
        fpfh_patches(normed, groups.patch_idx + len(normed), GFCMConfig())


# ---- scores: patches -> points -> raw scan ------------------------------------------------------

def test_propagate_toy_case():
    points = np.float32([[0, 0, 0], [1, 0, 0], [2, 0, 0], [2.4, 0, 0], [-0.7, 0, 0]])
    patch_idx = np.array([[0, 1], [1, 2]])  # point 1 is in both patches; 3 and 4 in none
    center = points[[0, 2]]
    scores = propagate_patch_scores(np.float32([1.0, 3.0]), patch_idx, center, points)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.0, 2.0, 3.0, 3.0, 1.0])  # 3 -> center 2, 4 -> center 0
    batched = propagate_patch_scores(np.float32([[1.0, 3.0], [5.0, 7.0]]), np.stack([patch_idx] * 2),
                                     np.stack([center] * 2), np.stack([points] * 2))
    np.testing.assert_allclose(batched, [[1, 2, 3, 3, 1], [5, 6, 7, 7, 5]])
    # per-point scores [G, K]: point 1 averages its own score in both patches; uncovered points
    # still take their nearest center's patch score
    own = propagate_patch_scores(np.float32([1.0, 3.0]), patch_idx, center, points,
                                 point_scores=np.float32([[0.5, 0.2], [0.6, 0.9]]))
    np.testing.assert_allclose(own, [0.5, 0.4, 0.9, 3.0, 1.0])
    with pytest.raises(GeometryError, match="point_scores"):
        propagate_patch_scores(np.float32([1.0, 3.0]), patch_idx, center, points, point_scores=np.zeros(2))


def test_propagate_on_real_groups(mesh_clouds):
    cloud = mesh_clouds[MESHES[1]]
    groups = group(cloud, 128, 16)
    patch_scores = np.random.default_rng(1).random(128).astype(np.float32)
    point_scores = propagate_patch_scores(patch_scores, groups.patch_idx, groups.center, cloud)
    # brute-force check: mean over the patches that list each point, else nearest center
    for point in range(0, len(cloud), 97):
        containing = np.nonzero((groups.patch_idx == point).any(1))[0]
        if containing.size:
            expected = patch_scores[containing].mean()
        else:
            expected = patch_scores[np.argmin(((groups.center - cloud[point]) ** 2).sum(1))]
        assert point_scores[point] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["nearest", "idw3"])
def test_interpolate_identity_and_constant(mesh_clouds, method):
    cloud = mesh_clouds[MESHES[0]]
    scores = np.random.default_rng(2).random(len(cloud)).astype(np.float32)
    np.testing.assert_array_equal(interpolate_to_raw(cloud, scores, cloud, method), scores)
    raw = mesh_clouds[MESHES[0]] + np.float32(0.002)
    constant = interpolate_to_raw(cloud, np.full(len(cloud), 0.25, np.float32), raw, method)
    np.testing.assert_allclose(constant, 0.25, rtol=1e-6)
    carried = interpolate_to_raw(cloud, scores, raw, method)
    assert carried.shape == (len(raw),) and carried.dtype == np.float32
    idx, dist2 = knn_reference(cloud, raw, 3)
    if method == "nearest":
        np.testing.assert_array_equal(carried, scores[idx[:, 0]])
    else:
        weights = 1.0 / np.sqrt(dist2.astype(np.float64))
        np.testing.assert_allclose(carried, (weights * scores[idx]).sum(1) / weights.sum(1), rtol=1e-5)


def test_interpolate_rejects_unknown_method(mesh_clouds):
    cloud = mesh_clouds[MESHES[0]][:10]
    with pytest.raises(GeometryError, match="raw_interpolation"):
        interpolate_to_raw(cloud, np.zeros(10), cloud, method="linear")


def test_fps_without_fpsample_gives_the_same_indices(shapes_root, monkeypatch):
    """Machines without fpsample >= 1.0 (aarch64 cp310) run the numpy rule: identical indices;
    the bucket downsampling becomes the voxel rule."""
    from btp.geometry import sampling
    from btp.io import load_mesh, sample_surface

    v, f = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    pts = sample_surface(v, f, 3000, 0)[0]
    fast = sampling.fps(pts, 256, 17)
    big = sample_surface(v, f, 20000, 1)[0]
    monkeypatch.setattr(sampling, "_fpsample", lambda: None)
    np.testing.assert_array_equal(sampling.fps(pts, 256, 17), fast)
    np.testing.assert_array_equal(sampling.downsample(big, 512, 0, "bucket"), sampling.downsample(big, 512, 0, "voxel"))
