"""Patch -> point scores in torch (for the loss); the numpy twin is btp.geometry.propagate_patch_scores."""
from __future__ import annotations

import torch


def point_logits_from_patches(
    patch_logits: torch.Tensor,
    patch_idx: torch.Tensor,
    n_points: int,
    *,
    points: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    point_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the logits of the patches that contain each point -> [B, N].

    patch_logits [B, G], patch_idx [B, G, K] (int64 indices into the N points).
    ``point_values [B, G, K]`` (a model with per-point scores, ``patch_point_logits``): each point
    takes the mean of its own values in the patches that contain it instead.
    Points in no patch take the logit of their nearest centre when `points [B, N, 3]` and
    `center [B, G, 3]` are given (spec section 8), else 0 (probability 0.5).
    Differentiable w.r.t. patch_logits.
    """
    if patch_idx.dim() != 3 or patch_logits.shape != patch_idx.shape[:2]:
        raise ValueError(f"patch_logits {tuple(patch_logits.shape)} and patch_idx {tuple(patch_idx.shape)} "
                         "must be [B, G] and [B, G, K]")
    b, g, k = patch_idx.shape
    idx = patch_idx.reshape(b, g * k).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_points):
        raise ValueError(f"patch_idx holds indices outside [0, {n_points})")
    if point_values is not None and point_values.shape != patch_idx.shape:
        raise ValueError(f"point_values {tuple(point_values.shape)} must be [B, G, K] like patch_idx")
    values = point_values if point_values is not None else patch_logits.unsqueeze(-1).expand(b, g, k)
    values = values.reshape(b, g * k)
    sums = patch_logits.new_zeros(b, n_points).scatter_add(1, idx, values)  # [B, N]
    counts = patch_logits.new_zeros(b, n_points).scatter_add(1, idx, torch.ones_like(values))
    covered = counts > 0
    point_logits = sums / counts.clamp_min(1.0)
    if points is not None and center is not None and not bool(covered.all()):
        nearest = torch.cdist(points.to(center.dtype), center).argmin(dim=-1)  # [B, N]
        fallback = patch_logits.gather(1, nearest)  # [B, N]
        point_logits = torch.where(covered, point_logits, fallback)
    return point_logits
