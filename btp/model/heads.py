"""BTP's trainable heads: GFCM (geometric descriptors) and MGFEM (multi-granularity fusion)."""
from __future__ import annotations

import torch
from torch import nn

from btp.config import GFCMConfig


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class GFCM(nn.Module):
    """Geometric feature creation: absolute patch xyz [B,G,K,3] -> learned descriptor [B,G,out_dim].

    Conv2d(3,c0)-BN-ReLU, Conv2d(c0,c1)-BN-ReLU, Conv2d(c1,c2)-BN-ReLU (1x1), max over K,
    Linear(c2,hidden)-ReLU-Linear(hidden,out_dim) (out_dim = 33, the FPFH width it learns to mimic).
    """

    def __init__(self, cfg: GFCMConfig):
        super().__init__()
        c0, c1, c2 = cfg.conv_dims
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, c0), (c0, c1), (c1, c2)):
            layers += [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.head = _mlp(c2, cfg.hidden, cfg.out_dim)

    def forward(self, patch_xyz: torch.Tensor) -> torch.Tensor:
        # patch_xyz [B, G, K, 3] absolute coordinates
        x = self.convs(patch_xyz.permute(0, 3, 1, 2))  # [B, c2, G, K]
        x = x.max(dim=3).values.transpose(1, 2)  # [B, G, c2]
        return self.head(x)  # [B, G, out_dim]


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
