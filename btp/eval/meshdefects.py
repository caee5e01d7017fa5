"""A second defect maker, for evaluation only: edits of the *mesh* before sampling.

btp.train.synth (the training data's maker) displaces and cuts a dense sampled cloud along its
normals. This one never touches a cloud: it changes the triangle mesh - material glued on, a
part removed, a region bent - and then samples the edited surface, the way a scan of a faulty
part would see it. Nothing in btp.train imports it; models never train on its samples.

Kinds (cycled over the anomalous samples):
- ``extra_material``: an ellipsoidal blob (3-7 % of the part's size) welded onto the surface;
  sampled points on the blob that stand off the original surface are anomalous.
- ``missing_part``: a small connected component (a pin, a lead, a boss: 0.3-15 % of the area)
  deleted; where the part has none, the faces around a surface point are cut away (a chip).
  Points of what remains within 3 % of the part's size of the missing material are anomalous.
- ``bend``: the vertices within 6-15 % of the size of a surface point rotated by 8-20 degrees
  about an axis through it (smooth falloff): a warped flange or a bent pin. Points that moved
  more than 0.4 % of the size are anomalous.

Labels are exact per point: each sample knows its face and barycentric coordinates, so its
position before the edit is known. Sizes are fractions of the bounding-box diagonal.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from btp.io import load_mesh, write_point_cloud

MESH_DEFECT_TYPES: tuple[str, ...] = ("extra_material", "missing_part", "bend")


class MeshDefectError(ValueError):
    """No defect of the asked kind fits this mesh with this seed."""


@dataclass(frozen=True, kw_only=True)
class MeshDefectConfig:
    num_points: int = 8192
    noise: float = 0.0003  # Gaussian sigma per coordinate, fraction of the size
    label_threshold: float = 0.004  # a point is anomalous when it stands off / moved more than this
    defect_types: tuple[str, ...] = MESH_DEFECT_TYPES
    max_tries: int = 8
    # a single-view partial scan (hidden-point removal from one viewpoint, open borders), as line
    # scanners and Real3D-AD's scans see a part; an anomalous scan is viewed from its defect's side
    partial: bool = False


@dataclass(kw_only=True)
class MeshSample:
    points: np.ndarray  # float32 [N, 3]
    labels: np.ndarray  # int64 [N]
    object_label: int
    defect: str | None
    params: dict = field(default_factory=dict)


def _areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    return 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)


def _sample(v: np.ndarray, f: np.ndarray, n: int, rng: np.random.Generator):
    """Area-weighted samples: (points [n,3], face [n], barycentric [n,3])."""
    cum = np.cumsum(_areas(v, f))
    face = np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(f) - 1)
    r1, r2 = np.sqrt(rng.random(n)), rng.random(n)
    bary = np.stack([1 - r1, r1 * (1 - r2), r1 * r2], axis=1)
    return np.einsum("nc,ncd->nd", bary, v[f[face]]), face, bary


def _surface_point(v, f, rng):
    """A random surface point and its face normal."""
    p, face, _ = _sample(v, f, 1, rng)
    a, b, c = v[f[face[0]]]
    n = np.cross(b - a, c - a)
    return p[0], n / max(np.linalg.norm(n), 1e-30)


def _icosphere(subdiv: int = 2) -> tuple[np.ndarray, np.ndarray]:
    t = (1 + 5 ** 0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
         (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    f = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4), (11, 10, 2), (10, 7, 6),
         (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8), (3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10),
         (8, 6, 7), (9, 8, 1)]
    verts = [np.array(p, float) / np.linalg.norm(p) for p in v]
    faces = list(f)
    for _ in range(subdiv):
        cache: dict = {}

        def mid(i, j):
            key = (min(i, j), max(i, j))
            if key not in cache:
                m = verts[i] + verts[j]
                verts.append(m / np.linalg.norm(m))
                cache[key] = len(verts) - 1
            return cache[key]

        faces = [g for a, b, c in faces for g in
                 ((a, mid(a, b), mid(a, c)), (b, mid(b, c), mid(a, b)), (c, mid(a, c), mid(b, c)),
                  (mid(a, b), mid(b, c), mid(a, c)))]
    return np.array(verts), np.array(faces, dtype=np.int64)


def _components(f: np.ndarray, n_vertices: int) -> np.ndarray:
    """Connected component id of every face (faces sharing a vertex are connected)."""
    rows = np.repeat(np.arange(len(f)), 3)
    graph = coo_matrix((np.ones(len(rows)), (rows, f.reshape(-1))), shape=(len(f), n_vertices)).tocsr()
    face_face = graph @ graph.T
    return connected_components(face_face, directed=False)[1]


def _extra_material(v, f, size, rng, cfg):
    p, n = _surface_point(v, f, rng)
    r = size * rng.uniform(0.03, 0.07)
    sv, sf = _icosphere(2)
    axes = np.array([1.0, rng.uniform(0.5, 1.0), rng.uniform(0.35, 0.8)])  # an ellipsoid, flat along n
    frame = np.linalg.qr(np.column_stack([n, rng.normal(size=3), rng.normal(size=3)]))[0]
    blob = (sv * axes[[2, 0, 1]]) @ frame.T * r + p + n * r * rng.uniform(0.1, 0.4)
    v2 = np.concatenate([v, blob])
    f2 = np.concatenate([f, sf + len(v)])
    pts, face, _ = _sample(v2, f2, cfg.num_points, rng)
    on_blob = face >= len(f)
    original = _sample(v, f, 16 * cfg.num_points, rng)[0]  # distance to the surface, up to its spacing
    stand_off = cKDTree(original).query(pts[on_blob])[0]
    labels = np.zeros(len(pts), np.int64)
    labels[np.flatnonzero(on_blob)[stand_off > cfg.label_threshold * size]] = 1
    return pts, labels, {"radius": r / size}


def _missing_part(v, f, size, rng, cfg):
    comp = _components(f, len(v))
    areas = _areas(v, f)
    total = areas.sum()
    share = np.bincount(comp, weights=areas) / total
    small = np.flatnonzero((share > 0.003) & (share < 0.15))
    if len(small):
        gone = comp == rng.choice(small)
        how = "component"
    else:  # one solid: cut a chip around a surface point
        c, _ = _surface_point(v, f, rng)
        r = size * rng.uniform(0.04, 0.08)
        gone = np.linalg.norm(v[f].mean(axis=1) - c, axis=1) < r
        how = "chip"
        if not 0 < areas[gone].sum() / total < 0.1:
            raise MeshDefectError("the chip would remove nothing or more than 10 % of the surface")
    keep = ~gone
    removed = _sample(v, f[gone], 2000, rng)[0]
    pts, _, _ = _sample(v, f[keep], cfg.num_points, rng)
    near = cKDTree(removed).query(pts)[0] < 0.03 * size
    return pts, near.astype(np.int64), {"how": how, "area_share": float(areas[gone].sum() / total)}


def _bend(v, f, size, rng, cfg):
    c, n = _surface_point(v, f, rng)
    radius = size * rng.uniform(0.06, 0.15)
    axis = np.cross(n, rng.normal(size=3))
    axis /= max(np.linalg.norm(axis), 1e-30)
    angle = np.deg2rad(rng.uniform(8, 20)) * rng.choice([-1, 1])
    d = np.linalg.norm(v - c, axis=1)
    w = np.clip(1 - (d / radius) ** 2, 0, None) ** 2  # [V] smooth falloff
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    moved = v.copy()
    for i in np.flatnonzero(w > 0):
        a = angle * w[i]
        rot = np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)
        moved[i] = (v[i] - c) @ rot.T + c
    pts, face, bary = _sample(moved, f, cfg.num_points, rng)
    before = np.einsum("nc,ncd->nd", bary, v[f[face]])
    labels = (np.linalg.norm(pts - before, axis=1) > cfg.label_threshold * size).astype(np.int64)
    return pts, labels, {"radius": radius / size, "angle_deg": float(np.rad2deg(angle))}


_MAKERS: dict[str, Callable] = {"extra_material": _extra_material, "missing_part": _missing_part, "bend": _bend}


def _finish(points, labels, size, rng, cfg, params, kind):
    pts = points + rng.normal(scale=cfg.noise * size, size=points.shape) if cfg.noise > 0 else points
    return MeshSample(points=pts.astype(np.float32), labels=labels, object_label=int(kind is not None), defect=kind,
                      params=params)


def _single_view(sample: MeshSample, size: float, rng: np.random.Generator, num_points: int) -> MeshSample:
    """The points one camera sees (open3d hidden-point removal), at most ``num_points`` of them
    (a random subset). The camera looks at the centroid from a random side, or, for an anomalous
    sample, from the side of its defect (within about 35 degrees), so that the defect is in view."""
    import open3d as o3d

    points = sample.points.astype(np.float64)
    center = points.mean(axis=0)
    view = rng.normal(size=3)
    view /= np.linalg.norm(view)
    if sample.object_label:
        toward = points[sample.labels > 0].mean(axis=0) - center
        if np.linalg.norm(toward) > 1e-9 * size:
            view = toward / np.linalg.norm(toward) + 0.7 * view
            view /= np.linalg.norm(view)
    camera = center + view * 1.5 * size
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    _, visible = cloud.hidden_point_removal(camera, size * 100.0)
    visible = np.sort(np.asarray(visible, dtype=np.int64))
    if len(visible) > num_points:
        visible = np.sort(rng.choice(visible, num_points, replace=False))
    params = {**sample.params, "partial_view": [round(float(x), 4) for x in view]}
    return MeshSample(points=sample.points[visible], labels=sample.labels[visible], object_label=sample.object_label,
                      defect=sample.defect, params=params)


def make_mesh_sample(vertices, faces, seed: int, kind: str | None, cfg: MeshDefectConfig = MeshDefectConfig()
                     ) -> MeshSample:
    """One scan of the mesh: normal (``kind=None``) or with a ``kind`` edit; with ``cfg.partial``
    what one camera sees of it (``_single_view``: 3x the points sampled, then at most
    ``num_points`` visible ones kept)."""
    if not cfg.partial:
        return _full_mesh_sample(vertices, faces, seed, kind, cfg)
    dense = replace(cfg, partial=False, num_points=3 * cfg.num_points)
    size = float(np.linalg.norm(np.ptp(np.asarray(vertices, np.float64)[np.unique(faces)], axis=0)))
    for attempt in range(cfg.max_tries):
        sample = _full_mesh_sample(vertices, faces, seed + attempt, kind, dense)
        seen = _single_view(sample, size, np.random.default_rng([seed, attempt, 7]), cfg.num_points)
        if kind is None or 0.002 <= seen.labels.mean() <= 0.25:
            return seen
    raise MeshDefectError(f"no {kind} defect stays in view of a single camera in {cfg.max_tries} tries (seed {seed})")


def _full_mesh_sample(vertices, faces, seed: int, kind: str | None, cfg: MeshDefectConfig) -> MeshSample:
    """One scan of the mesh: normal (``kind=None``) or with a ``kind`` edit. A defect that does not
    fit (no vertex moved, nothing labelled, under 0.2 % or over 25 % of the points) is redrawn
    up to ``max_tries`` times, then MeshDefectError."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    size = float(np.linalg.norm(np.ptp(v[np.unique(f)], axis=0)))
    if kind is None:
        rng = np.random.default_rng(seed)
        return _finish(_sample(v, f, cfg.num_points, rng)[0], np.zeros(cfg.num_points, np.int64), size, rng, cfg,
                       {}, None)
    if kind not in _MAKERS:
        raise MeshDefectError(f"unknown mesh defect {kind!r}; choose one of {MESH_DEFECT_TYPES}")
    for attempt in range(cfg.max_tries):
        rng = np.random.default_rng([seed, attempt])
        try:
            pts, labels, params = _MAKERS[kind](v, f, size, rng, cfg)
        except MeshDefectError:
            continue
        if 0.002 <= labels.mean() <= 0.25:
            return _finish(pts, labels, size, rng, cfg, {**params, "attempt": attempt}, kind)
    raise MeshDefectError(f"no {kind} defect fits this mesh in {cfg.max_tries} tries (seed {seed})")


