"""Synthetic defects on real shapes: normal and anomalous point clouds with per-point labels.

Torch-free (numpy, scipy, open3d). One sample is made in this order:

1. sample ``oversample * N`` points area-weighted from the mesh, with normals interpolated
   from area-weighted vertex normals (smooth across faces);
2. optionally keep only what one camera sees (open3d hidden-point removal = a partial scan);
3. for an anomalous sample, apply one defect (below) and label the points whose geometry changed;
4. keep N points at random (labelled points keep their share), re-place the object by a small
   random pose, add Gaussian noise (labels follow the clean geometry, noise does not change them).

Defects (`DEFECT_TYPES`), sizes relative to the object size = bounding-box diagonal:

- ``bulge`` / ``dent``: points near a center move along the center's normal by
  ``h * (1 - t^2)^2`` (t = distance / radius), h = +-1..5 %; labelled where the move exceeds
  ``label_threshold``. The radius is solved so the labelled share hits a random target.
- ``hole``: material inside a ball is removed; the rim (a ring of ~2 point spacings) is labelled.
- ``crack`` / ``groove``: a (slightly curved) line on the surface is cut in along the normal
  with a smooth cross-section profile; a crack is narrow and deep, a groove wide and shallow.
- ``broken``: a plane cuts off an extremity; the fracture face is filled with rough points and
  labelled together with a band of the remaining surface along the break.

More kinds (`EXTRA_DEFECT_TYPES`, off by default: a recipe names them in ``defect_types``):

- ``added``: material stuck on (a spatter, a drop of glue): points near a center move out along
  its normal by ``h * sqrt(1 - t^2)``, a cap with a steep rim where it meets the surface (a bulge
  fades in smoothly); ``h`` at most the cap's radius.
- ``scratch``: a long, narrow and shallow line (V profile) cut in along the normal, a third of
  a crack's depth.
- ``chip``: material knocked off an edge: the center is drawn among the most curved points, and
  the points around it move in along their mean normal by ``0.5 r (1 - t)``, a cone that bevels
  the edge with a sharp rim.

The labelled share of points lies in ``frac_range`` (0.5-8 % by default); every sample is fixed
by its seed (`sample_seed` derives per-sample seeds from a root seed, class, split and index).
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from scipy.spatial import cKDTree

from btp.io import load_mesh, write_point_cloud

DEFECT_TYPES: tuple[str, ...] = ("bulge", "dent", "hole", "crack", "groove", "broken")
EXTRA_DEFECT_TYPES: tuple[str, ...] = ("added", "scratch", "chip")
ALL_DEFECT_TYPES: tuple[str, ...] = DEFECT_TYPES + EXTRA_DEFECT_TYPES
LAYOUTS: tuple[str, ...] = ("anomaly-shapenet", "real3d")


class SynthError(ValueError):
    """A synthetic sample could not be made (bad mesh, impossible size); names mesh and reason."""


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """How synthetic samples look. Sizes are fractions of the object size (bbox diagonal)."""

    num_points: int = 8192  # points per written cloud (the "raw scan"; the model FPS-samples N of it)
    oversample: float = 1.5  # dense sample = oversample * num_points before defects / subsampling
    noise: float = 0.0005  # Gaussian sigma per coordinate; 0 = none
    partial_prob: float = 0.0  # chance that a sample is a single-view partial scan (hidden-point removal)
    pose_deg: float = 10.0  # random re-placement: rotation up to this many degrees ...
    pose_shift: float = 0.02  # ... and translation up to this much per axis
    frac_range: tuple[float, float] = (0.005, 0.08)  # labelled share of points of an anomalous sample
    depth_range: tuple[float, float] = (0.01, 0.05)  # bulge height / dent, groove, crack depth
    label_threshold: float = 0.002  # a point is anomalous when it moved more than this
    defect_types: tuple[str, ...] = DEFECT_TYPES
    max_tries: int = 12


@dataclass(kw_only=True)
class SynthSample:
    """One synthetic cloud: `points` float32 [N,3], `labels` int64 [N] (1 = anomalous point)."""

    points: np.ndarray
    labels: np.ndarray
    object_label: int
    defect: str | None  # None for a normal sample
    cls: str
    seed: int
    params: dict = field(default_factory=dict)

    @property
    def anomalous_fraction(self) -> float:
        return float(self.labels.mean()) if len(self.labels) else 0.0


# ---- mesh surface ----------------------------------------------------------------------

@dataclass(kw_only=True)
class ShapeSurface:
    """A triangle mesh ready for area-weighted sampling with smooth normals."""

    name: str
    vertices: np.ndarray  # float64 [V,3]
    faces: np.ndarray  # int64 [F,3]
    vertex_normals: np.ndarray  # float64 [V,3], unit
    face_normals: np.ndarray  # float64 [F,3], unit
    cum_area: np.ndarray  # float64 [F], cumulative face area
    size: float  # bounding-box diagonal
    path: Path | None = None

    @classmethod
    def from_arrays(cls, vertices, faces, name: str = "shape", path: Path | None = None) -> "ShapeSurface":
        v = np.asarray(vertices, dtype=np.float64)
        f = np.asarray(faces, dtype=np.int64)
        where = path or name
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
            raise SynthError(f"{where}: expected vertices [V,3] and faces [F,3] with F > 0, "
                             f"got {v.shape} and {f.shape}")
        cross = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        area2 = np.linalg.norm(cross, axis=1)
        if not np.isfinite(area2).all() or area2.sum() <= 0:
            raise SynthError(f"{where}: mesh has no surface area (degenerate or non-finite faces)")
        face_n = cross / np.maximum(area2, 1e-30)[:, None]
        vert_n = np.zeros_like(v)
        for corner in range(3):  # area-weighted vertex normals (cross already carries 2*area)
            np.add.at(vert_n, f[:, corner], cross)
        vert_n /= np.maximum(np.linalg.norm(vert_n, axis=1), 1e-30)[:, None]
        size = float(np.linalg.norm(np.ptp(v[np.unique(f)], axis=0)))
        return cls(name=name, vertices=v, faces=f, vertex_normals=vert_n, face_normals=face_n,
                   cum_area=np.cumsum(area2 * 0.5), size=size, path=path)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted points [n,3] and unit normals [n,3] (float64)."""
        face = np.searchsorted(self.cum_area, rng.random(n) * self.cum_area[-1], side="right")
        face = np.minimum(face, len(self.faces) - 1)
        r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
        bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)  # [n,3]
        tri = self.faces[face]  # [n,3]
        points = np.einsum("nc,ncd->nd", bary, self.vertices[tri])
        normals = np.einsum("nc,ncd->nd", bary, self.vertex_normals[tri])
        norm = np.linalg.norm(normals, axis=1)
        bad = norm < 1e-6  # opposite vertex normals cancel (sharp fold): use the face normal
        normals[bad] = self.face_normals[face[bad]]
        normals /= np.maximum(np.linalg.norm(normals, axis=1), 1e-30)[:, None]
        return points, normals


