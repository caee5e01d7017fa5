"""`btp-bench ops`: our FPS and kNN (btp.geometry) against the libraries, same inputs, outputs checked.

For every (N, G) the same unit-sphere cloud (sampled from a real mesh) goes to every
implementation; K = 32. Each row has the median time, its ratio to ours, and a check of its
output against the truth:

- FPS truth: ``btp.geometry.fps_reference`` (the rule) where N*G is small enough, else ours
  (tests/test_geometry.py pins ours == reference). ``same_order`` = fraction of the G positions
  whose index equals the truth's; ``cover`` = covering radius (max distance of any point to
  its nearest sample) relative to the truth's — the quality an approximate FPS gives up.
  ``same_set`` = fraction of the truth's centers picked at all: the encoder is permutation-
  equivariant over patches, so an identical *set* in another order gives the same scores.
- kNN truth: ``btp.geometry.knn_reference`` where N*G is small enough, else ours. ``same_set``
  = mean fraction of each row's index set found; ``same_order`` = identical positions;
  ``quality`` = max abs error of the sorted squared distances.
- Raw-scan downsampling (op ``downsample``, a scan of M = N points reduced to the model's 2048;
  the G column is 2048): ``btp.geometry`` is ``downsample``'s default rule (``auto`` outside a
  canonical order: the voxel rule; a model sampling in canonical order, as the default does, takes
  the anchored bucket FPS up to 8N points instead), against our exact and voxel rules and the
  libraries. Truth:
  the exact rule; ``quality`` = covering radius relative to it.

Times include what a caller pays per scan: building the tree, converting to the library's
point type. Libraries run on all usable cores (their defaults); ours too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, Sequence

import numpy as np

from btp.benchmarks.data import sample_cloud, unit_sphere
from btp.benchmarks.stats import median_ms

DEFAULT_POINTS = (2048, 8192, 40000, 400000)
DEFAULT_GROUPS = (512, 1024)
DEFAULT_K = 32
# truth by the numpy reference only below these sizes (it is O(N*G) in Python-driven numpy)
_FPS_REFERENCE_MAX = 50_000_000
_KNN_REFERENCE_MAX = 1 << 24
# the implementations that are ours (ratios are against "ours"; the goal against libraries)
OURS = "btp.geometry"
REFERENCE = "numpy reference"


@dataclass(frozen=True, kw_only=True)
class OpRow:
    op: str  # "fps" | "knn"
    impl: str
    n_points: int
    n_groups: int
    k: int | None
    median_ms: float | None  # None when skipped
    same_order: float | None  # fraction of positions whose index equals the truth's
    same_set: float | None  # fps: |set ∩ truth set| / G; knn: mean per-row |set ∩ truth set| / K
    quality: float | None  # fps: covering-radius ratio to the truth; knn: max abs dist2 error
    exact: bool  # fps: identical index sequence; knn: identical index sets and distances
    note: str = ""
    skipped: str = ""  # reason, when the implementation could not run

    def to_dict(self) -> dict:
        return asdict(self)


# ---- FPS implementations: (points float32 [N,3], n, start) -> int64 [n] -----------------------

def _fps_ours(pts, n, start):
    from btp.geometry import fps

    return fps(pts, n, start)


def _fps_reference(pts, n, start):
    from btp.geometry import fps_reference

    return fps_reference(pts, n, start)


def _fps_fpsample_vanilla(pts, n, start):
    import fpsample

    return fpsample.fps_sampling(pts, n, start_idx=start).astype(np.int64)


def _bucket_height(n_points: int) -> int:
    # fpsample's README: h=3 small, 5-7 medium, 9 large workloads
    return 3 if n_points <= 4096 else 5 if n_points <= 16384 else 7


def _fps_fpsample_bucket(pts, n, start, h: int | None = None):
    import fpsample

    h = h or _bucket_height(len(pts))
    return fpsample.bucket_fps_kdline_sampling(pts, n, h=h, start_idx=start).astype(np.int64)


def _fps_open3d(pts, n, start):
    """open3d returns a point cloud, not indices: the index rides along in the colour channel
    (float64 holds integers exactly), so the timed call yields indices (in ascending order)."""
    import open3d as o3d

    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts.astype(np.float64)))
    carrier = np.zeros((len(pts), 3))
    carrier[:, 0] = np.arange(len(pts))
    cloud.colors = o3d.utility.Vector3dVector(carrier)
    return np.asarray(cloud.farthest_point_down_sample(n, start).colors)[:, 0].astype(np.int64)


def _cuda_or_skip():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device for torch on this machine")
    return torch


def _fps_torch(pts, n, start, device="cpu"):
    import torch

    p = torch.from_numpy(pts).to(device)
    min_d2 = torch.full((p.shape[0],), float("inf"), device=device)
    out = torch.empty(n, dtype=torch.int64, device=device)
    last = start
    for i in range(n):
        out[i] = last
        d2 = ((p - p[last]) ** 2).sum(dim=1)
        torch.minimum(min_d2, d2, out=min_d2)
        last = int(torch.argmax(min_d2))  # a host sync per step on CUDA, as a plain loop does
    return out.cpu().numpy()


def _fps_torch_cuda(pts, n, start):
    _cuda_or_skip()
    return _fps_torch(pts, n, start, device="cuda")


def _downsample_rule(method: str) -> Callable:
    def run(pts, n, start):
        from btp.geometry import downsample

        return downsample(pts, n, start, method)

    return run


# raw scan [M, 3] -> the model's N points; "btp ..." rows are ours too (not libraries)
DOWNSAMPLE_N = 2048
DOWNSAMPLE_IMPLS: dict[str, Callable] = {
    OURS: _downsample_rule("auto"),
    "btp exact rule": _downsample_rule("exact"),
    "btp voxel rule": _downsample_rule("voxel"),
    "fpsample bucket (kdline)": partial(_fps_fpsample_bucket, h=7),
    "open3d farthest_point_down_sample": _fps_open3d,
}
# what the product runs in each role (the ops report's "the product runs" column)
PRODUCT_RUNS = {
    "fps": "btp.geometry.fps: fpsample vanilla on the reversed cloud (the exact rule, lowest-index ties)",
    "knn": "btp.geometry.knn: pykdtree with k + 8 candidates, rows re-sorted by (dist2, index)",
}


def product_runs(op: str, n_points: int) -> str:
    if op != "downsample":
        return PRODUCT_RUNS[op]
    from btp.geometry.sampling import VOXEL_REPS_PER_SAMPLE

    return (f"auto = the voxel rule (one grid pass, fpsample bucket over <= ~{VOXEL_REPS_PER_SAMPLE}N representatives; "
            "in a canonical order up to 8N points: the anchored bucket FPS over all points)")


FPS_IMPLS: dict[str, Callable] = {
    OURS: _fps_ours,
    REFERENCE: _fps_reference,
    "fpsample vanilla": _fps_fpsample_vanilla,
    "fpsample bucket (kdline)": _fps_fpsample_bucket,
    "open3d farthest_point_down_sample": _fps_open3d,
    "torch CPU loop": _fps_torch,
    "torch CUDA loop": _fps_torch_cuda,
}


# ---- kNN implementations: (points [N,3], queries [G,3], k) -> (idx [G,k], dist2 [G,k]) --------

def _knn_ours(pts, q, k):
    from btp.geometry import knn

    return knn(pts, q, k)


def _knn_reference(pts, q, k):
    from btp.geometry import knn_reference

    return knn_reference(pts, q, k)


def _knn_pykdtree(pts, q, k):
    from pykdtree.kdtree import KDTree

    d, i = KDTree(pts).query(q, k=k)
    return i.astype(np.int64), (d.astype(np.float32) ** 2)


def _knn_ckdtree(pts, q, k):
    from scipy.spatial import cKDTree

    d, i = cKDTree(pts).query(q, k=k, workers=-1)
    return i.astype(np.int64), (d.astype(np.float32) ** 2)


def _knn_open3d(pts, q, k):
    import open3d.core as o3c

    nns = o3c.nns.NearestNeighborSearch(o3c.Tensor.from_numpy(pts))
    nns.knn_index()
    idx, d2 = nns.knn_search(o3c.Tensor.from_numpy(np.ascontiguousarray(q)), k)
    return idx.numpy().astype(np.int64), d2.numpy().astype(np.float32)


def _knn_torch(pts, q, k, device="cpu"):
    import torch

    d = torch.cdist(torch.from_numpy(q).to(device), torch.from_numpy(pts).to(device))  # [G, N]
    d2, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    return idx.cpu().numpy(), (d2.cpu().numpy() ** 2)  # the copy back synchronises the stream


def _knn_torch_cuda(pts, q, k):
    _cuda_or_skip()
    return _knn_torch(pts, q, k, device="cuda")


KNN_IMPLS: dict[str, Callable] = {
    OURS: _knn_ours,
    REFERENCE: _knn_reference,
    "pykdtree": _knn_pykdtree,
    "scipy cKDTree": _knn_ckdtree,
    "open3d nns (knn_search)": _knn_open3d,
    "torch CPU cdist+topk": _knn_torch,
    "torch CUDA cdist+topk": _knn_torch_cuda,
}


# ---- checks (pure) -------------------------------------------------------------------------

def covering_radius(points: np.ndarray, samples: np.ndarray) -> float:
    """max over points of the distance to the nearest sample point."""
    from pykdtree.kdtree import KDTree

    d, _ = KDTree(np.ascontiguousarray(samples, dtype=np.float32)).query(points, k=1)
    return float(np.max(d))


def order_agreement(truth_idx: np.ndarray, idx: np.ndarray) -> float:
    """Fraction of positions whose index equals the truth's (any shape)."""
    return float(np.mean(np.asarray(truth_idx) == np.asarray(idx)))


