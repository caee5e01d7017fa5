"""Patch -> point scores in torch, differentiable: the runtime's rule, which
``btp.geometry.propagate_patch_scores`` (numpy) defines, on tensors (the loss, and the scores
training calibrates the point threshold on). Both rules for points in no patch,
``scoring.uncovered_points`` (``btp.geometry.scores.UNCOVERED_RULES``), agree with numpy
(tests/test_model.py)."""
from __future__ import annotations

import torch

from btp.geometry.scores import UNCOVERED_RULES


def point_logits_from_patches(
    patch_logits: torch.Tensor,
    patch_idx: torch.Tensor,
    n_points: int,
    *,
    points: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
    point_values: torch.Tensor | None = None,
    uncovered: str = "nearest_center",
    search: str = "exact",
) -> torch.Tensor:
    """Mean of the values (logits or probabilities) of the patches that contain each point -> [B, N].

    patch_logits [B, G], patch_idx [B, G, K] (int64 indices into the N points).
    ``point_values [B, G, K]`` (a model with per-point scores, ``patch_point_logits``): each point
    takes the mean of its own values in the patches that contain it instead.
    Points in no patch (``uncovered``): ``"nearest_center"`` takes the value of the patch whose
    center is nearest (float32 ``(dx*dx + dy*dy) + dz*dz``, ties -> lowest center index, as
    ``btp.geometry.knn``; needs ``points [B, N, 3]`` and ``center [B, G, 3]``); ``"zero"`` gives 0
    (on probabilities: the official BTP-3DAD rule). Differentiable w.r.t. patch_logits.
    ``search="cdist"``: the nearest center by ``torch.cdist`` instead, which can break near-ties
    otherwise; the loss uses it (``btp_loss``), as when the committed models were trained, so that
    their recipes give them again bit for bit.
    """
    if uncovered not in UNCOVERED_RULES:
        raise ValueError(f"uncovered={uncovered!r}: choose one of {UNCOVERED_RULES}")
    if search not in ("exact", "cdist"):
        raise ValueError(f"search={search!r}: choose 'exact' or 'cdist'")
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
    point_logits = sums / counts.clamp_min(1.0)  # uncovered points: 0 here, the "zero" rule
    if uncovered == "zero" or bool(covered.all()):
        return point_logits
    if points is None or center is None:
        raise ValueError("some points lie in no patch: uncovered='nearest_center' needs points [B, N, 3] "
                         "and center [B, G, 3]")
    if search == "cdist":
        nearest = torch.cdist(points.to(center.dtype), center).argmin(dim=-1)  # [B, N]
        return torch.where(covered, point_logits, patch_logits.gather(1, nearest))
    rows, cols = torch.nonzero(~covered, as_tuple=True)  # [U]
    d = points[rows, cols].to(torch.float32)[:, None, :] - center[rows].to(torch.float32)  # [U, G, 3]
    dist2 = (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]  # [U, G]
    nearest = dist2.argmin(dim=1)  # the first minimum: the lowest center index on a tie
    return point_logits.index_put((rows, cols), patch_logits[rows, nearest])
