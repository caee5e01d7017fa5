"""Real-data batches for the btp.model tests: points sampled on the shipped meshes, grouped
with btp.geometry exactly as the runtime does, with a labelled anomalous region."""
from __future__ import annotations

import numpy as np
import torch

from btp.config import BTPConfig
from btp.geometry import fpfh_patches, group_batch, normalize
from btp.io import load_mesh, sample_surface


def _mesh_paths(shapes_root, n):
    paths = sorted(shapes_root.glob("*.ply"))
    bunny = shapes_root / "cgal__stanford_bunny.ply"
    others = [p for p in paths if p != bunny]
    return ([bunny] if bunny.is_file() else []) + others[: n - (1 if bunny.is_file() else 0)]


def real_batch(shapes_root, cfg: BTPConfig, batch_size: int = 2, *, with_fpfh: bool = False, seed: int = 0):
    """Points sampled on real meshes, normalised, grouped as the runtime does; a spherical
    region around one point per cloud is labelled anomalous (cloud 0 normal if batch_size > 1)."""
    n = cfg.preprocess.num_points
    clouds = []
    for i, path in enumerate(_mesh_paths(shapes_root, batch_size)):
        v, f = load_mesh(path)
        pts, _ = sample_surface(v, f, n, seed=seed + i)
        clouds.append(normalize(pts)[0])
    points = np.stack(clouds)  # [B, N, 3]
    groups = group_batch(points, cfg.encoder.num_group, cfg.encoder.group_size, start_idx=cfg.preprocess.fps_start,
                         rgb_fill=cfg.preprocess.rgb_fill, in_channels=cfg.encoder.in_channels)
    labels = np.zeros((batch_size, n), dtype=np.int64)
    for b in range(1, batch_size):
        d = np.linalg.norm(points[b] - points[b, 7], axis=1)
        labels[b, d < np.quantile(d, 0.08)] = 1
    batch = {
        "neighborhood": torch.from_numpy(groups.neighborhood),
        "center": torch.from_numpy(groups.center),
        "patch_idx": torch.from_numpy(groups.patch_idx),
        "center_idx": torch.from_numpy(groups.center_idx),
        "points": torch.from_numpy(points),
        "point_labels": torch.from_numpy(labels),
        "object_label": torch.from_numpy((labels.sum(1) > 0).astype(np.int64)),
    }
    if with_fpfh:
        batch["fpfh"] = torch.from_numpy(np.stack([fpfh_patches(points[b], groups.patch_idx[b], cfg.gfcm)
                                                   for b in range(batch_size)]))
    return batch