def set_agreement(truth_idx: np.ndarray, idx: np.ndarray) -> float:
    """|truth ∩ idx| / len(truth) for 1-D index arrays."""
    truth_idx = np.asarray(truth_idx)
    return len(np.intersect1d(truth_idx, np.asarray(idx))) / len(truth_idx)


def knn_agreement(truth_idx: np.ndarray, idx: np.ndarray) -> float:
    """Mean over rows of |truth set ∩ set| / k."""
    truth_idx, idx = np.asarray(truth_idx), np.asarray(idx)
    k = truth_idx.shape[1]
    return float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(truth_idx, idx)]))


# ---- runner --------------------------------------------------------------------------------

def _run_fps(name, fn, pts, g, truth_idx, truth_cover, repeat, max_s):
    if name == REFERENCE and len(pts) * g > _FPS_REFERENCE_MAX:
        return OpRow(op="fps", impl=name, n_points=len(pts), n_groups=g, k=None, median_ms=None, same_order=None,
                     same_set=None, quality=None, exact=False,
                     skipped=f"numpy reference skipped above N*G = {_FPS_REFERENCE_MAX:.0e} (takes seconds)")
    ms, out = median_ms(lambda: fn(pts, g, 0), repeat=repeat, max_s=max_s)
    note = "indices ride in the colour channel; returned in ascending order" if name.startswith("open3d") else ""
    if name == "fpsample bucket (kdline)":
        note = f"h={_bucket_height(len(pts))}; ignores start_idx order (anchors.md)"
    same = order_agreement(truth_idx, out)
    cover = covering_radius(pts, pts[out]) / truth_cover
    return OpRow(op="fps", impl=name, n_points=len(pts), n_groups=g, k=None, median_ms=ms, same_order=same,
                 same_set=set_agreement(truth_idx, out), quality=cover, exact=same == 1.0, note=note)


