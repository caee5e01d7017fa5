"""PointBERT point encoder in the ULIP-2 layout (spec section 3).

Module and parameter names follow ULIP-2's PointBERT (`encoder.first_conv`, `reduce_dim`,
`cls_token`, `cls_pos`, `pos_embed`, `blocks.blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,
mlp.fc2}`, `norm`) so that converting an official checkpoint is a prefix map
(`module.point_encoder.X` -> `point_encoder.X`, `module.pc_projection` -> `point_encoder.pc_projection`).

Grouping (FPS + kNN) is not in here: the encoder takes `neighborhood [B,G,K,C]` and
`center [B,G,3]` computed outside the graph (btp.geometry / btp.kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from btp.config import EncoderConfig


class MiniPointNet(nn.Module):
    """PointBERT's `Encoder`: per-patch mini-PointNet, [B,G,K,C] -> tokens [B,G,encoder_dims]."""

    def __init__(self, in_channels: int, pointnet_dims: tuple[int, int, int], encoder_dims: int):
        super().__init__()
        p0, p1, p2 = pointnet_dims
        self.first_conv = nn.Sequential(
            nn.Conv1d(in_channels, p0, 1), nn.BatchNorm1d(p0), nn.ReLU(inplace=True), nn.Conv1d(p0, p1, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(2 * p1, p2, 1), nn.BatchNorm1d(p2), nn.ReLU(inplace=True), nn.Conv1d(p2, encoder_dims, 1)
        )

    def forward(self, neighborhood: torch.Tensor) -> torch.Tensor:
        b, g, k, c = neighborhood.shape
        x = neighborhood.reshape(b * g, k, c).transpose(1, 2)  # [BG, C, K]
        feat = self.first_conv(x)  # [BG, p1, K]
        feat_global = feat.max(dim=2, keepdim=True).values  # [BG, p1, 1]
        feat = torch.cat([feat_global.expand(-1, -1, k), feat], dim=1)  # [BG, 2*p1, K]
        feat = self.second_conv(feat).max(dim=2).values  # [BG, encoder_dims]
        return feat.reshape(b, g, -1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, qkv without bias (plain MatMul/Softmax: exports to any backend)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, T, c/H]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # [B, H, T, T]
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(LN(x)); x += mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TransformerEncoder(nn.Module):
    """`blocks.blocks.N`: the positional embedding is added before EVERY block."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> list[torch.Tensor]:
        """Returns the output of every block (before the final norm), [depth] x [B, 1+G, T]."""
        outs = []
        for block in self.blocks:
            x = block(x + pos)
            outs.append(x)
        return outs


@dataclass(kw_only=True)
class PointFeatures:
    """What the point encoder hands to the BTP heads."""

    cls: torch.Tensor  # [B, T] CLS after the final norm, L2-normalised
    patch_tokens: torch.Tensor  # [B, G, T] after the final norm (not normalised)
    layer_features: list[torch.Tensor]  # len(feature_layers) x [B, G, T], before final norm, L2-normalised
    global_embed: torch.Tensor  # [B, D] = [CLS, max over patches] @ pc_projection (not normalised)


class PointBERT(nn.Module):
    """ULIP-2 PointBERT (configurable widths) + `pc_projection` [2*trans_dim, D] into the text space."""

    def __init__(self, cfg: EncoderConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        t = cfg.trans_dim
        self.feature_layers = tuple(int(i) for i in cfg.feature_layers)  # 1-based
        self.encoder = MiniPointNet(cfg.in_channels, tuple(cfg.pointnet_dims), cfg.encoder_dims)
        self.reduce_dim = nn.Linear(cfg.encoder_dims, t)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, t))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, t))
        self.pos_embed = nn.Sequential(nn.Linear(3, cfg.pos_hidden), nn.GELU(), nn.Linear(cfg.pos_hidden, t))
        self.blocks = TransformerEncoder(t, cfg.depth, cfg.num_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(t)
        # ULIP stores it as a bare parameter used as `concat_f @ pc_projection`.
        self.pc_projection = nn.Parameter(torch.empty(2 * t, embed_dim))
        nn.init.normal_(self.pc_projection, std=(2 * t) ** -0.5)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor) -> PointFeatures:
        # neighborhood [B, G, K, C], center [B, G, 3]
        tokens = self.reduce_dim(self.encoder(neighborhood))  # [B, G, T]
        b = tokens.shape[0]
        cls_tokens = self.cls_token.expand(b, -1, -1)  # [B, 1, T]
        cls_pos = self.cls_pos.expand(b, -1, -1)
        x = torch.cat([cls_tokens, tokens], dim=1)  # [B, 1+G, T]
        pos = torch.cat([cls_pos, self.pos_embed(center)], dim=1)  # [B, 1+G, T]
        block_outputs = self.blocks(x, pos)
        x = self.norm(block_outputs[-1])  # [B, 1+G, T]
        layer_features = [F.normalize(block_outputs[i - 1][:, 1:], dim=-1) for i in self.feature_layers]
        concat_f = torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)  # [B, 2T]
        return PointFeatures(
            cls=F.normalize(x[:, 0], dim=-1),
            patch_tokens=x[:, 1:],
            layer_features=layer_features,
            global_embed=concat_f @ self.pc_projection,  # [B, D]
        )

    def backbone_state_keys(self) -> list[str]:
        """State-dict keys of the ULIP-2 encoder proper (everything but `pc_projection`)."""
        return [k for k in self.state_dict() if k != "pc_projection"]
