"""BTP's trainable heads: GFCM (geometric descriptors) and MGFEM (multi-granularity fusion)."""
from __future__ import annotations

import torch
from torch import nn

from btp.config import GFCMConfig

_FRAME_SQUARINGS = 12  # power iteration by repeated squaring: eigenvalue ratios enter as r**4096


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def _dominant_eigvec(m: torch.Tensor) -> torch.Tensor:
    """Unit eigenvector of the largest eigenvalue of symmetric PSD ``m [..., 3, 3]`` (sign arbitrary).

    Repeated squaring (trace-normalised) leaves ~ e e^T; its column with the largest diagonal
    entry is a multiple of e. MatMul/ArgMax/GatherElements only, so it exports to ONNX/TensorRT,
    unlike torch.linalg.eigh.
    """
    for _ in range(_FRAME_SQUARINGS):
        m = m @ m
        m = m / m.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[..., None, None]
    idx = m.diagonal(dim1=-2, dim2=-1).argmax(dim=-1)  # [...]
    col = torch.gather(m, -1, idx[..., None, None].expand(*m.shape[:-1], 1)).squeeze(-1)  # [..., 3]
    return col / col.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def local_frame(patch_xyz: torch.Tensor, scale: float) -> torch.Tensor:
    """Patch xyz [B,G,K,3] -> the same points centred on the patch mean, in the patch's principal
    axes (largest, middle, smallest variance), each axis signed so the third moment is >= 0, times
    ``scale``. Invariant to the patch's position and rotation (and to reflections)."""
    x = (patch_xyz - patch_xyz.mean(dim=2, keepdim=True)) * scale  # [B, G, K, 3]
    with torch.no_grad():  # the frame is preprocessing: no gradient flows through it
        cov = x.transpose(2, 3) @ x  # [B, G, 3, 3]
        cov = cov / cov.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[..., None, None]
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        normal = _dominant_eigvec(eye - cov)  # smallest-variance axis
        proj = eye - normal.unsqueeze(-1) * normal.unsqueeze(-2)
        major = _dominant_eigvec(proj @ cov @ proj)
        major = major - (major * normal).sum(-1, keepdim=True) * normal
        major = major / major.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        frame = torch.stack([major, _cross(normal, major), normal], dim=-1)  # [B, G, 3, 3] columns
    y = x @ frame  # [B, G, K, 3]
    sign = torch.where(y.pow(3).sum(dim=2, keepdim=True) >= 0, 1.0, -1.0).to(y.dtype)  # [B, G, 1, 3]
    return y * sign