def load_shape(path: str | Path, name: str | None = None) -> ShapeSurface:
    """Read a mesh (`btp.io.load_mesh`) as a `ShapeSurface` named `name` (default: from the file name)."""
    path = Path(path)
    vertices, faces = load_mesh(path)
    return ShapeSurface.from_arrays(vertices, faces, name or shape_class_name(path), path)


def shape_class_name(path: Path) -> str:
    """`cgal__stanford_bunny.ply` -> `stanford_bunny` (the part after the source prefix)."""
    stem = Path(path).stem
    return stem.split("__", 1)[1] if "__" in stem else stem


def list_shapes(shapes_dir: str | Path) -> dict[str, Path]:
    """Class name -> mesh path for every mesh in `shapes_dir` (index.json names when present)."""
    root = Path(shapes_dir)
    if not root.is_dir():
        raise SynthError(f"{root}: shapes directory not found (pass --shapes DIR)")
    index = root / "index.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        shapes = {e["name"]: root / e["file"] for e in entries if (root / e["file"]).is_file()}
    else:
        shapes = {shape_class_name(p): p for p in sorted(root.iterdir())
                  if p.suffix.lower() in (".ply", ".obj", ".off", ".stl")}
    if not shapes:
        raise SynthError(f"{root}: no meshes found (.ply/.obj/.off/.stl or index.json)")
    return dict(sorted(shapes.items()))


