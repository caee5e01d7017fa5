"""A test-only reference of the official BTP-3DAD forward and scoring, in plain torch functions.

Written from the official code's semantics (ULIP-2 PointTransformer_Colored, GFCM,
MultiLayerFeatureEncoder, test_standard_aupro.py), reading the *official* state-dict key names
directly - no btp model class is used, so a wrong key map or a wrong op in btp shows up here.

    ref_text(clip_sd, token_ids)                 -> normalised text embeddings [P, D]
    ref_forward(point_sd, heads, text, points, center_idx, patch_idx)
                                                 -> patch_probs [B,G], point_scores [B,N],
                                                    global_prob [B], object_score [B]
    ref_fps(xyz [N,3], G), ref_knn(xyz, center, K): pointnet2-style FPS from index 0 (skipping
        |p|^2 <= 1e-3 when asked) and top-k kNN on squared distance
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# CLIP BPE ids of the official prompts ("normal {}." / "defective {}." formatted with ""), as the
# official simple_tokenizer gives them: [SOT, words..., EOT]
OFFICIAL_PROMPT_IDS = ([49406, 5967, 269, 49407], [49406, 4148, 9313, 269, 49407])


def _bn(x, sd, p):
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, eps=1e-5)


def _ln(x, sd, p):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], eps=1e-5)


def _lin(x, sd, p, bias=True):
    return F.linear(x, sd[f"{p}.weight"], sd[f"{p}.bias"] if bias else None)


def ref_text(clip: dict, ids_list=OFFICIAL_PROMPT_IDS, context_length: int = 77) -> torch.Tensor:
    """OpenCLIP encode_text: ids padded with 0 to 77, causal transformer, ln_final, the feature at
    argmax(ids) (the EOT) @ text_projection; then L2-normalised (ULIP2Encoder.encode_text_from_tokens)."""
    ids = torch.zeros(len(ids_list), context_length, dtype=torch.long)
    for i, row in enumerate(ids_list):
        ids[i, : len(row)] = torch.tensor(row)
    x = clip["token_embedding.weight"][ids] + clip["positional_embedding"]
    n_layers = len({k.split(".")[2] for k in clip if k.startswith("transformer.resblocks.")})
    width = x.shape[-1]
    heads = width // 64 or 1
    mask = torch.full((context_length, context_length), float("-inf")).triu(1)
    for i in range(n_layers):
        p = f"transformer.resblocks.{i}"
        h = _ln(x, clip, f"{p}.ln_1")
        qkv = F.linear(h, clip[f"{p}.attn.in_proj_weight"], clip[f"{p}.attn.in_proj_bias"])
        q, k, v = qkv.chunk(3, dim=-1)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (width // heads) ** 0.5 + mask
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
        x = x + _lin(out, clip, f"{p}.attn.out_proj")
        h = _ln(x, clip, f"{p}.ln_2")
        x = x + _lin(F.gelu(_lin(h, clip, f"{p}.mlp.c_fc")), clip, f"{p}.mlp.c_proj")
    x = _ln(x, clip, "ln_final")
    pooled = x[torch.arange(len(ids_list)), ids.argmax(dim=-1)] @ clip["text_projection"]
    return F.normalize(pooled, dim=-1)


def ref_fps(xyz: torch.Tensor, n: int, skip_origin: bool = False) -> torch.Tensor:
    """pointnet2_ops furthest_point_sample on one cloud [N,3] (start index 0; with ``skip_origin``
    a point with |p|^2 <= 1e-3 is never picked, as that kernel does)."""
    d = torch.full((xyz.shape[0],), 1e10)
    allowed = (xyz * xyz).sum(-1) > 1e-3 if skip_origin else torch.ones(xyz.shape[0], dtype=torch.bool)
    idx = [0]
    for _ in range(n - 1):
        d = torch.minimum(d, ((xyz - xyz[idx[-1]]) ** 2).sum(-1))
        idx.append(int(torch.where(allowed, d, torch.tensor(-1.0)).argmax()))
    return torch.tensor(idx)


def ref_knn(xyz: torch.Tensor, center: torch.Tensor, k: int) -> torch.Tensor:
    """knn_point: top-k smallest squared distances -> [G, K] indices."""
    d = (center[:, None, :] - xyz[None, :, :]).pow(2).sum(-1)
    return d.topk(k, dim=-1, largest=False).indices


def ref_forward(point: dict, proj: torch.Tensor, heads: dict, text: torch.Tensor, points: torch.Tensor,
                center_idx: torch.Tensor, patch_idx: torch.Tensor, feature_layers=(2, 5, 8, 11),
                top_ratio: float = 0.2, alpha: float = 0.5, temperature: float = 0.07) -> dict:
    """points [B,N,3] (normalised xyz), center_idx [B,G], patch_idx [B,G,K] -> official scores.

    ``point``: the ULIP-2 point encoder's state dict (keys after ``module.point_encoder.``), ``proj``
    ``module.pc_projection``; ``heads``: best.pth's three state dicts; ``text`` [2, D] normalised."""
    b, n, _ = points.shape
    g, kk = patch_idx.shape[1:]
    rgb = torch.full_like(points, 0.5)
    bidx = torch.arange(b)[:, None]
    center = points[bidx, center_idx]  # [B, G, 3]
    nb_xyz = points[bidx[:, :, None], patch_idx]  # [B, G, K, 3] absolute
    neighborhood = torch.cat([nb_xyz - center[:, :, None], rgb[bidx[:, :, None], patch_idx]], dim=-1)

    # mini-PointNet (Conv1d 1x1 = Linear over channels)
    x = neighborhood.reshape(b * g, kk, 6).transpose(1, 2)  # [BG, 6, K]
    f = F.conv1d(x, point["encoder.first_conv.0.weight"], point["encoder.first_conv.0.bias"])
    f = F.conv1d(F.relu(_bn(f, point, "encoder.first_conv.1")), point["encoder.first_conv.3.weight"],
                 point["encoder.first_conv.3.bias"])
    f = torch.cat([f.max(dim=2, keepdim=True).values.expand(-1, -1, kk), f], dim=1)
    f = F.conv1d(f, point["encoder.second_conv.0.weight"], point["encoder.second_conv.0.bias"])
    f = F.conv1d(F.relu(_bn(f, point, "encoder.second_conv.1")), point["encoder.second_conv.3.weight"],
                 point["encoder.second_conv.3.bias"])
    tokens = _lin(f.max(dim=2).values.reshape(b, g, -1), point, "reduce_dim")
    t = tokens.shape[-1]
    heads_n = t // 64
    pos = _lin(F.gelu(_lin(center, point, "pos_embed.0")), point, "pos_embed.2")
    xx = torch.cat([point["cls_token"].expand(b, -1, -1), tokens], dim=1)
    pos = torch.cat([point["cls_pos"].expand(b, -1, -1), pos], dim=1)
    depth = len({k.split(".")[2] for k in point if k.startswith("blocks.blocks.")})
    layer_feats = {}
    for i in range(depth):
        p = f"blocks.blocks.{i}"
        xx = xx + pos
        h = _ln(xx, point, f"{p}.norm1")
        qkv = F.linear(h, point[f"{p}.attn.qkv.weight"]).reshape(b, g + 1, 3, heads_n, t // heads_n)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (t // heads_n) ** -0.5).softmax(-1)
        xx = xx + _lin((att @ v).transpose(1, 2).reshape(b, g + 1, t), point, f"{p}.attn.proj")
        h = _ln(xx, point, f"{p}.norm2")
        xx = xx + _lin(F.gelu(_lin(h, point, f"{p}.mlp.fc1")), point, f"{p}.mlp.fc2")
        if i + 1 in feature_layers:
            layer_feats[i + 1] = F.normalize(xx.clone(), dim=-1)[:, 1:]
    xx = _ln(xx, point, "norm")
    concat = F.normalize(torch.cat([xx[:, 0], xx[:, 1:].max(1).values], dim=-1) @ proj, dim=-1)
    global_feat = F.normalize(xx[:, 0], dim=-1)

    # GFCM on the absolute xyz of each patch
    pg = {k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith("patch_geo_encoder.")}
    y = nb_xyz.permute(0, 3, 1, 2)  # [B, 3, G, K]
    for i in (1, 2, 3):
        y = F.relu(_bn(F.conv2d(y, pg[f"mlp{i}.0.weight"], pg[f"mlp{i}.0.bias"]), pg, f"mlp{i}.1"))
    y = y.max(dim=-1).values.permute(0, 2, 1)  # [B, G, 256]
    geo = _lin(F.relu(_lin(y, pg, "fc.0")), pg, "fc.2")

    # MultiLayerFeatureEncoder
    pf = {k.split(".", 1)[1]: v for k, v in heads.items() if k.startswith("patch_feature_embedder.")}

    def mlp(z, name):
        return _lin(F.relu(_lin(z, pf, f"{name}.0")), pf, f"{name}.2")

    stacked = torch.stack([mlp(layer_feats[i], "mapper_pointbert") for i in feature_layers])
    fused = (stacked * F.softmax(pf["layer_weights"], dim=0).view(-1, 1, 1, 1)).sum(0)
    z = mlp(torch.cat([fused, mlp(geo, "mapper_fpfh"),
                       mlp(global_feat, "mapper_global").unsqueeze(1).expand(-1, g, -1)], dim=-1), "fusion_proj")

    # scoring (compute_patch_scores, patch_scores_to_point_scores, compute_global_anomaly_score)
    s = torch.stack([z @ text[0], z @ text[1]], dim=-1)
    patch_probs = s.softmax(-1)[..., 1]  # [B, G]
    point_scores = torch.zeros(b, n)
    for bi in range(b):
        acc = torch.zeros(n).index_add_(0, patch_idx[bi].flatten(), patch_probs[bi][:, None].expand(-1, kk).flatten())
        cnt = torch.zeros(n).index_add_(0, patch_idx[bi].flatten(), torch.ones(g * kk))
        point_scores[bi] = acc / (cnt + 1e-6)
    global_prob = torch.sigmoid(((concat * text[1]).sum(-1) - (concat * text[0]).sum(-1)) / temperature)
    top = patch_probs.topk(max(1, int(g * top_ratio)), dim=1).values.mean(1)
    return {"patch_probs": patch_probs, "point_scores": point_scores, "global_prob": global_prob,
            "object_score": alpha * global_prob + (1 - alpha) * top}