def _run_knn(name, fn, pts, q, k, truth, repeat, max_s):
    if name == REFERENCE and len(pts) * len(q) > _KNN_REFERENCE_MAX:
        return OpRow(op="knn", impl=name, n_points=len(pts), n_groups=len(q), k=k, median_ms=None, same_order=None,
                     same_set=None, quality=None, exact=False,
                     skipped=f"numpy brute force skipped above N*G = {_KNN_REFERENCE_MAX:.1e}")
    ms, (idx, d2) = median_ms(lambda: fn(pts, q, k), repeat=repeat, max_s=max_s)
    same = knn_agreement(truth[0], idx)
    err = float(np.max(np.abs(np.sort(d2, axis=1) - truth[1])))
    exact = same == 1.0 and err <= 1e-6 * max(1.0, float(np.max(truth[1])))
    note = "brute force via matmul expansion" if name.startswith("torch") else ""
    note += "; host->device copies included" if "CUDA" in name else ""
    return OpRow(op="knn", impl=name, n_points=len(pts), n_groups=len(q), k=k, median_ms=ms,
                 same_order=order_agreement(truth[0], idx), same_set=same, quality=err, exact=exact, note=note)


def run_ops(points: Sequence[int] = DEFAULT_POINTS, groups: Sequence[int] = DEFAULT_GROUPS,
            k: int = DEFAULT_K, *, impls: Sequence[str] | None = None, mesh: str | None = None,
            repeat: int = 7, max_s: float = 5.0, threads: int | None = None,
            progress: Callable[[str], None] | None = None) -> list[OpRow]:
    """Benchmark every FPS and kNN implementation at every (N, G); returns one row per run."""
    if threads is not None:
        _set_threads(threads)
    rows: list[OpRow] = []
    for n in points:
        pts = unit_sphere(sample_cloud(n, mesh=mesh, seed=0))
        for g in groups:
            if g > n:
                continue
            truth_fn = _fps_reference if n * g <= _FPS_REFERENCE_MAX else _fps_ours
            truth_idx = truth_fn(pts, g, 0)
            truth_cover = covering_radius(pts, pts[truth_idx])
            queries = pts[truth_idx]
            knn_truth = (_knn_reference if n * g <= _KNN_REFERENCE_MAX else _knn_ours)(pts, queries, k)
            for name, fn in FPS_IMPLS.items():
                if impls and name not in impls and name != OURS:
                    continue
                if progress:
                    progress(f"fps  N={n} G={g} {name}")
                rows.append(_guard(lambda: _run_fps(name, fn, pts, g, truth_idx, truth_cover, repeat, max_s),
                                   "fps", name, n, g, None))
            for name, fn in KNN_IMPLS.items():
                if impls and name not in impls and name != OURS:
                    continue
                if progress:
                    progress(f"knn  N={n} G={g} {name}")
                rows.append(_guard(lambda: _run_knn(name, fn, pts, queries, k, knn_truth, repeat, max_s),
                                   "knn", name, n, g, k))
        if n > DOWNSAMPLE_N:
            rows += _run_downsample(pts, impls, repeat, max_s, progress)
    return rows