# ---- seeds -----------------------------------------------------------------------------

def sample_seed(root_seed: int, cls: str, split: str, index: int) -> int:
    """A stable per-sample seed (no Python hash salt): same inputs -> same sample everywhere."""
    key = zlib.crc32(f"{cls}/{split}".encode())
    return int(np.random.SeedSequence([int(root_seed), key, int(index)]).generate_state(1)[0])


# ---- defects ---------------------------------------------------------------------------
# Each defect maker gets the dense clean cloud and returns (points, labels, keep) where `points`
# may carry new rows appended after the kept originals. `target` = wanted labelled point count.

@dataclass(kw_only=True)
class _Dense:
    points: np.ndarray  # float64 [M,3]
    normals: np.ndarray  # float64 [M,3]
    size: float
    spacing: float  # median nearest-neighbour distance
    cell: float  # sqrt(surface area per point): a grid cell that holds one point on average
    tree: cKDTree


def _make_dense(points: np.ndarray, normals: np.ndarray, size: float) -> _Dense:
    tree = cKDTree(points)
    probe = points[: min(len(points), 2000)]
    dist = tree.query(probe, k=11)[0]  # [P, 11], column 0 = the point itself
    spacing = max(float(np.median(dist[:, 1])), 1e-9)
    area_per_point = np.pi * float(np.median(dist[:, 10])) ** 2 / 10.0  # 10 neighbours in a disc
    return _Dense(points=points, normals=normals, size=size, spacing=spacing, cell=max(np.sqrt(area_per_point), 1e-9),
                  tree=tree)


def _falloff(t: np.ndarray) -> np.ndarray:
    """Smooth bump (1 - t^2)^2 on [0,1], 0 outside; C1 at the border."""
    t = np.clip(t, 0.0, 1.0)
    return (1.0 - t * t) ** 2


def _same_side(d: _Dense, center: int, cos_min: float = 0.2) -> np.ndarray:
    """Points whose normal agrees with the center's (keeps a defect off a thin part's back face)."""
    return d.normals @ d.normals[center] > cos_min


def _cap(t: np.ndarray) -> np.ndarray:
    """Spherical-cap profile sqrt(1 - t^2) on [0,1], 0 outside: steep at the rim."""
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt(1.0 - t * t)


def _displace(d: _Dense, center: int, height: float, target: int, cfg: SynthConfig, rng, *, cap: bool = False):
    """Bulge (height > 0) or dent (< 0): radius solved so exactly `target` points move > threshold.
    ``cap``: added material, the cap profile, its height at most its radius (but at least 1.5x
    the label threshold, so that a tiny cap is still labelled)."""
    n_c = d.normals[center]
    dist = np.linalg.norm(d.points - d.points[center], axis=1)
    cand = np.flatnonzero(_same_side(d, center))
    order = cand[np.argsort(dist[cand], kind="stable")]
    thr = cfg.label_threshold * d.size
    k = min(target, len(order) - 1)

    def radius_for(h: float) -> float:
        ratio = min(thr / abs(h), 1.0)  # profile(t_star) * |h| == thr
        t_star = np.sqrt(1.0 - ratio * ratio) if cap else np.sqrt(1.0 - np.sqrt(ratio))
        return max(dist[order[k]], 1e-9) / max(t_star, 1e-6)  # target points sit strictly inside t_star

    radius = radius_for(height)
    if cap and abs(height) > radius:  # no taller than wide
        height = float(np.sign(height)) * max(radius, 1.5 * thr)
        radius = radius_for(height)
    move = np.zeros(len(d.points))
    move[cand] = height * (_cap if cap else _falloff)(dist[cand] / radius)
    points = d.points + move[:, None] * n_c[None, :]
    labels = (np.linalg.norm(points - d.points, axis=1) > thr).astype(np.int64)  # realised change
    return points, labels, np.ones(len(points), bool), {"radius": float(radius / d.size), "height": float(height / d.size)}


