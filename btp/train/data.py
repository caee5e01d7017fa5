"""Training data: surface-point pools for pre-training, cached BTP samples for the BTP stage.

Everything is computed once per dataset and cached as ``.npz`` under the run's cache folder
(keyed by a hash of what produced it), because FPFH and synthetic defects are the slow part:

- pre-training pool: ``pool_points`` area-weighted surface points per training mesh [S, P, 3];
  every step draws ``num_points`` of them, rotates them randomly, and groups them (FPS + kNN).
- BTP samples: synthetic-defect clouds (btp.train.synth) on training meshes, preprocessed
  exactly like the runtime does (FPS to N, unit-sphere normalisation, FPS centers + kNN
  patches), with per-point labels and the FPFH target of every patch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from btp.config import BTPConfig
from btp.geometry import fpfh_patches, group, neighborhoods, normalize
from btp.geometry.prepare import prepare
from btp.io import load_mesh, sample_surface

DATA_VERSION = 1


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- pre-training pool ---------------------------------------------------------------------

def surface_pool(shapes, pool_points: int, seed: int, cache_dir) -> np.ndarray:
    """[S, pool_points, 3] float32 surface points of each shape (cached)."""
    key = _key({"v": DATA_VERSION, "names": [s.name for s in shapes], "n": pool_points, "seed": seed})
    path = Path(cache_dir) / f"pool-{key}.npz"
    if path.is_file():
        return np.load(path)["points"]
    pool = np.stack([
        sample_surface(*load_mesh(s.path), pool_points, seed + i)[0] for i, s in enumerate(shapes)
    ]).astype(np.float32)
    save_arrays(path, {"points": pool})
    return pool


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation matrix [3,3] (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def pretrain_batch(pool: np.ndarray, shape_ids: np.ndarray, cfg: BTPConfig, rng: np.random.Generator,
                   rotate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One pre-training batch: (neighborhood [B,G,K,C], center [B,G,3]) from random subsets."""
    n = cfg.preprocess.num_points
    neighs, centers = [], []
    for sid in shape_ids:
        pts = pool[sid][rng.choice(pool.shape[1], size=n, replace=False)]
        if rotate:
            pts = pts @ random_rotation(rng).T
        pts = pts * rng.uniform(0.85, 1.15)
        pts, _, _ = normalize(pts)
        g = group(pts, cfg.encoder.num_group, cfg.encoder.group_size, start_idx=int(rng.integers(n)),
                  rgb_fill=cfg.preprocess.rgb_fill, in_channels=cfg.encoder.in_channels)
        neighs.append(g.neighborhood)
        centers.append(g.center)
    return np.stack(neighs), np.stack(centers).astype(np.float32)


# ---- BTP samples ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TrainingSample:
    """One training cloud through the runtime's chain, with its labels and FPFH targets."""

    points: np.ndarray  # [N, 3] float32, normalised
    labels: np.ndarray  # [N] int64 (1 = anomalous)
    patch_idx: np.ndarray  # [G, K] int64
    center: np.ndarray  # [G, 3] float32
    fpfh: np.ndarray  # [G, 33] float32


def training_sample(points: np.ndarray, labels: np.ndarray, cfg: BTPConfig) -> TrainingSample:
    """Raw cloud [M,3] + labels [M] -> the chain of btp.geometry.prepare + labels of the sampled
    points + FPFH of every patch. Samples are stacked into [S, N, ...] arrays, so M >= N."""
    n = cfg.preprocess.num_points
    if len(points) < n:
        raise ValueError(f"training cloud has {len(points)} points < preprocess.num_points={n} (samples are "
                         "stacked at N points each)")
    prep = prepare(points, cfg, "exact")  # the reference rule: training data must not move with runtime speed-ups
    return TrainingSample(points=prep.points, labels=np.asarray(labels, np.int64)[prep.sample_idx],
                          patch_idx=prep.patch_idx, center=prep.center,
                          fpfh=fpfh_patches(prep.points, prep.patch_idx, cfg.gfcm))


def stack_samples(items: list[TrainingSample], object_labels, shape_ids) -> dict[str, np.ndarray]:
    return {
        "points": np.stack([p.points for p in items]),
        "labels": np.stack([p.labels for p in items]),
        "patch_idx": np.stack([p.patch_idx for p in items]),
        "center": np.stack([p.center for p in items]),
        "fpfh": np.stack([p.fpfh for p in items]),
        "object_label": np.asarray(object_labels, np.int64),
        "shape_id": np.asarray(shape_ids, np.int64),
    }