def _run_downsample(pts, impls, repeat, max_s, progress) -> list[OpRow]:
    n, g = len(pts), DOWNSAMPLE_N
    truth_idx = _downsample_rule("exact")(pts, g, 0)
    truth_cover = covering_radius(pts, pts[truth_idx])
    rows = []
    for name, fn in DOWNSAMPLE_IMPLS.items():
        if impls and name not in impls and name != OURS:
            continue
        if progress:
            progress(f"downsample  M={n} -> {g} {name}")

        def one(fn=fn, name=name):
            ms, out = median_ms(lambda: fn(pts, g, 0), repeat=repeat, max_s=max_s)
            same = order_agreement(truth_idx, out)
            cover = covering_radius(pts, pts[out]) / truth_cover
            return OpRow(op="downsample", impl=name, n_points=n, n_groups=g, k=None, median_ms=ms, same_order=same,
                         same_set=set_agreement(truth_idx, out), quality=cover, exact=same == 1.0)

        rows.append(_guard(one, "downsample", name, n, g, None))
    return rows


def _guard(call, op, name, n, g, k) -> OpRow:
    try:
        return call()
    except ImportError as exc:
        return OpRow(op=op, impl=name, n_points=n, n_groups=g, k=k, median_ms=None, same_order=None, same_set=None,
                     quality=None, exact=False, skipped=f"not installed: {exc}")
    except Exception as exc:  # noqa: BLE001 - a failing library is a row, never a crash
        return OpRow(op=op, impl=name, n_points=n, n_groups=g, k=k, median_ms=None, same_order=None, same_set=None,
                     quality=None, exact=False, skipped=f"{type(exc).__name__}: {exc}")


def _set_threads(threads: int) -> None:
    import os

    os.environ["OMP_NUM_THREADS"] = str(threads)  # pykdtree reads it at import
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


# ---- ratios and the goal -------------------------------------------------------------------

def ops_summary(rows: Sequence[OpRow], goal_ratio: float = 1.2) -> list[dict]:
    """Per (op, N, G): ours, the best library overall, the best library with the same output,
    and the ratios.

    Libraries = every CPU implementation but ours and the numpy reference. "Same output" = the
    identical index set (FPS centers in any order / kNN rows). ``meets_goal`` = ours <=
    goal_ratio x the best library of all (approximate FPS counts too).
    """
    out = []
    keys = sorted({(r.op, r.n_points, r.n_groups) for r in rows})
    for op, n, g in keys:
        group = [r for r in rows if (r.op, r.n_points, r.n_groups) == (op, n, g) and r.median_ms is not None]
        ours = next((r for r in group if r.impl == OURS), None)
        libs = [r for r in group if r.impl not in (OURS, REFERENCE) and "CUDA" not in r.impl  # CPU goal
                and not r.impl.startswith("btp ")]
        if ours is None or not libs:
            continue
        best = min(libs, key=lambda r: r.median_ms)
        exact_libs = [r for r in libs if r.same_set == 1.0]
        best_exact = min(exact_libs, key=lambda r: r.median_ms) if exact_libs else None
        ratio = ours.median_ms / best.median_ms
        out.append({
            "op": op, "n_points": n, "n_groups": g, "product_runs": product_runs(op, n),
            "ours_ms": ours.median_ms, "ours_exact": ours.exact,
            "best_library": best.impl, "best_ms": best.median_ms, "ratio_vs_best": ratio,
            "best_exact_library": best_exact.impl if best_exact else None,
            "best_exact_ms": best_exact.median_ms if best_exact else None,
            "ratio_vs_best_exact": ours.median_ms / best_exact.median_ms if best_exact else None,
            "meets_goal": ratio <= goal_ratio,
        })
    return out