def _line_cut(d: _Dense, center: int, depth: float, target: int, cfg: SynthConfig, rng, *, kind: str):
    """Crack / groove / scratch: a curved line through the center, cut in along the center normal."""
    n_c = d.normals[center]
    helper = np.eye(3)[np.argmin(np.abs(n_c))]
    t_dir = np.cross(n_c, helper)
    t_dir /= np.linalg.norm(t_dir)
    angle = rng.uniform(0, np.pi)
    t_dir = np.cos(angle) * t_dir + np.sin(angle) * np.cross(n_c, t_dir)
    b_dir = np.cross(n_c, t_dir)
    aspect = {"crack": (12, 30), "scratch": (20, 40)}.get(kind, (4, 10))  # length / width
    aspect = rng.uniform(*aspect)
    if kind == "scratch":
        depth = max(depth / 3.0, 1.5 * cfg.label_threshold * d.size)
    bend = rng.uniform(-1, 1)  # curvature of the line, in units of 1/length
    rel = d.points - d.points[center]
    along, across = rel @ t_dir, rel @ b_dir
    dist = np.linalg.norm(rel, axis=1)
    side = _same_side(d, center, 0.0)
    thr = cfg.label_threshold * d.size

    def cut(width: float) -> np.ndarray:
        half_len = 0.5 * aspect * width
        s = along / half_len
        off = across - bend * half_len * s * s  # curved center line
        profile = _falloff(np.abs(off) / width) if kind == "groove" else np.clip(1 - np.abs(off) / width, 0, 1)
        taper = np.clip((1.0 - np.abs(s)) / 0.25, 0.0, 1.0)  # ends fade out over the last quarter
        taper = taper * taper * (3 - 2 * taper)
        inside = side & (dist < half_len + 2 * width)
        return np.where(inside, depth * profile * taper, 0.0)

    width = _solve_size(lambda w: int((cut(w) > thr).sum()), target, 1e-4 * d.size, 0.5 * d.size)
    move = cut(width)
    points = d.points - move[:, None] * n_c[None, :]
    labels = (np.linalg.norm(points - d.points, axis=1) > thr).astype(np.int64)  # realised change
    return points, labels, np.ones(len(points), bool), {"width": width / d.size, "depth": depth / d.size,
                                                       "length": aspect * width / d.size}


def _hole(d: _Dense, center: int, depth: float, target: int, cfg: SynthConfig, rng):
    """Missing material: points in a ball are removed, the rim around it is labelled."""
    dist = np.linalg.norm(d.points - d.points[center], axis=1)
    rim_points = rng.uniform(1.5, 2.5) * d.spacing  # at least a couple of point spacings ...
    rim_ratio = rng.uniform(0.25, 0.5)  # ... and a share of the radius, so big rims mean wider holes, not huge ones

    def rim(radius: float) -> np.ndarray:
        """Kept points within the rim width of the removed material."""
        rim_width = max(rim_points, rim_ratio * radius)
        gone = dist < radius
        out = np.zeros(len(dist), bool)
        if gone.any():
            near = ~gone & (dist < radius + 2 * rim_width)  # candidates only, for speed
            gap = cKDTree(d.points[gone]).query(d.points[near], distance_upper_bound=rim_width)[0]
            out[np.flatnonzero(near)[gap < rim_width]] = True
        return out

    radius = _solve_size(lambda r: int(rim(r).sum()), target, d.spacing, 0.5 * d.size)
    keep = dist >= radius
    labels = rim(radius).astype(np.int64)
    rim_width = max(rim_points, rim_ratio * radius)
    return d.points.copy(), labels, keep, {"radius": radius / d.size, "rim": rim_width / d.size}