def save_arrays(path, arrays: dict[str, np.ndarray]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")  # per process: torchrun ranks build it together
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load_arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


class BTPArrays:
    """Indexable view over cached BTP samples -> the model's inputs (+ targets), numpy."""

    def __init__(self, arrays: dict[str, np.ndarray], cfg: BTPConfig):
        self.a = arrays
        self.cfg = cfg

    def __len__(self) -> int:
        return int(self.a["points"].shape[0])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        pts, pidx, ctr = self.a["points"][i], self.a["patch_idx"][i], self.a["center"][i]
        return {
            "neighborhood": neighborhoods(pts, pidx, ctr, self.cfg.encoder.in_channels, self.cfg.preprocess.rgb_fill),
            "center": ctr,  # [G, 3]
            "patch_idx": pidx,  # [G, K]
            "points": pts,  # [N, 3]
            "point_labels": self.a["labels"][i],  # [N]
            "object_label": self.a["object_label"][i],  # []
            "fpfh": self.a["fpfh"][i],  # [G, 33]
        }


def _fpfh_params(gfcm) -> dict:
    """The GFCM settings the cached samples depend on (their FPFH targets); the module's own
    architecture fields (frame, context, widths) do not change the samples."""
    return {k: getattr(gfcm, k) for k in ("normal_radius", "normal_max_nn", "fpfh_radius", "fpfh_max_nn")}


def defect_kind(kinds, n_bad: int, shape_index: int, i: int) -> str:
    """The defect type of anomalous sample ``i`` (of ``n_bad``) of shape ``shape_index``: each
    shape's samples cycle through ``kinds``; with more kinds than samples per shape the cycle runs
    on across shapes, so that every kind is drawn."""
    k = i if len(kinds) <= n_bad else shape_index * n_bad + i
    return kinds[k % len(kinds)]


def btp_samples(shapes, cfg: BTPConfig, per_shape: int, seed: int, cache_dir, *, anomalous_frac: float = 0.5,
                synth_points: int = 8192, rotate: bool = False, synth_overrides: dict | None = None,
                progress=None, log=print) -> dict[str, np.ndarray]:
    """Synthetic BTP training samples on ``shapes`` (training split only!), preprocessed + cached.

    Per shape: ``per_shape`` clouds, the first ``round(anomalous_frac * per_shape)`` anomalous
    (defect types cycle through the synth config's ``defect_types``), the rest normal; each cloud has
    ``synth_points`` points (like the written datasets' raw scans) and is FPS-sampled to N by
    ``prepare``. Sample seeds: ``synth.sample_seed(seed, shape, "btp-train", i)``; a sample whose
    defect cannot be placed is retried with the next seed (``i + 1000 * attempt``).
    ``rotate``: every cloud gets a uniformly random rotation (drawn from its sample seed), so that
    the 20 clouds of one mesh do not share a pose and absolute position cannot stand in for
    "how this mesh normally looks" (with ``gfcm.frame="world"`` GFCM sees absolute patch xyz).
    """
    from btp.train import synth

    base = dataclasses.replace(synth.SynthConfig(), **(synth_overrides or {}))  # ablations: scan realism, defects
    key = _key({"v": DATA_VERSION, "synth": base.__dict__, "names": [s.name for s in shapes],
                "per_shape": per_shape, "seed": seed, "anom": anomalous_frac, "pts": synth_points,
                "pre": cfg.preprocess.__dict__, "G": cfg.encoder.num_group, "K": cfg.encoder.group_size,
                "fpfh": _fpfh_params(cfg.gfcm), **({"rotate": True} if rotate else {}),
                # the canonical order's exact rule and small scans start at the point farthest from
                # the centroid (btp.geometry.sampling.anchored_order): samples made before differ
                **({"order": "anchored"} if cfg.preprocess.sampling_order == "canonical" else {})})
    path = Path(cache_dir) / f"btp-{key}.npz"
    if path.is_file():
        return load_arrays(path)
    scfg = synth.with_points(base, synth_points)
    n_bad = int(round(anomalous_frac * per_shape))
    items, obj, sid = [], [], []
    for s_i, shape in enumerate(shapes):
        surface = synth.load_shape(shape.path, shape.name)
        for i in range(per_shape):
            bad = i < n_bad
            for attempt in range(5):
                sample_seed = synth.sample_seed(seed, shape.name, "btp-train", i + 1000 * attempt)
                try:
                    if bad:
                        kind = defect_kind(scfg.defect_types, n_bad, s_i, i)
                        sample = synth.make_anomalous(surface, sample_seed, scfg, kind if attempt < 2 else None)
                    else:
                        sample = synth.make_normal(surface, sample_seed, scfg)
                    break
                except synth.SynthError:
                    continue
            else:
                log(f"data: skipped {shape.name} sample {i} (no defect could be placed)")
                continue
            points = sample.points
            if rotate:
                rot = random_rotation(np.random.default_rng([sample_seed, 7]))
                points = (points @ rot.T).astype(np.float32)
            items.append(training_sample(points, sample.labels, cfg))
            obj.append(sample.object_label)
            sid.append(s_i)
            if progress:
                progress(1)
    arrays = stack_samples(items, obj, sid)
    save_arrays(path, arrays)
    return arrays