TRAIN_POSE_DEG = 10.0
TRAIN_POSE_SHIFT = 0.02


def _small_pose(points: np.ndarray, seed: int) -> np.ndarray:
    """float32 [M,3]: ``points`` turned by up to TRAIN_POSE_DEG about a random axis through their
    centroid and shifted by up to TRAIN_POSE_SHIFT of their size per axis."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    axis /= max(np.linalg.norm(axis), 1e-30)
    rot = Rotation.from_rotvec(axis * np.deg2rad(rng.uniform(0, TRAIN_POSE_DEG))).as_matrix()
    size = float(np.linalg.norm(np.ptp(points, axis=0)))
    c = points.mean(axis=0)
    moved = (points - c) @ rot.T + c + rng.uniform(-TRAIN_POSE_SHIFT, TRAIN_POSE_SHIFT, size=3) * size
    return moved.astype(np.float32)


def write_mesh_defect_dataset(shapes_root, out, classes: list[str], *, per_class_good: int = 4,
                              per_class_bad: int = 9, seed: int = 300, layout: str = "anomaly-shapenet",
                              cfg: MeshDefectConfig = MeshDefectConfig(), per_class_train: int = 0,
                              log=print) -> dict:
    """Test scans of ``classes`` (index.json names) in a public layout, made by this maker, and
    ``per_class_train`` good train/ scans (the references of ``btp eval --references train``):
    their own samplings, each turned by up to TRAIN_POSE_DEG about a random axis and shifted by
    up to TRAIN_POSE_SHIFT of the size (the test scans stay in the mesh's frame)."""
    from btp.train.corpus import check_not_reserved
    from btp.train.synth import layout_names, list_shapes, sample_seed, write_gt

    shapes = list_shapes(shapes_root)
    out = Path(out)
    summary: dict = {"maker": "btp.eval.meshdefects", "layout": layout, "seed": seed, "classes": {}}
    for cls in classes:
        check_not_reserved(shapes[cls])
        v, f = load_mesh(shapes[cls])
        names = layout_names(layout, cls)
        test_dir, gt_dir = out / cls / "test", out / cls / names["gt_dir"]()
        (out / cls / "train").mkdir(parents=True, exist_ok=True)
        test_dir.mkdir(parents=True, exist_ok=True)
        gt_dir.mkdir(parents=True, exist_ok=True)
        info = {}
        for i in range(per_class_train):
            s = make_mesh_sample(v, f, sample_seed(seed, cls, "mesh-train", i), None, cfg)
            write_point_cloud(out / cls / "train" / f"{names['train'](i)}.pcd",
                              _small_pose(s.points, sample_seed(seed, cls, "mesh-train-pose", i)))
        for i in range(per_class_good):
            s = make_mesh_sample(v, f, sample_seed(seed, cls, "mesh-good", i), None, cfg)
            write_point_cloud(test_dir / f"{names['good'](i)}.pcd", s.points)
        for i in range(per_class_bad):
            kind = cfg.defect_types[i % len(cfg.defect_types)]
            index = i if layout == "anomaly-shapenet" else per_class_good + i
            stem = names["bad"](kind, index)
            try:
                s = make_mesh_sample(v, f, sample_seed(seed, cls, "mesh-bad", i), kind, cfg)
            except MeshDefectError as err:
                info[stem] = f"skipped: {err}"
                continue
            write_point_cloud(test_dir / f"{stem}.pcd", s.points)
            write_gt(gt_dir / f"{stem}.txt", s.points, s.labels)
            info[stem] = {"defect": kind, "anomalous_fraction": round(float(s.labels.mean()), 5), **s.params}
        summary["classes"][cls] = info
        log(f"meshdefects: {cls}: {sum(isinstance(x, dict) for x in info.values())} anomalous scans")
    (out / "meshdefects.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