def _broken(d: _Dense, center: int, depth: float, target: int, cfg: SynthConfig, rng):
    """A broken-off piece: cut by a plane near the center's extremity, fracture face filled in."""
    centroid = d.points.mean(axis=0)
    axis = d.points[center] - centroid
    axis = axis / max(np.linalg.norm(axis), 1e-12) + 0.3 * rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    height = d.points @ axis  # [M]
    top = height.max()
    band = rng.uniform(1.5, 2.5) * d.spacing
    rough = rng.uniform(0.2, 0.6) * d.spacing
    local = rng.random(len(d.points))  # fixed draws: the face does not change while we search

    def fracture(cut_depth: float):
        plane = top - cut_depth
        removed = height > plane
        if not removed.any():
            return removed, np.zeros((0, 3)), np.zeros(len(d.points), bool)
        proj = d.points[removed] - (height[removed] - plane)[:, None] * axis[None, :]
        face = _thin(proj, axis, d.cell)  # surface density, not denser
        face = face + (rough * (local[: len(face)] - 0.5))[:, None] * axis[None, :]
        edge = (~removed) & (height > plane - band)
        return removed, face, edge

    # the piece is sized by what breaks off (a share like the label target), the labels follow
    n_off = max(2, int(round(target * rng.uniform(0.7, 2.0))))
    cut_depth = _solve_size(lambda c: int((height > top - c).sum()), n_off, 1e-4 * d.size, d.size)
    removed, face, edge = fracture(cut_depth)
    points = np.concatenate([d.points, face])
    labels = np.concatenate([edge.astype(np.int64), np.ones(len(face), np.int64)])
    keep = np.concatenate([~removed, np.ones(len(face), bool)])
    return points, labels, keep, {"cut_depth": float(cut_depth / d.size), "face_points": len(face)}


def _chip(d: _Dense, center: int, depth: float, target: int, cfg: SynthConfig, rng):
    """Material knocked off an edge: a cone pushed in along the mean normal of a curved spot.
    ``center`` is replaced by one of the 5 % most curved points (surface variation of 16
    neighbours), drawn from ``center`` itself so the same draw gives the same chip."""
    probe = d.tree.query(d.points, k=16)[1]  # [M, 16]
    nb = d.points[probe] - d.points[probe].mean(axis=1, keepdims=True)
    eig = np.linalg.eigvalsh(np.einsum("mki,mkj->mij", nb, nb))  # ascending
    variation = eig[:, 0] / np.maximum(eig.sum(axis=1), 1e-30)
    edges = np.flatnonzero(variation >= np.quantile(variation, 0.95))
    center = int(edges[center % len(edges)])
    n_mean = d.normals[probe[center]].mean(axis=0)
    n_mean = n_mean / max(np.linalg.norm(n_mean), 1e-12)
    dist = np.linalg.norm(d.points - d.points[center], axis=1)
    side = d.normals @ n_mean > 0.0  # both faces of the edge, not the part's far side
    thr = cfg.label_threshold * d.size

    def cut(radius: float) -> np.ndarray:
        return np.where(side, 0.5 * radius * np.clip(1.0 - dist / radius, 0.0, 1.0), 0.0)

    radius = _solve_size(lambda r: int((cut(r) > thr).sum()), target, 4 * thr, 0.5 * d.size)
    move = cut(radius)
    points = d.points - move[:, None] * n_mean[None, :]
    labels = (np.linalg.norm(points - d.points, axis=1) > thr).astype(np.int64)  # realised change
    return points, labels, np.ones(len(points), bool), {"radius": radius / d.size, "depth": 0.5 * radius / d.size,
                                                       "edge_center": center}


def _thin(points: np.ndarray, normal: np.ndarray, spacing: float) -> np.ndarray:
    """Points on a plane (unit `normal`) thinned to one per occupied square cell of side `spacing`
    in the plane's own 2-D coordinates (keeps the points' own random positions)."""
    if len(points) == 0:
        return points
    u = np.cross(normal, np.eye(3)[np.argmin(np.abs(normal))])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    cells = np.floor(np.stack([points @ u, points @ v], axis=1) / spacing).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    return points[np.sort(first)]


def _solve_size(count: Callable[[float], int], target: int, lo: float, hi: float, iters: int = 30) -> float:
    """Bisection (geometric) for the size whose labelled count is closest to `target`."""
    best, best_err = hi, np.inf
    for _ in range(iters):
        mid = float(np.sqrt(lo * hi))
        c = count(mid)
        if abs(c - target) < best_err:
            best, best_err = mid, abs(c - target)
        if c == target:
            break
        if c < target:
            lo = mid
        else:
            hi = mid
    return best


