"""`BTPModel`: PointBERT + GFCM + MGFEM + prompt learner + patch/global/object scoring.

Contract (docs/design.md "btp.model"):
    BTPModel(cfg, text_encoder=None)
    forward(neighborhood [B,G,K,C], center [B,G,3]) -> dict (the outputs of btp.contract.TENSORS, in order) with
        patch_logits [B,G], patch_probs [B,G], global_logit [B], global_prob [B], object_score [B],
        patch_embed [B,G,D], geo_desc [B,G,33]; with cfg.gfcm.point_dim > 0 also
        patch_point_logits / patch_point_probs [B,G,K] (each point's own score in each patch)
    text_embeddings() -> [2, D] (normal, anomaly), L2-normalised (the plain prompts without the
        context tokens when cfg.text.prompt_context is False)
    freeze_text() -> buffer `frozen_text [2, D]`, used from then on (the exported form).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from btp import contract
from btp.config import BTPConfig
from btp.errors import BTPError
from btp.model.heads import GFCM, MGFEM, PointRefine
from btp.model.pointbert import PointBERT
from btp.model.text import TextEncoder, build_text_encoder, context_width

OUTPUT_NAMES = tuple(t.name for t in contract.model_outputs())  # every model's; btp.contract has the rest


class TextNotReadyError(BTPError, RuntimeError):
    """Text embeddings were asked for but there is neither a text encoder nor a frozen copy."""


class BTPModel(nn.Module):
    def __init__(self, cfg: BTPConfig, text_encoder: TextEncoder | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        enc, d = cfg.encoder, cfg.text.embed_dim
        self.point_encoder = PointBERT(enc, d)
        self.gfcm = GFCM(cfg.gfcm)
        self.mgfem = MGFEM(enc.trans_dim, cfg.gfcm.out_dim, cfg.mgfem.hidden, d, len(enc.feature_layers))
        c2 = cfg.gfcm.conv_dims[-1]
        self.point_refine = (PointRefine(c2, 2 * c2 if cfg.gfcm.context_k else c2, cfg.gfcm.point_dim, d)
                             if cfg.gfcm.point_dim else None)
        # hybrid prompt: [SOT] ctx_1..ctx_n "normal object." [EOT]; ctx shared by both prompts (CoOp init std 0.02)
        self.prompt_ctx = nn.Parameter(torch.randn(cfg.text.n_ctx, context_width(cfg.text)) * 0.02)
        self.prompt_texts = [
            cfg.text.normal_template.format(cfg.text.object_name),
            cfg.text.anomaly_template.format(cfg.text.object_name),
        ]
        self.text_encoder = None
        if text_encoder is not None:
            self.attach_text_encoder(text_encoder)
        self.register_buffer("frozen_text", None)  # [2, D] once freeze_text() ran
        self.top_k = max(1, int(cfg.encoder.num_group * cfg.scoring.top_ratio))  # constant k: TopK exports
        self.point_top_k = max(1, int(cfg.encoder.num_group * cfg.encoder.group_size * cfg.scoring.top_ratio))
        self._point_encoder_frozen = False

    # ---- text side ---------------------------------------------------------------------
    def attach_text_encoder(self, text_encoder: TextEncoder) -> None:
        if not isinstance(text_encoder, TextEncoder):
            raise TypeError(f"text_encoder must implement btp.model.text.TextEncoder, got {type(text_encoder).__name__}")
        if text_encoder.embed_dim != self.cfg.text.embed_dim:
            raise ValueError(f"text encoder D={text_encoder.embed_dim} != cfg.text.embed_dim={self.cfg.text.embed_dim}")
        if text_encoder.width != self.prompt_ctx.shape[1]:
            raise ValueError(f"text encoder token width {text_encoder.width} != prompt context width {self.prompt_ctx.shape[1]}")
        self.text_encoder = text_encoder

    @classmethod
    def with_default_text_encoder(cls, cfg: BTPConfig) -> "BTPModel":
        """Model with the config's text encoder (MiniLM weights from its package / untrained OpenCLIP)."""
        return cls(cfg, build_text_encoder(cfg.text))

    @property
    def is_text_frozen(self) -> bool:
        return self.frozen_text is not None

    def text_embeddings(self) -> torch.Tensor:
        """[2, D] (normal, anomaly), L2-normalised; through prompt context + text encoder unless frozen."""
        if self.frozen_text is not None:
            return self.frozen_text
        if self.text_encoder is None:
            raise TextNotReadyError("BTPModel has no text encoder and no frozen text embeddings: "
                                    "pass text_encoder= or load a checkpoint that holds `frozen_text`")
        ctx = self.prompt_ctx if self.cfg.text.prompt_context else self.prompt_ctx[:0]  # [n_ctx | 0, W]
        return F.normalize(self.text_encoder.encode_with_context(ctx, self.prompt_texts), dim=-1)

    @torch.no_grad()
    def freeze_text(self, drop_encoder: bool = False) -> torch.Tensor:
        """Store the current text embeddings in the buffer `frozen_text [2, D]`; forward uses it from now on.
        Already frozen without an encoder (nothing to recompute them from): kept as they are."""
        if self.text_encoder is None and self.frozen_text is not None:
            return self.frozen_text
        self.frozen_text = None
        text = self.text_embeddings().detach().clone().contiguous()
        self.frozen_text = text
        if drop_encoder:
            self.text_encoder = None
        return text

    def unfreeze_text(self) -> None:
        """Back to computing text embeddings through the encoder (needs one attached)."""
        if self.text_encoder is None:
            raise TextNotReadyError("cannot unfreeze: no text encoder attached")
        self.frozen_text = None

    # ---- training helpers --------------------------------------------------------------
    def set_point_encoder_frozen(self, frozen: bool = True) -> None:
        """Freeze the PLM point encoder (spec: only GFCM, MGFEM, prompt context train); its BN stays in eval."""
        self._point_encoder_frozen = frozen
        for p in self.point_encoder.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._point_encoder_frozen:
            self.point_encoder.train(False)
        return self

    # ---- forward -----------------------------------------------------------------------
    def forward(self, neighborhood: torch.Tensor, center: torch.Tensor) -> dict[str, torch.Tensor]:
        # neighborhood [B, G, K, C], center [B, G, 3]
        return self.score(*self.embed(neighborhood, center))

    def embed(self, neighborhood: torch.Tensor, center: torch.Tensor):
        """-> (patch_embed [B, G, D], global_embed [B, D] (not normalised), geo_desc [B, G, 33],
        point_feat [B, G, K, point_dim] or None when cfg.gfcm.point_dim == 0)."""
        feats = self.point_encoder(neighborhood, center)
        patch_xyz = neighborhood[..., :3] + center.unsqueeze(2)  # [B, G, K, 3] absolute
        geo_desc, per_point, pooled = self.gfcm(patch_xyz, center)  # [B, G, 33], ...
        patch_embed = self.mgfem(feats.layer_features, geo_desc, feats.cls)  # [B, G, D]
        point_feat = self.point_refine(per_point, pooled) if self.point_refine is not None else None
        return patch_embed, feats.global_embed, geo_desc, point_feat

    def score(self, patch_embed: torch.Tensor, global_embed: torch.Tensor, geo_desc: torch.Tensor,
              point_feat: torch.Tensor | None = None):
        """The scoring head: embeddings against the text -> the output dict of ``forward``."""
        text = self.text_embeddings().to(patch_embed.dtype)  # [2, D]
        patch_scores = patch_embed @ text.t()  # [B, G, 2] = (s_n, s_a)
        patch_logits = patch_scores[..., 1] - patch_scores[..., 0]  # [B, G]
        patch_probs = torch.sigmoid(patch_logits)  # == softmax([s_n, s_a])[1]
        point_out = {}
        if point_feat is not None:
            # (Z + offset(u)) . (t_a - t_n) = patch logit + u . (W^T (t_a - t_n)): the same text
            # scoring per point, without forming a D-wide embedding for every (patch, point)
            direction = self.point_refine.offset.weight.t() @ (text[1] - text[0])  # [point_dim]
            point_logits = patch_logits.unsqueeze(-1) + point_feat @ direction  # [B, G, K]
            point_out = {"patch_point_logits": point_logits, "patch_point_probs": torch.sigmoid(point_logits)}
        global_scores = F.normalize(global_embed, dim=-1) @ text.t()  # [B, 2]
        global_logit = (global_scores[:, 1] - global_scores[:, 0]) / self.cfg.scoring.global_temperature  # [B]
        global_prob = torch.sigmoid(global_logit)
        # "pooled-points" is scored after the engine (btp.geometry.scores.object_score); the graph's
        # own object_score then reads the per-point probabilities when there are any
        source = self.cfg.scoring.object_source
        if source == "points" or (source == "pooled-points" and point_out):  # validate(): "points" has the head
            top_mean = _top_mean(point_out["patch_point_probs"].flatten(1), self.point_top_k,
                                 self.cfg.encoder.num_group * self.cfg.encoder.group_size)
        else:
            top_mean = _top_mean(patch_probs, self.top_k, self.cfg.encoder.num_group)  # [B]
        alpha = self.cfg.scoring.object_alpha
        object_score = alpha * global_prob + (1.0 - alpha) * top_mean
        out = {
            "patch_logits": patch_logits,
            "patch_probs": patch_probs,
            "global_logit": global_logit,
            "global_prob": global_prob,
            "object_score": object_score,
            "patch_embed": patch_embed,
            "geo_desc": geo_desc,
            **point_out,
        }
        return {t.name: out[t.name] for t in contract.model_outputs(self.cfg)}  # the contract's rows, in order


def _top_mean(values: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """[B, M] -> [B]: the mean of each row's k largest values (M = m, from the config, so that the
    choice is made without reading a traced shape). All of them (top_ratio 1.0) is a plain mean:
    no TopK node, whose k TensorRT caps at 3840 (G * K is 8192 at the default)."""
    if k >= m:
        return values.mean(dim=1)
    return values.topk(k, dim=1).values.mean(dim=1)