class GFCM(nn.Module):
    """Geometric feature creation: patch xyz [B,G,K,3] -> learned descriptor [B,G,out_dim].

    Input view: absolute xyz (``frame="world"``, the spec) or ``local_frame`` (``frame="local"``).
    Conv2d(3,c0)-BN-ReLU, Conv2d(c0,c1)-BN-ReLU, Conv2d(c1,c2)-BN-ReLU (1x1), max over K, then
    (``context_k > 0``) [h, h - mean of h over the context_k nearest patches], then
    Linear(.,hidden)-ReLU-Linear(hidden,out_dim) (out_dim = 33, the FPFH width it learns to mimic).
    """

    def __init__(self, cfg: GFCMConfig):
        super().__init__()
        c0, c1, c2 = cfg.conv_dims
        self.frame, self.local_scale, self.context_k = cfg.frame, cfg.local_scale, cfg.context_k
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, c0), (c0, c1), (c1, c2)):
            layers += [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.head = _mlp(2 * c2 if cfg.context_k else c2, cfg.hidden, cfg.out_dim)

    def forward(self, patch_xyz: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(patch_xyz, center)[0]

    def encode(self, patch_xyz: torch.Tensor, center: torch.Tensor | None = None):
        """-> (descriptor [B, G, out_dim], per-point conv features [B, c2, G, K], the pooled patch
        feature the head reads [B, G, c2] or [B, G, 2 c2] with context)."""
        # patch_xyz [B, G, K, 3] absolute coordinates; center [B, G, 3] (needed when context_k > 0)
        if self.frame == "local":
            patch_xyz = local_frame(patch_xyz, self.local_scale)
        per_point = self.convs(patch_xyz.permute(0, 3, 1, 2))  # [B, c2, G, K]
        x = per_point.max(dim=3).values.transpose(1, 2)  # [B, G, c2]
        if self.context_k:
            if center is None:
                raise ValueError("GFCM with context_k > 0 needs the patch centres")
            dist = torch.cdist(center, center)  # [B, G, G]
            kth = dist.topk(self.context_k, dim=-1, largest=False).values[..., -1:]  # [B, G, 1]
            near = (dist <= kth).to(x.dtype)  # self included; ties may add a neighbour
            context = (near / near.sum(dim=-1, keepdim=True)) @ x  # [B, G, c2]
            x = torch.cat([x, x - context], dim=-1)
        return self.head(x), per_point, x  # [B, G, out_dim], [B, c2, G, K], [B, G, c2 | 2 c2]


class PointRefine(nn.Module):
    """Back to the points: a feature u [B, G, K, point_dim] for every point of every patch.

    u = ReLU(W_p f + W_h h + b), f = the point's GFCM conv feature in that patch, h = the patch's
    pooled GFCM feature. ``offset`` maps u to the text space (Linear(point_dim, D), no bias,
    zero-initialised so training starts from the patch scores): the point's embedding in that
    patch is Z + offset(u), scored against the text like Z.
    """

    def __init__(self, point_in: int, patch_in: int, point_dim: int, embed_dim: int):
        super().__init__()
        self.point_proj = nn.Conv2d(point_in, point_dim, 1)
        self.patch_proj = nn.Linear(patch_in, point_dim, bias=False)
        self.offset = nn.Linear(point_dim, embed_dim, bias=False)
        nn.init.zeros_(self.offset.weight)

    def forward(self, per_point: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        # per_point [B, c, G, K], pooled [B, G, P] -> u [B, G, K, point_dim]
        u = self.point_proj(per_point).permute(0, 2, 3, 1) + self.patch_proj(pooled).unsqueeze(2)
        return torch.relu(u)


class MGFEM(nn.Module):
    """Multi-granularity fusion -> patch embedding Z [B,G,D] (not normalised).

    ONE shared MLP(T->hidden->D) over each layer feature, softmax-weighted sum over layers
    (weights init 1); descriptor MLP(33->hidden->D); CLS MLP(T->hidden->D) broadcast to every
    patch; concat [3D] -> Linear(3D,D)-ReLU-Linear(D,D).
    """

    def __init__(self, trans_dim: int, desc_dim: int, hidden: int, embed_dim: int, n_layers: int):
        super().__init__()
        self.layer_mlp = _mlp(trans_dim, hidden, embed_dim)
        self.layer_weights = nn.Parameter(torch.ones(n_layers))
        self.desc_mlp = _mlp(desc_dim, hidden, embed_dim)
        self.cls_mlp = _mlp(trans_dim, hidden, embed_dim)
        self.fuse = _mlp(3 * embed_dim, embed_dim, embed_dim)

    def forward(self, layer_features: list[torch.Tensor], geo_desc: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        # layer_features L x [B, G, T]; geo_desc [B, G, 33]; cls [B, T]
        per_layer = torch.stack([self.layer_mlp(f) for f in layer_features], dim=0)  # [L, B, G, D]
        weights = self.layer_weights.softmax(dim=0).reshape(-1, 1, 1, 1)  # [L, 1, 1, 1]
        layer_embed = (weights * per_layer).sum(dim=0)  # [B, G, D]
        desc_embed = self.desc_mlp(geo_desc)  # [B, G, D]
        cls_embed = self.cls_mlp(cls).unsqueeze(1).expand_as(layer_embed)  # [B, G, D]
        return self.fuse(torch.cat([layer_embed, desc_embed, cls_embed], dim=-1))  # [B, G, D]