_DEFECTS = {
    "bulge": lambda d, c, h, k, cfg, rng: _displace(d, c, h, k, cfg, rng),
    "dent": lambda d, c, h, k, cfg, rng: _displace(d, c, -h, k, cfg, rng),
    "hole": _hole,
    "crack": lambda d, c, h, k, cfg, rng: _line_cut(d, c, h, k, cfg, rng, kind="crack"),
    "groove": lambda d, c, h, k, cfg, rng: _line_cut(d, c, h, k, cfg, rng, kind="groove"),
    "broken": _broken,
    "added": lambda d, c, h, k, cfg, rng: _displace(d, c, h, k, cfg, rng, cap=True),
    "scratch": lambda d, c, h, k, cfg, rng: _line_cut(d, c, h, k, cfg, rng, kind="scratch"),
    "chip": _chip,
}


# ---- samples ---------------------------------------------------------------------------

def _dense_cloud(shape: ShapeSurface, cfg: SynthConfig, rng: np.random.Generator, partial: bool) -> _Dense:
    """Oversampled clean points + normals; a single-view partial scan when `partial`."""
    n_dense = int(np.ceil(cfg.num_points * cfg.oversample))
    if not partial:
        points, normals = shape.sample(n_dense, rng)
    else:
        import open3d as o3d

        view = rng.normal(size=3)
        view /= np.linalg.norm(view)
        points, normals = shape.sample(n_dense * 3, rng)
        center = points.mean(axis=0)
        camera = center + view * 1.5 * shape.size
        cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
        _, visible = cloud.hidden_point_removal(camera, shape.size * 100.0)
        visible = np.sort(np.asarray(visible, dtype=np.int64))
        if len(visible) < n_dense:  # a view that sees too little: fall back to the full surface
            points, normals = points[:n_dense], normals[:n_dense]
        else:
            points, normals = points[visible], normals[visible]
    return _make_dense(points, normals, shape.size)


