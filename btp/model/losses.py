"""BTP's joint loss (spec "Training"):

    total = focal(point logits, point labels; gamma, alpha) + dice_weight * dice(point probs)
          + global_weight * BCE(a * global_logit + (1 - a) * max patch logit, object label)
          + geometric_weight * geometric(GFCM descriptors, patch FPFH)

Point logits are the patch logits propagated to the N points (mean over containing patches), or
with per-point scores (``patch_point_logits``) the mean of each point's own logits in those patches;
points in no patch take their nearest center's logit, whatever ``scoring.uncovered_points`` says
(its "zero" is a probability of 0, which has no finite logit).
The geometric term is InfoNCE (temperature cfg.gfcm.temperature) by default; cosine and MSE
are the alternatives (cfg.gfcm.loss).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from btp.config import GFCMConfig, LossConfig
from btp.model.scoring import point_logits_from_patches


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float = 2.0, alpha: float = 0.25) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet form; alpha weighs the positives), mean over elements."""
    labels = labels.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
    return (alpha_t * (1 - p_t) ** gamma * ce).mean()


def balanced_bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with the positives weighted by (#negatives / #positives) of the batch, so both classes
    weigh the same however rare the anomalous points are; mean over elements."""
    labels = labels.to(logits.dtype)
    pos = labels.sum()
    pos_weight = ((labels.numel() - pos) / pos.clamp_min(1.0)).detach()
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pos_weight)


def dice_loss(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample ([B, N]), averaged over the batch (eps smooths all-normal samples)."""
    labels = labels.to(probs.dtype)
    inter = (probs * labels).sum(dim=-1)
    return (1 - (2 * inter + eps) / (probs.sum(dim=-1) + labels.sum(dim=-1) + eps)).mean()


def geometric_loss(geo_desc: torch.Tensor, fpfh: torch.Tensor, kind: str = "infonce",
                   temperature: float = 0.1) -> torch.Tensor:
    """GFCM descriptors [B, G, 33] vs patch FPFH targets [B, G, 33].

    infonce: per cloud, patch i's descriptor must pick its own FPFH among the cloud's G patches
             (cosine similarities / temperature, cross-entropy both ways, averaged);
    cosine:  mean(1 - cos(desc, fpfh)); mse: mean squared error against the targets as given.
    """
    if geo_desc.shape != fpfh.shape:
        raise ValueError(f"geo_desc {tuple(geo_desc.shape)} and fpfh {tuple(fpfh.shape)} differ")
    fpfh = fpfh.to(geo_desc.dtype)
    if kind == "mse":
        return F.mse_loss(geo_desc, fpfh)
    d, t = F.normalize(geo_desc, dim=-1), F.normalize(fpfh, dim=-1)
    if kind == "cosine":
        return (1 - (d * t).sum(dim=-1)).mean()
    if kind == "infonce":
        sim = d @ t.transpose(1, 2) / temperature  # [B, G, G]
        b, g, _ = sim.shape
        target = torch.arange(g, device=sim.device).expand(b, g).reshape(-1)
        forward = F.cross_entropy(sim.reshape(b * g, g), target)
        backward = F.cross_entropy(sim.transpose(1, 2).reshape(b * g, g), target)
        return 0.5 * (forward + backward)
    raise ValueError(f"unknown geometric loss {kind!r}: expected 'infonce', 'cosine' or 'mse'")


def btp_loss(
    outputs: Mapping[str, torch.Tensor],
    batch: Mapping[str, torch.Tensor],
    cfg: LossConfig,
    *,
    gfcm: GFCMConfig | None = None,
    object_alpha: float = 0.5,
    point_top_k: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-> (total loss, parts {focal, dice, global, geometric} detached).

    outputs: BTPModel.forward's dict (`patch_logits [B,G]`, `global_logit [B]`, `geo_desc [B,G,33]`).
    batch:   `patch_idx [B,G,K]` int64, `point_labels [B,N]` (0/1), `object_label [B]` (0/1);
             `points [B,N,3]` + `center [B,G,3]` (needed when points lie in no patch: they take
             their nearest center's logit) and optional `fpfh [B,G,33]` (without it the geometric
             term is 0).
    object_alpha: the a of the global term (pass cfg.scoring.object_alpha).
    point_top_k: with ``cfg.object_term == "points-top"``, how many per-point logits
    (``patch_point_logits [B,G,K]``) the global term's mean reads: required then (pass the
    model's ``point_top_k``), ignored otherwise.
    """
    gfcm = gfcm or GFCMConfig()
    patch_logits = outputs["patch_logits"]
    point_labels = batch["point_labels"]
    point_logits = point_logits_from_patches(
        patch_logits, batch["patch_idx"], point_labels.shape[1],
        points=batch.get("points"), center=batch.get("center"), point_values=outputs.get("patch_point_logits"),
        uncovered="nearest_center", search="cdist",  # the search the committed models were trained with
    )  # [B, N]
    if cfg.point_loss == "balanced-bce":
        focal = balanced_bce_loss(point_logits, point_labels)
    elif cfg.point_loss == "focal":
        focal = focal_loss(point_logits, point_labels, cfg.focal_gamma, cfg.focal_alpha)
    else:
        raise ValueError(f"unknown point loss {cfg.point_loss!r}: expected 'focal' or 'balanced-bce'")
    dice = dice_loss(torch.sigmoid(point_logits), point_labels)
    if cfg.object_term == "points-top":
        if point_top_k is None or point_top_k < 1:
            raise ValueError(f"btp_loss: loss.object_term='points-top' needs point_top_k >= 1 (the model's "
                             f"point_top_k), got {point_top_k!r}")
        local = outputs["patch_point_logits"].flatten(1).topk(point_top_k, dim=1).values.mean(dim=1)
    else:
        local = patch_logits.max(dim=1).values
    object_logit = object_alpha * outputs["global_logit"] + (1 - object_alpha) * local
    global_term = F.binary_cross_entropy_with_logits(object_logit, batch["object_label"].to(object_logit.dtype))
    if "fpfh" in batch and batch["fpfh"] is not None:
        geometric = geometric_loss(outputs["geo_desc"], batch["fpfh"], gfcm.loss, gfcm.temperature)
    else:
        geometric = patch_logits.new_zeros(())
    # parts["focal"] is the point term, whichever form cfg.point_loss picks
    total = focal + cfg.dice_weight * dice + cfg.global_weight * global_term + cfg.geometric_weight * geometric
    parts = {"focal": focal, "dice": dice, "global": global_term, "geometric": geometric}
    return total, {k: v.detach() for k, v in parts.items()}