def _finish(points: np.ndarray, labels: np.ndarray, shape: ShapeSurface, cfg: SynthConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random subset of num_points, small random pose, noise. float32 points, int64 labels."""
    if len(points) < cfg.num_points:
        raise SynthError(f"{shape.path or shape.name}: only {len(points)} points left after the defect, "
                         f"need {cfg.num_points}; raise SynthConfig.oversample")
    pick = np.sort(rng.choice(len(points), cfg.num_points, replace=False))
    points, labels = points[pick], labels[pick]
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(0, cfg.pose_deg))
    rot = _rotation(axis, angle)
    center = points.mean(axis=0)
    shift = rng.uniform(-cfg.pose_shift, cfg.pose_shift, size=3) * shape.size
    points = (points - center) @ rot.T + center + shift
    if cfg.noise > 0:
        points = points + rng.normal(scale=cfg.noise * shape.size, size=points.shape)
    return points.astype(np.float32), labels.astype(np.int64)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def make_normal(shape: ShapeSurface, seed: int, cfg: SynthConfig = SynthConfig()) -> SynthSample:
    """A defect-free sample (same sampling, partial-scan, pose and noise statistics as the defects)."""
    rng = np.random.default_rng(seed)
    partial = bool(rng.random() < cfg.partial_prob)
    dense = _dense_cloud(shape, cfg, rng, partial)
    points, labels = _finish(dense.points, np.zeros(len(dense.points), np.int64), shape, cfg, rng)
    return SynthSample(points=points, labels=labels, object_label=0, defect=None, cls=shape.name, seed=seed,
                       params={"partial": partial})


@dataclass(kw_only=True)
class Defect:
    """Result of `apply_defect`: rows `points[keep]` with `labels[keep]` form the defective cloud.

    `points` [M',3] = the input rows (moved where the defect moved them) followed by any new
    rows (a fracture face); `keep` [M'] is False for removed material; `labels` [M'] int64.
    """

    kind: str
    points: np.ndarray
    labels: np.ndarray
    keep: np.ndarray
    params: dict


def apply_defect(points: np.ndarray, normals: np.ndarray, kind: str, rng: np.random.Generator,
                 cfg: SynthConfig = SynthConfig(), *, size: float | None = None,
                 target_frac: float | None = None, center: int | None = None) -> Defect:
    """Put one defect of `kind` on a clean cloud `points` [M,3] with unit `normals` [M,3].

    `size` = object size (default: the cloud's bounding-box diagonal); depth is drawn from
    cfg.depth_range, the labelled share aims at `target_frac` (drawn inside cfg.frac_range when
    None), the defect center is a random point unless given. Labels mark the points whose
    geometry changed by more than cfg.label_threshold * size (moved points, hole rims, the
    fracture face and the band along a break).
    """
    if kind not in _DEFECTS:
        raise SynthError(f"unknown defect type {kind!r}; choose from {list(ALL_DEFECT_TYPES)}")
    pts = np.asarray(points, dtype=np.float64)
    nrm = np.asarray(normals, dtype=np.float64)
    size = float(np.linalg.norm(np.ptp(pts, axis=0))) if size is None else float(size)
    dense = _make_dense(pts, nrm, size)
    return _apply(dense, kind, rng, cfg, target_frac, center)


def _apply(dense: _Dense, kind: str, rng, cfg: SynthConfig, target_frac=None, center=None) -> Defect:
    lo, hi = cfg.frac_range
    if target_frac is None:  # log-uniform, with a margin for the final random subset
        top = min(hi * 0.85, 0.03) if kind in ("crack", "scratch") else hi * 0.85  # a crack stays thin
        target_frac = float(np.exp(rng.uniform(np.log(lo * 1.4), np.log(top))))
    depth = float(rng.uniform(*cfg.depth_range)) * dense.size
    center = int(rng.integers(len(dense.points))) if center is None else int(center)
    target = max(1, int(round(target_frac * len(dense.points))))
    points, labels, keep, params = _DEFECTS[kind](dense, center, depth, target, cfg, rng)
    params.update(target_frac=float(target_frac), center=center)
    return Defect(kind=kind, points=points, labels=labels, keep=keep, params=params)


def make_anomalous(shape: ShapeSurface, seed: int, cfg: SynthConfig = SynthConfig(),
                   defect: str | None = None) -> SynthSample:
    """One anomalous sample with a `defect` (random from cfg.defect_types when None).

    The labelled share is checked before and after the final random subset; a draw that misses
    `frac_range` is retried with the next random numbers (still deterministic), up to `max_tries`.
    """
    kinds = cfg.defect_types
    unknown = [k for k in ((defect,) if defect else kinds) if k not in _DEFECTS]
    if unknown:
        raise SynthError(f"unknown defect type(s) {unknown}; choose from {list(ALL_DEFECT_TYPES)}")
    rng = np.random.default_rng(seed)
    kind = defect or kinds[int(rng.integers(len(kinds)))]
    partial = bool(rng.random() < cfg.partial_prob)
    dense = _dense_cloud(shape, cfg, rng, partial)
    lo, hi = cfg.frac_range
    for attempt in range(cfg.max_tries):
        d = _apply(dense, kind, rng, cfg)
        points, labels = d.points[d.keep], d.labels[d.keep]
        got = labels.sum() / max(len(labels), 1)
        if not lo <= got <= hi or len(points) < cfg.num_points:
            continue
        out_points, out_labels = _finish(points, labels, shape, cfg, rng)
        if lo <= out_labels.mean() <= hi:
            d.params.update(partial=partial, attempt=attempt)
            return SynthSample(points=out_points, labels=out_labels, object_label=1, defect=kind, cls=shape.name,
                               seed=seed, params=d.params)
    raise SynthError(f"{shape.path or shape.name}: could not place a {kind!r} defect covering "
                     f"{lo:.1%}-{hi:.1%} of the points in {cfg.max_tries} tries (seed {seed})")


# ---- datasets on disk ------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SynthPlan:
    """What `write_dataset` writes per class."""

    per_class_train: int = 4
    per_class_test_good: int = 6
    per_class_test_bad: int = 12
    seed: int = 0
    layout: str = "anomaly-shapenet"


def layout_names(layout: str, cls: str) -> dict[str, Callable[..., str]]:
    if layout == "anomaly-shapenet":
        return {"gt_dir": lambda: "GT", "train": lambda i: f"{cls}_template{i}",
                "good": lambda i: f"{cls}_positive{i}", "bad": lambda kind, i: f"{cls}_{kind}{i}"}
    if layout == "real3d":
        return {"gt_dir": lambda: "gt", "train": lambda i: f"{i}_template",
                "good": lambda i: f"{i}_good", "bad": lambda kind, i: f"{i}_{kind}"}
    raise SynthError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")


def iter_class_samples(shape: ShapeSurface, plan: SynthPlan, cfg: SynthConfig = SynthConfig()
                       ) -> Iterator[tuple[str, str, SynthSample]]:
    """(split, stem, sample) for one class in a fixed order; defect types cycle over the bad ones."""
    names = layout_names(plan.layout, shape.name)
    for i in range(plan.per_class_train):
        yield "train", names["train"](i), make_normal(shape, sample_seed(plan.seed, shape.name, "train", i), cfg)
    for i in range(plan.per_class_test_good):
        seed = sample_seed(plan.seed, shape.name, "good", i)
        yield "test", names["good"](i), make_normal(shape, seed, cfg)
    kinds = cfg.defect_types
    for i in range(plan.per_class_test_bad):
        kind = kinds[i % len(kinds)]
        seed = sample_seed(plan.seed, shape.name, "bad", i)
        # real3d numbers test files across good and bad, like the public set
        index = i if plan.layout == "anomaly-shapenet" else plan.per_class_test_good + i
        yield "test", names["bad"](kind, index), make_anomalous(shape, seed, cfg, kind)


def write_gt(path: Path, points: np.ndarray, labels: np.ndarray) -> None:
    """Ground truth rows `x y z label` (the public layouts' GT/gt text files)."""
    rows = np.column_stack([points.astype(np.float64), labels.astype(np.float64)])
    np.savetxt(path, rows, fmt=["%.6f", "%.6f", "%.6f", "%d"])


def write_dataset(shapes_dir: str | Path, out: str | Path, classes: list[str] | None = None,
                  plan: SynthPlan = SynthPlan(), cfg: SynthConfig = SynthConfig(),
                  progress: Callable[[int], None] | None = None) -> dict:
    """Write a synthetic dataset in a public layout; returns a summary (also saved as synth.json).

    Anomaly-ShapeNet: `<cls>/train/*.pcd`, `<cls>/test/*.pcd` ("positive" in normal names),
    `<cls>/GT/<stem>.txt`. Real3D-AD: the same with `gt/` and "good". GT files are written for
    the anomalous test samples (normal ones are all-zero, as in the public sets).
    `progress(n)` is called after every written file.
    """
    shapes = list_shapes(shapes_dir)
    chosen = list(shapes) if not classes else list(classes)
    missing = [c for c in chosen if c not in shapes]
    if missing:
        raise SynthError(f"{shapes_dir}: no mesh for class(es) {missing}; available: {', '.join(shapes)}")
    out = Path(out)
    names = {c: layout_names(plan.layout, c) for c in chosen}
    summary = {"layout": plan.layout, "seed": plan.seed, "shapes": str(shapes_dir),
               "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
               "plan": plan.__dict__, "classes": {}}
    for cls in chosen:
        shape = load_shape(shapes[cls], cls)
        cls_dir = out / cls
        gt_dir = cls_dir / names[cls]["gt_dir"]()
        for sub in (cls_dir / "train", cls_dir / "test", gt_dir):
            sub.mkdir(parents=True, exist_ok=True)
        info = {"mesh": shapes[cls].name, "samples": {}}
        for split, stem, sample in iter_class_samples(shape, plan, cfg):
            write_point_cloud(cls_dir / split / f"{stem}.pcd", sample.points)
            if sample.object_label:
                write_gt(gt_dir / f"{stem}.txt", sample.points, sample.labels)
            info["samples"][f"{split}/{stem}"] = {"defect": sample.defect, "seed": sample.seed,
                                                   "anomalous_fraction": round(sample.anomalous_fraction, 5)}
            if progress:
                progress(1)
        summary["classes"][cls] = info
    (out / "synth.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def with_points(cfg: SynthConfig, num_points: int) -> SynthConfig:
    return replace(cfg, num_points=int(num_points))
