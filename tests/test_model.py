"""btp.model: the BTP network (spec sections 3-10), text encoders, prompt learning, losses, ONNX-ability."""
from __future__ import annotations

import gzip
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from btp.config import tiny_config, ulip2_config
from btp.geometry import propagate_patch_scores
from btp.geometry.scores import UNCOVERED_RULES
from btp.model import (OUTPUT_NAMES, BTPModel, MiniLMTextEncoder, OpenCLIPTextEncoder, TextNotReadyError,
                       btp_loss, point_logits_from_patches)
from btp.model.losses import dice_loss, focal_loss, geometric_loss
from btp.model.pointbert import PointBERT
from btp.model.tokenizer import CLIPTokenizer, VocabError
from model_batches import real_batch



@pytest.fixture(scope="module")
def tiny():
    return tiny_config()


@pytest.fixture(scope="module")
def tiny_model(tiny):
    torch.manual_seed(0)
    return BTPModel.with_default_text_encoder(tiny)


@pytest.fixture(scope="module")
def tiny_batch(shapes_root, tiny):
    return real_batch(shapes_root, tiny, 2, with_fpfh=True)


# ---- forward contract and scoring ------------------------------------------------------------

def test_forward_outputs_follow_the_contract_and_the_scoring_spec(tiny_model, tiny_batch, tiny):
    tiny_model.eval()
    b, g = tiny_batch["center"].shape[:2]
    d = tiny.text.embed_dim
    with torch.no_grad():
        out = tiny_model(tiny_batch["neighborhood"], tiny_batch["center"])
        text = tiny_model.text_embeddings()
    assert tuple(out) == OUTPUT_NAMES
    shapes = {"patch_logits": (b, g), "patch_probs": (b, g), "global_logit": (b,), "global_prob": (b,),
              "object_score": (b,), "patch_embed": (b, g, d), "geo_desc": (b, g, tiny.gfcm.out_dim)}
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert all(torch.isfinite(v).all() for v in out.values())
    assert text.shape == (2, d) and torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    # patch: s = Z . t ; logit = s_a - s_n ; prob = softmax([s_n, s_a])[1]
    s = out["patch_embed"] @ text.t()
    assert torch.allclose(out["patch_logits"], s[..., 1] - s[..., 0], atol=1e-5)
    assert torch.allclose(out["patch_probs"], s.softmax(dim=-1)[..., 1], atol=1e-6)
    # object: alpha * global_prob + (1 - alpha) * mean of the top 20 % patch probs
    k = int(g * tiny.scoring.top_ratio)
    top = torch.sort(out["patch_probs"], dim=1, descending=True).values[:, :k].mean(1)
    a = tiny.scoring.object_alpha
    assert torch.allclose(out["object_score"], a * out["global_prob"] + (1 - a) * top, atol=1e-6)
    assert torch.allclose(out["global_prob"], torch.sigmoid(out["global_logit"]))


def _reference_point_side(model: BTPModel, neighborhood, center):
    """Spec section 3-5 written out op by op with the model's weights (independent of its forward)."""
    pb, enc = model.point_encoder, model.cfg.encoder
    b, g, k, c = neighborhood.shape
    x = neighborhood.reshape(b * g, k, c).transpose(1, 2)
    f = pb.encoder.first_conv(x)
    f = torch.cat([f.max(2, keepdim=True).values.expand(-1, -1, k), f], 1)
    tokens = pb.reduce_dim(pb.encoder.second_conv(f).max(2).values.reshape(b, g, -1))
    h = torch.cat([pb.cls_token.expand(b, -1, -1), tokens], 1)
    pos = torch.cat([pb.cls_pos.expand(b, -1, -1), pb.pos_embed(center)], 1)
    layer_feats = []
    for i, blk in enumerate(pb.blocks.blocks, start=1):
        h = h + pos  # positional embedding before EVERY block
        y = blk.norm1(h)
        qkv = F.linear(y, blk.attn.qkv.weight)  # no bias
        q, kk, v = qkv.reshape(b, g + 1, 3, enc.num_heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, kk, v).transpose(1, 2).reshape(b, g + 1, -1)
        h = h + blk.attn.proj(att)
        h = h + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(h))))
        if i in enc.feature_layers:
            layer_feats.append(F.normalize(h[:, 1:], dim=-1))
    h = pb.norm(h)
    glob = torch.cat([h[:, 0], h[:, 1:].max(1).values], -1) @ pb.pc_projection
    return F.normalize(h[:, 0], dim=-1), layer_feats, glob


def test_pointbert_matches_the_spec_written_out(tiny_model, tiny_batch):
    tiny_model.eval()
    with torch.no_grad():
        feats = tiny_model.point_encoder(tiny_batch["neighborhood"], tiny_batch["center"])
        cls, layers, glob = _reference_point_side(tiny_model, tiny_batch["neighborhood"], tiny_batch["center"])
    assert torch.allclose(feats.cls, cls, atol=1e-5)
    assert len(feats.layer_features) == len(layers) == len(tiny_model.cfg.encoder.feature_layers)
    for ours, ref in zip(feats.layer_features, layers):
        assert torch.allclose(ours, ref, atol=1e-5)
        assert torch.allclose(ours.norm(dim=-1), torch.ones(ours.shape[:2]), atol=1e-5)
    assert torch.allclose(feats.global_embed, glob, atol=1e-4)


def test_feature_layers_are_one_based():
    cfg = tiny_config()
    cfg.encoder.feature_layers = (1, 4)
    model = BTPModel(cfg).eval()
    nb, ctr = torch.randn(1, cfg.encoder.num_group, cfg.encoder.group_size, 6), torch.randn(1, cfg.encoder.num_group, 3)
    with torch.no_grad():
        feats = model.point_encoder(nb, ctr)
        outs = model.point_encoder.blocks(
            torch.cat([model.point_encoder.cls_token, model.point_encoder.reduce_dim(model.point_encoder.encoder(nb))], 1),
            torch.cat([model.point_encoder.cls_pos, model.point_encoder.pos_embed(ctr)], 1))
    assert torch.allclose(feats.layer_features[0], F.normalize(outs[0][:, 1:], dim=-1), atol=1e-6)
    assert torch.allclose(feats.layer_features[1], F.normalize(outs[3][:, 1:], dim=-1), atol=1e-6)


def test_ulip2_encoder_has_the_spec_tensor_and_parameter_counts():
    """Spec: 226 tensors, 32.5M parameters. The 226 are state-dict tensors *including* the two
    BatchNorm layers' buffers (running_mean, running_var, num_batches_tracked: 6 tensors), i.e.
    220 parameters + 6 buffers; `pc_projection` [768, 1280] is counted separately by ULIP
    (it lives on the ULIP model, not in the point encoder)."""
    cfg = ulip2_config()
    pb = PointBERT(cfg.encoder, cfg.text.embed_dim)
    keys = pb.backbone_state_keys()
    params = {n: p for n, p in pb.named_parameters() if n != "pc_projection"}
    assert len(keys) == 226
    assert len(params) == 220
    n_params = sum(p.numel() for p in params.values())
    assert 32.45e6 < n_params < 32.55e6, n_params
    sd = pb.state_dict()
    assert sd["encoder.first_conv.0.weight"].shape == (128, 6, 1)
    assert sd["encoder.second_conv.3.weight"].shape == (256, 512, 1)
    assert sd["blocks.blocks.17.attn.qkv.weight"].shape == (3 * 384, 384)
    assert "blocks.blocks.0.attn.qkv.bias" not in sd
    assert sd["pc_projection"].shape == (768, 1280)


def test_mgfem_uses_one_shared_layer_mlp_and_unit_layer_weights(tiny_model, tiny):
    mg = tiny_model.mgfem
    assert torch.equal(mg.layer_weights.detach(), torch.ones(len(tiny.encoder.feature_layers)))
    assert mg.layer_mlp[0].in_features == tiny.encoder.trans_dim
    assert mg.fuse[0].in_features == 3 * tiny.text.embed_dim and mg.fuse[2].out_features == tiny.text.embed_dim
    # swapping two equally weighted layer features changes nothing: one MLP shared by all layers
    g, d = 5, tiny.encoder.trans_dim
    feats = [torch.randn(1, g, d) for _ in tiny.encoder.feature_layers]
    desc, cls = torch.randn(1, g, 33), torch.randn(1, d)
    with torch.no_grad():
        assert torch.allclose(mg(feats, desc, cls), mg(feats[::-1], desc, cls), atol=1e-6)


def test_gfcm_sees_absolute_patch_coordinates(tiny_model, tiny_batch):
    """geo_desc depends on where the patch is (neighborhood + center), not only on its shape."""
    tiny_model.eval()
    nb, ctr = tiny_batch["neighborhood"], tiny_batch["center"]
    with torch.no_grad():
        a = tiny_model(nb, ctr)["geo_desc"]
        direct = tiny_model.gfcm(nb[..., :3] + ctr[:, :, None])[0]
        moved = tiny_model(nb, ctr + 0.3)["geo_desc"]
    assert torch.allclose(a, direct, atol=1e-6)
    assert not torch.allclose(a, moved, atol=1e-3)


def test_local_frame_is_pose_invariant_and_uses_the_principal_axes(tiny_batch):
    """frame="local": same output for a rotated/translated/reflected patch; axes = eigh's, variance-sorted."""
    from btp.model.heads import local_frame

    xyz = (tiny_batch["neighborhood"][..., :3] + tiny_batch["center"][:, :, None]).double()
    torch.manual_seed(0)
    rot, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))  # includes reflections half the time
    ref = local_frame(xyz, 10.0)
    moved = local_frame(xyz @ rot.T + torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64), 10.0)
    assert torch.allclose(ref, moved, atol=1e-6)
    centered = (xyz - xyz.mean(dim=2, keepdim=True)) * 10.0
    _, vecs = torch.linalg.eigh(centered.transpose(2, 3) @ centered)  # ascending eigenvalues
    expect = (centered @ vecs.flip(-1)).abs()  # largest-variance axis first
    assert torch.allclose(ref.abs(), expect, atol=1e-5)
    assert (ref.pow(3).sum(dim=2) >= -1e-9).all()  # signs fixed by the third moment
    var = ref.pow(2).mean(dim=2)
    assert (var[..., 0] >= var[..., 1] - 1e-9).all() and (var[..., 1] >= var[..., 2] - 1e-9).all()


def test_gfcm_local_frame_and_context_export_and_match(tiny_batch):
    """The pose-invariant GFCM (+ neighbour context) is plain ONNX and ORT matches torch."""
    import onnxruntime as ort

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k = "local", 4
    torch.manual_seed(1)
    model = BTPModel(cfg.validate()).gfcm.eval()
    nb, ctr = tiny_batch["neighborhood"][:1], tiny_batch["center"][:1]
    xyz = nb[..., :3] + ctr[:, :, None]
    torch.manual_seed(2)
    rot, _ = torch.linalg.qr(torch.randn(3, 3))
    with torch.no_grad():
        ref = model(xyz, ctr)[0]  # the descriptor
        # rotating the whole cloud changes neither the local shapes nor who neighbours whom
        assert torch.allclose(model(xyz @ rot.T, ctr @ rot.T)[0], ref, atol=1e-4)
        no_context = model.head[0].weight.shape[1] == cfg.gfcm.conv_dims[-1]
    assert not no_context  # [h, h - context] doubles the head's input
    buf = io.BytesIO()
    torch.onnx.export(model, (xyz, ctr), buf, opset_version=17, dynamo=False, input_names=["xyz", "center"])
    import onnx

    from btp.export.onnx import unsupported_trt_ops

    assert unsupported_trt_ops(onnx.load_from_string(buf.getvalue())) == []  # TensorRT parses it too
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"xyz": xyz.numpy(), "center": ctr.numpy()})[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


# ---- text side ---------------------------------------------------------------------------------

def test_prompt_context_flows_through_the_openclip_text_encoder(tiny):
    torch.manual_seed(1)
    model = BTPModel.with_default_text_encoder(tiny)
    text = model.text_embeddings()
    (text[1] - text[0]).pow(2).sum().backward()
    grad = model.prompt_ctx.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())  # frozen tower
    with torch.no_grad():
        model.prompt_ctx.add_(0.5 * torch.randn_like(model.prompt_ctx))
        assert not torch.allclose(model.text_embeddings(), text.detach(), atol=1e-4)


def test_minilm_text_encoder_is_offline_and_learns_context(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    enc = MiniLMTextEncoder()
    assert enc.embed_dim == 384 and enc.width == 384
    ctx = torch.nn.Parameter(torch.randn(4, 384) * 0.02)
    texts = ["normal object.", "defective object."]
    emb = enc.encode_with_context(ctx, texts)
    assert emb.shape == (2, 384)
    emb[0].dot(emb[1]).backward()
    assert ctx.grad.abs().sum() > 0
    with torch.no_grad():
        other = enc.encode_with_context(ctx + 0.05 * torch.randn_like(ctx), texts)  # (a constant shift would vanish in BERT's embedding LayerNorm)
        # without context the encoder is plain sentence embedding: equal texts agree, different ones do not
        assert not torch.allclose(other, emb, atol=1e-4)
        plain = F.normalize(enc.encode_with_context(torch.zeros(0, 384), ["a chair.", "a chair.", "a dog."]), dim=-1)
    assert plain[0].dot(plain[1]) > 0.999 and plain[0].dot(plain[2]) < 0.9


def test_freeze_text_makes_forward_independent_of_the_text_encoder(tiny, tiny_batch):
    torch.manual_seed(2)
    model = BTPModel.with_default_text_encoder(tiny).eval()
    with torch.no_grad():
        before = model(tiny_batch["neighborhood"], tiny_batch["center"])
    frozen = model.freeze_text(drop_encoder=True)
    assert model.text_encoder is None and "frozen_text" in model.state_dict()
    assert model.state_dict()["frozen_text"].shape == (2, tiny.text.embed_dim)
    with torch.no_grad():
        after = model(tiny_batch["neighborhood"], tiny_batch["center"])
    for name in OUTPUT_NAMES:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    assert torch.equal(model.text_embeddings(), frozen)
    bare = BTPModel(tiny)
    with pytest.raises(TextNotReadyError):
        bare(tiny_batch["neighborhood"], tiny_batch["center"])


def _reference_openclip_encode_text(enc: OpenCLIPTextEncoder, ids: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's encode_text as published: full 77-token context, torch's nn.MultiheadAttention
    with an additive -inf causal mask, pooling at the EOT token (the highest id)."""
    x = enc.token_embedding(ids) + enc.positional_embedding
    mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for blk in enc.transformer.resblocks:
        mha = torch.nn.MultiheadAttention(enc.width, enc.heads, batch_first=True)
        mha.load_state_dict({"in_proj_weight": blk.attn.in_proj_weight, "in_proj_bias": blk.attn.in_proj_bias,
                             "out_proj.weight": blk.attn.out_proj.weight, "out_proj.bias": blk.attn.out_proj.bias})
        y = blk.ln_1(x)
        x = x + mha(y, y, y, need_weights=False, attn_mask=mask)[0]
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(x))))
    x = enc.ln_final(x)
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ enc.text_projection


def test_openclip_text_encoder_matches_the_published_encode_text(tiny):
    """Context vectors equal to real token embeddings must give exactly the embedding of the
    plain token sequence: checks context placement, attention layout, causal mask, EOT pooling."""
    torch.manual_seed(6)
    enc = OpenCLIPTextEncoder.from_config(tiny.text)
    tok = enc.tokenizer
    ctx_ids, word_ids = tok.encode("a photo of"), tok.encode("a scratched object.")
    ids = torch.zeros(1, enc.context_length, dtype=torch.long)
    row = [tok.sot_id] + ctx_ids + word_ids + [tok.eot_id]
    ids[0, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        ctx = enc.token_embedding.weight[ctx_ids]  # [n_ctx, width]
        ours = enc.encode_with_context(ctx, ["a scratched object."])
        ref = _reference_openclip_encode_text(enc, ids)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_clip_tokenizer_matches_openai_clip_ids():
    tok = CLIPTokenizer()
    assert tok.vocab_size == 49408 and (tok.sot_id, tok.eot_id) == (49406, 49407)
    # ids published with OpenAI CLIP's SimpleTokenizer for "hello world"
    assert tok.encode("Hello   world") == [3306, 1002]
    assert tok.encode("defective object.") == tok.encode("DEFECTIVE object .".replace(" .", "."))


def test_clip_tokenizer_with_a_tiny_synthetic_vocab(tmp_path):
    vocab = tmp_path / "tiny_bpe.txt.gz"
    with gzip.open(vocab, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    tok = CLIPTokenizer(vocab)
    assert tok.vocab_size == 512 + 3 + 2
    inv = {i: s for s, i in tok.encoder.items()}
    assert [inv[i] for i in tok.encode("low lower")] == ["low</w>", "lo", "w", "er</w>"]
    with pytest.raises(VocabError):
        CLIPTokenizer(tmp_path / "absent.txt.gz")


# ---- ULIP-2 shapes -----------------------------------------------------------------------------

def test_full_model_forward_backward_at_ulip2_shapes(shapes_root):
    """The point side at the exact ULIP-2 config (G=512, K=32, C=6, depth 18, D=1280) with an
    OpenCLIP text tower of the bigG width (1280, 20 heads) but 2 layers: the real 32-layer bigG
    tower is ~700M parameters (2.8 GB fp32), too big for a test on a 2-core CPU; depth does
    not change any interface the model relies on."""
    cfg = ulip2_config()
    cfg.text.layers = 2
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg)
    model.train()
    batch = real_batch(shapes_root, cfg, batch_size=1)
    batch["object_label"] = torch.ones(1, dtype=torch.long)
    out = model(batch["neighborhood"], batch["center"])
    assert out["patch_embed"].shape == (1, 512, 1280) and out["patch_logits"].shape == (1, 512)
    total, parts = btp_loss(out, batch, cfg.loss, gfcm=cfg.gfcm, object_alpha=cfg.scoring.object_alpha)
    total.backward()
    assert torch.isfinite(total)
    assert model.prompt_ctx.grad.abs().sum() > 0
    assert model.mgfem.fuse[2].weight.grad.abs().sum() > 0
    assert model.point_encoder.blocks.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ---- point scores and losses -------------------------------------------------------------------

@pytest.mark.parametrize("uncovered", UNCOVERED_RULES)
@pytest.mark.parametrize("per_point", [False, True])
def test_point_scores_match_the_numpy_propagation(tiny_batch, tiny, uncovered, per_point):
    """The torch propagation is btp.geometry.propagate_patch_scores (the runtime's rule) under both
    ``scoring.uncovered_points`` rules, incl. points in no patch (G*K < N here), with and without
    per-point values, on probabilities as training calibrates its point threshold."""
    torch.manual_seed(3)
    b, g, k = tiny_batch["patch_idx"].shape
    n = tiny.preprocess.num_points
    probs = torch.rand(b, g)
    values = torch.rand(b, g, k) if per_point else None
    ours = point_logits_from_patches(probs, tiny_batch["patch_idx"], n, points=tiny_batch["points"],
                                     center=tiny_batch["center"], point_values=values, uncovered=uncovered)
    covered = torch.zeros(b, n, dtype=torch.bool)
    covered.scatter_(1, tiny_batch["patch_idx"].reshape(b, -1), True)
    assert (~covered).any(), "the tiny config must leave points uncovered for this test to bite"
    for i in range(b):
        ref = propagate_patch_scores(probs[i].numpy(), tiny_batch["patch_idx"][i].numpy(),
                                     tiny_batch["center"][i].numpy(), tiny_batch["points"][i].numpy(), uncovered,
                                     None if values is None else values[i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-6)
    uncovered_scores = ours[~covered]
    if uncovered == "zero":
        assert (uncovered_scores == 0).all()
    else:  # each takes a patch's own probability
        assert (uncovered_scores > 0).all() and torch.isin(uncovered_scores, probs).all()


def test_nearest_center_ties_go_to_the_lowest_center_as_in_numpy():
    """Two centers at the same distance from an uncovered point: both sides take the lower index."""
    points = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.5]]])
    center = torch.tensor([[[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]]])
    patch_idx = torch.tensor([[[1], [2]]])  # points 0 and 3 lie in no patch; both centers are as near
    probs = torch.tensor([[0.2, 0.9]])
    ours = point_logits_from_patches(probs, patch_idx, 4, points=points, center=center)
    ref = propagate_patch_scores(probs[0].numpy(), patch_idx[0].numpy(), center[0].numpy(), points[0].numpy())
    np.testing.assert_array_equal(ours[0].numpy(), ref)
    assert ours[0, 0] == ours[0, 3] == pytest.approx(0.2)


def test_point_propagation_refuses_what_it_cannot_compute(tiny_batch, tiny):
    b, g = tiny_batch["center"].shape[:2]
    logits = torch.randn(b, g)
    with pytest.raises(ValueError, match="outside"):
        point_logits_from_patches(logits, tiny_batch["patch_idx"], 10)
    with pytest.raises(ValueError, match="uncovered"):
        point_logits_from_patches(logits, tiny_batch["patch_idx"], tiny.preprocess.num_points, uncovered="mean")
    with pytest.raises(ValueError, match="needs points"):  # points in no patch, nothing to find a center with
        point_logits_from_patches(logits, tiny_batch["patch_idx"], tiny.preprocess.num_points)


def test_balanced_bce_weighs_both_classes_equally():
    from btp.model.losses import balanced_bce_loss

    labels = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0]])
    miss_pos = torch.full((1, 8), -3.0)  # the one positive wrong, the 7 negatives right
    miss_negs = torch.full((1, 8), 3.0)  # the positive right, all 7 negatives wrong
    # the single positive counts as much as all seven negatives together
    torch.testing.assert_close(balanced_bce_loss(miss_pos, labels), balanced_bce_loss(miss_negs, labels))
    plain = F.binary_cross_entropy_with_logits
    assert plain(miss_negs, labels) > 5 * plain(miss_pos, labels)  # plain BCE: the opposite


def test_focal_and_dice_losses_behave():
    labels = torch.tensor([[0, 0, 1, 1, 0.0]])
    good, bad = (labels * 8 - 4), (4 - labels * 8)
    assert focal_loss(good, labels) < focal_loss(bad, labels)
    # gamma 0 and alpha 0.5 reduce focal loss to half the BCE
    z = torch.randn(3, 7)
    y = (torch.rand(3, 7) > 0.5).float()
    assert torch.allclose(focal_loss(z, y, gamma=0.0, alpha=0.5), 0.5 * F.binary_cross_entropy_with_logits(z, y))
    assert dice_loss(labels, labels) < 1e-6
    assert dice_loss(1 - labels, labels) > 0.5


def test_geometric_losses_prefer_the_matching_fpfh(tiny_batch):
    fpfh = tiny_batch["fpfh"].float()
    matched = fpfh + 0.01 * torch.randn_like(fpfh)
    shuffled = matched[:, torch.randperm(fpfh.shape[1])]
    for kind in ("infonce", "cosine", "mse"):
        assert geometric_loss(matched, fpfh, kind) < geometric_loss(shuffled, fpfh, kind), kind
    with pytest.raises(ValueError):
        geometric_loss(matched, fpfh, "l7")


def test_btp_loss_sums_its_weighted_parts_and_trains_the_heads(tiny, tiny_batch):
    torch.manual_seed(4)
    model = BTPModel.with_default_text_encoder(tiny)
    model.set_point_encoder_frozen(True)
    model.train()
    assert not model.point_encoder.training and model.gfcm.training
    out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    total, parts = btp_loss(out, tiny_batch, tiny.loss, gfcm=tiny.gfcm, object_alpha=tiny.scoring.object_alpha)
    w = tiny.loss
    expected = parts["focal"] + w.dice_weight * parts["dice"] + w.global_weight * parts["global"] \
        + w.geometric_weight * parts["geometric"]
    assert torch.allclose(total.detach(), expected)
    assert all(v > 0 for v in parts.values())
    total.backward()
    assert model.gfcm.head[2].weight.grad.abs().sum() > 0
    assert model.mgfem.layer_weights.grad.abs().sum() > 0
    assert model.prompt_ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.point_encoder.parameters())
    # a few steps on this batch lower the loss: the heads can fit the labels
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = total.item()
    for _ in range(8):
        opt.zero_grad()
        loss, _ = btp_loss(model(tiny_batch["neighborhood"], tiny_batch["center"]), tiny_batch, tiny.loss, gfcm=tiny.gfcm)
        loss.backward()
        opt.step()
    assert loss.item() < first
    no_fpfh = {k: v for k, v in tiny_batch.items() if k != "fpfh"}
    _, parts2 = btp_loss(out, no_fpfh, tiny.loss)
    assert parts2["geometric"] == 0


# ---- export-ability ----------------------------------------------------------------------------

def test_frozen_model_exports_to_onnx_opset17_and_matches(tiny, tiny_batch):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(5)
    model = BTPModel.with_default_text_encoder(tiny)
    model.freeze_text(drop_encoder=True)
    model.eval()

    class Outputs(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, neighborhood, center):
            out = self.m(neighborhood, center)
            return tuple(out[k] for k in OUTPUT_NAMES)

    nb, ctr = tiny_batch["neighborhood"][:1], tiny_batch["center"][:1]
    buf = io.BytesIO()
    torch.onnx.export(Outputs(model).eval(), (nb, ctr), buf, opset_version=17, dynamo=False,
                      input_names=["neighborhood", "center"], output_names=list(OUTPUT_NAMES))
    proto = onnx.load_from_string(buf.getvalue())
    ops = {(n.domain or "ai.onnx", n.op_type) for n in proto.graph.node}
    assert {d for d, _ in ops} == {"ai.onnx"}, ops  # no torch-only / custom domains
    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    assert topk, "object score must use TopK"
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = dict(zip(OUTPUT_NAMES, sess.run(None, {"neighborhood": nb.numpy(), "center": ctr.numpy()})))
    with torch.no_grad():
        ref = model(nb, ctr)
    for name in OUTPUT_NAMES:
        np.testing.assert_allclose(got[name], ref[name].numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_local_frame_and_geometry_export_without_control_flow(tiny_batch):
    """GFCM's local frame and in-graph geometry (diagonals, eigenvectors) export as plain data
    ops: no If/Loop subgraphs (torch.onnx writes Tensor.diagonal and dynamic squeezes that way),
    which TensorRT and ORT would run as control flow; outputs match torch."""
    import onnx
    import onnxruntime as ort

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.point_geometry = "local", (0.5, 1.0)
    torch.manual_seed(2)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    model.freeze_text(drop_encoder=True)
    model.eval()
    nb, ctr = tiny_batch["neighborhood"][:1], tiny_batch["center"][:1]

    class Desc(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, neighborhood, center):
            return self.m(neighborhood, center)["geo_desc"]

    buf = io.BytesIO()
    torch.onnx.export(Desc(model).eval(), (nb, ctr), buf, opset_version=17, dynamo=False,
                      input_names=["neighborhood", "center"], output_names=["geo_desc"])
    proto = onnx.load_from_string(buf.getvalue())
    control = sorted({n.op_type for n in proto.graph.node} & {"If", "Loop", "Scan", "EyeLike", "GatherND"})
    assert not control, control
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"neighborhood": nb.numpy(), "center": ctr.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(nb, ctr)["geo_desc"].numpy(), rtol=1e-4, atol=1e-4)


# ---- per-point scores ("back to point", gfcm.point_dim > 0) ------------------------------------

def test_per_point_scores_start_at_the_patch_scores_then_resolve_points_and_train(tiny_batch):
    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    torch.manual_seed(6)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    model.set_point_encoder_frozen(True)
    model.train()
    b, g, k = tiny_batch["patch_idx"].shape
    out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    assert out["patch_point_logits"].shape == (b, g, k) == out["patch_point_probs"].shape
    # the offset starts at zero: every point of a patch scores as the patch, so training starts
    # from the patch model
    assert torch.equal(out["patch_point_logits"], out["patch_logits"].unsqueeze(-1).expand(b, g, k))
    n = tiny_batch["points"].shape[1]
    loss, _ = btp_loss(out, tiny_batch, cfg.loss, gfcm=cfg.gfcm)
    loss.backward()
    assert model.point_refine.offset.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.point_refine.offset.weight.normal_()
    model.eval()
    with torch.no_grad():
        out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    spread = out["patch_point_logits"].std(dim=-1)  # points of one patch now differ
    assert (spread > 1e-3).float().mean() > 0.9
    # loss and runtime use the same rule: each point's mean over its patches of its own value
    ours = point_logits_from_patches(out["patch_logits"], tiny_batch["patch_idx"], n, points=tiny_batch["points"],
                                     center=tiny_batch["center"], point_values=out["patch_point_logits"])
    for i in range(b):
        ref = propagate_patch_scores(out["patch_logits"][i].numpy(), tiny_batch["patch_idx"][i].numpy(),
                                     tiny_batch["center"][i].numpy(), tiny_batch["points"][i].numpy(),
                                     point_scores=out["patch_point_logits"][i].numpy())
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=1e-5)
        idx = tiny_batch["patch_idx"][i].numpy().ravel()
        vals = out["patch_point_logits"][i].numpy().ravel()
        p = idx[0]
        np.testing.assert_allclose(ref[p], vals[idx == p].mean(), atol=1e-5)
    # object_source="points": the object score's top mean reads the G*K per-point probabilities
    cfg_points = tiny_config()
    cfg_points.gfcm, cfg_points.scoring.object_source = cfg.gfcm, "points"
    by_points = BTPModel(cfg_points.validate())
    by_points.load_state_dict(model.state_dict(), strict=False)
    by_points.frozen_text = model.text_embeddings().detach()
    by_points.eval()
    with torch.no_grad():
        o = by_points(tiny_batch["neighborhood"], tiny_batch["center"])
    k_top = max(1, int(g * k * cfg_points.scoring.top_ratio))
    a = cfg_points.scoring.object_alpha
    want = a * o["global_prob"] + (1 - a) * o["patch_point_probs"].flatten(1).topk(k_top, dim=1).values.mean(1)
    torch.testing.assert_close(o["object_score"], want)
    # top_ratio 1.0 (the default's pooled mean): every per-point probability, a plain mean
    by_points.cfg.scoring.top_ratio = 1.0
    by_points.point_top_k = g * k
    with torch.no_grad():
        o_all = by_points(tiny_batch["neighborhood"], tiny_batch["center"])
    torch.testing.assert_close(o_all["object_score"], a * o["global_prob"] + (1 - a) * o["patch_point_probs"].flatten(1).mean(1))
    assert not torch.allclose(o_all["object_score"], o["object_score"])
    no_head = tiny_config()
    no_head.scoring.object_source = "points"
    with pytest.raises(ValueError, match="object_source"):
        no_head.validate()
    with pytest.raises(ValueError, match="point_values"):
        point_logits_from_patches(out["patch_logits"], tiny_batch["patch_idx"], n,
                                  point_values=out["patch_point_logits"][:, :, :1])
    # a few steps lower the loss
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss, _ = btp_loss(model(tiny_batch["neighborhood"], tiny_batch["center"]), tiny_batch, cfg.loss, gfcm=cfg.gfcm)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_point_geometry_reads_local_shape_is_invariant_and_exports(tiny_batch):
    """In-patch multi-scale geometry: zero variation and height on a plane, a bump stands out,
    a very wide neighbourhood is the whole patch, invariant to pose and scale; plain ONNX (that
    TensorRT parses) which ORT runs to the same values."""
    import onnx
    import onnxruntime as ort

    from btp.export.onnx import unsupported_trt_ops
    from btp.model.heads import point_geometry, point_geometry_width

    grid = torch.zeros(1, 1, 25, 3)
    grid[..., 0], grid[..., 1] = (torch.arange(25) % 5).float(), (torch.arange(25) // 5).float()
    flat = point_geometry(grid, (0.5, 1.0))[0, 0]
    assert flat.shape == (25, point_geometry_width((0.5, 1.0))) == (25, 22)
    assert flat[:, [0, 3, 10, 13, 20, 21]].abs().max() < 1e-4  # surface variation, heights: 0
    bumped = grid.clone()
    bumped[0, 0, 12, 2] = 0.8  # the center point lifted off the plane
    got = point_geometry(bumped, (0.5, 1.0))[0, 0]
    others = torch.arange(25) != 12
    for col in (3, 13):  # its height over the local plane, at both widths
        assert got[12, col] > 2 * got[others, col].max()
    assert got[12, 20] > 2 * got[others, 20].max()  # and over the patch plane
    assert got[others, 0].max() > 1e-3  # its neighbours' neighbourhoods are no longer flat
    for degenerate in (torch.zeros(1, 1, 16, 3), grid[..., :1, :].expand(-1, -1, 16, -1).clone(),
                       grid * torch.tensor([1.0, 0.0, 0.0])):  # all at one point, duplicates, a line
        assert torch.isfinite(point_geometry(degenerate, (0.5, 1.0))).all()
    wide = point_geometry(bumped, (1e3,))[0, 0]  # one neighbourhood: the whole patch
    np.testing.assert_allclose(wide[:, 0].numpy(), wide[:, 11].numpy(), rtol=1e-3, atol=1e-6)
    xyz = (tiny_batch["neighborhood"][..., :3] + tiny_batch["center"].unsqueeze(2))[:1]  # [1, G, K, 3]
    feats = point_geometry(xyz, (0.5, 1.0))
    torch.manual_seed(3)
    rot, _ = torch.linalg.qr(torch.randn(3, 3))
    np.testing.assert_allclose(point_geometry(2.5 * xyz @ rot.T + 1.0, (0.5, 1.0)).numpy(), feats.numpy(),
                               atol=2e-3)

    class Geo(torch.nn.Module):
        def forward(self, x):
            return point_geometry(x, (0.5, 1.0))

    buf = io.BytesIO()
    torch.onnx.export(Geo(), (xyz,), buf, opset_version=17, dynamo=False, input_names=["xyz"])
    assert unsupported_trt_ops(onnx.load_from_string(buf.getvalue())) == []
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"xyz": xyz.numpy()})[0], feats.numpy(), rtol=1e-3, atol=1e-4)


def test_gfcm_with_point_geometry_trains_and_exports(tiny_batch):
    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.point_dim, cfg.gfcm.point_geometry = "local", 8, (0.5, 1.0)
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    assert model.gfcm.convs[0].in_channels == 3 + 22
    out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    out["patch_point_logits"].sum().backward()
    assert model.gfcm.convs[0].weight.grad.abs().sum() > 0
    bad = tiny_config()
    bad.gfcm.point_geometry = (0.0,)
    with pytest.raises(ValueError, match="point_geometry"):
        bad.validate()


def _plane_groups(bump: float = 0.0):
    """A 40 x 40 grid plane (optionally its middle point lifted by ``bump``), grouped into 64
    patches of 16 by the product's grouping: patch xyz [1, G, K, 3], centers [1, G, 3], the
    lifted point's (patch, slot) pairs."""
    from btp.geometry import group

    xs = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0)), -1).reshape(-1, 2)
    pts = np.concatenate([xs, np.zeros((len(xs), 1))], 1).astype(np.float32)
    middle = 20 * 40 + 20
    pts[middle, 2] = bump
    groups = group(pts, 64, 16, in_channels=3)
    xyz = torch.from_numpy(pts[groups.patch_idx])[None]
    return xyz, torch.from_numpy(groups.center)[None], np.argwhere(groups.patch_idx == middle)


def _context(center: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cdist(center, center).topk(k, dim=-1, largest=False).indices


def test_context_geometry_reads_beyond_the_patch_is_invariant_and_exports(tiny_batch):
    """Geometry over the context patches' cores: zero on a plane, a lifted point stands out of the
    wide plane in every patch that holds it, invariant to pose and scale, finite on degenerate
    patches; plain ONNX (that TensorRT parses) which ORT runs to the same values."""
    import onnx
    import onnxruntime as ort

    from btp.export.onnx import unsupported_trt_ops
    from btp.model.heads import _point_geometry_parts, context_geometry, context_geometry_width

    def features(xyz, center, widths=(2.0,), k=4):
        return context_geometry(xyz, center, _context(center, k), widths, _point_geometry_parts(xyz, (0.5,)))

    xyz, center, _ = _plane_groups()
    flat = features(xyz, center)
    assert flat.shape == (1, 64, 16, context_geometry_width((2.0,))) == (1, 64, 16, 10)
    assert flat[..., [0, 3, 5, 6, 9]].abs().max() < 1e-4  # surface variation, height, bend, relative: 0
    xyz, center, holders = _plane_groups(bump=1.5)
    got = features(xyz, center)
    lifted = torch.zeros(64, 16, dtype=torch.bool)
    lifted[holders[:, 0], holders[:, 1]] = True
    assert got[0][lifted][:, 3].min() > 2 * got[0][~lifted][:, 3].max()  # height over the wide plane
    # patches that do not hold the lifted point see it through their context, unlike in-patch geometry
    others = ~torch.isin(torch.arange(64), torch.from_numpy(holders[:, 0]))
    level, level_center = xyz.clone(), center.clone()  # the same patches, the point put back
    level[..., 2], level_center[..., 2] = 0.0, 0.0
    assert (got[0, others] - features(level, level_center)[0, others]).abs().amax(dim=(1, 2)).max() > 1e-2
    in_patch = _point_geometry_parts(xyz, (0.5,))[0] - _point_geometry_parts(level, (0.5,))[0]
    assert in_patch[0, others].abs().max() < 1e-5
    for degenerate in (torch.zeros(1, 4, 8, 3), xyz[:, :4, :1].expand(-1, -1, 8, -1).clone()):
        assert torch.isfinite(features(degenerate, degenerate[:, :, 0], k=2)).all()
    xyz = (tiny_batch["neighborhood"][..., :3] + tiny_batch["center"].unsqueeze(2))[:1]  # [1, G, K, 3]
    center = tiny_batch["center"][:1]
    feats = features(xyz, center, (1.0, 2.0))
    torch.manual_seed(3)
    rot, _ = torch.linalg.qr(torch.randn(3, 3))
    np.testing.assert_allclose(features(2.5 * xyz @ rot.T + 1.0, 2.5 * center @ rot.T + 1.0, (1.0, 2.0)).numpy(),
                               feats.numpy(), atol=3e-3)

    class Ctx(torch.nn.Module):
        def forward(self, x, c):
            return features(x, c, (1.0, 2.0))

    buf = io.BytesIO()
    torch.onnx.export(Ctx(), (xyz, center), buf, opset_version=17, dynamo=False, input_names=["xyz", "center"])
    assert unsupported_trt_ops(onnx.load_from_string(buf.getvalue())) == []
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"xyz": xyz.numpy(), "center": center.numpy()})[0]
    np.testing.assert_allclose(got, feats.numpy(), rtol=1e-3, atol=1e-4)


def test_gfcm_with_context_geometry_trains_and_needs_its_inputs(tiny_batch):
    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    cfg.gfcm.point_geometry, cfg.gfcm.context_geometry = (0.5,), (2.0,)
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    assert model.gfcm.convs[0].in_channels == 3 + 12 + 10
    out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    out["patch_point_logits"].sum().backward()
    assert model.gfcm.convs[0].weight.grad[:, 15:].abs().sum() > 0  # the context features reach the loss
    for field, value in (("point_geometry", ()), ("context_k", 0)):
        bad = tiny_config()
        bad.gfcm.context_k, bad.gfcm.point_geometry, bad.gfcm.context_geometry = 4, (0.5,), (2.0,)
        setattr(bad.gfcm, field, value)
        with pytest.raises(ValueError, match="context_geometry needs"):
            bad.validate()
    small = tiny_config()
    small.encoder.group_size = 3
    small.gfcm.context_k, small.gfcm.point_geometry, small.gfcm.context_geometry = 4, (0.5,), (2.0,)
    with pytest.raises(ValueError, match="group_size >= 4"):
        small.validate()


def test_global_term_reads_the_top_point_logits_with_points_top(tiny_batch):
    """loss.object_term = "points-top": the global term's object logit is the mean of the top
    per-point logits (what the runtime's object score reads), not the largest patch logit."""
    cfg = tiny_config()
    cfg.gfcm.point_dim, cfg.scoring.object_source = 8, "points"
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg.validate()).eval()
    with torch.no_grad():
        out = model(tiny_batch["neighborhood"], tiny_batch["center"])
    raised = {**out, "patch_point_logits": out["patch_point_logits"] + 3.0}
    parts = {}
    for term in ("patch-max", "points-top"):
        loss_cfg = replace(cfg.loss, object_term=term)
        parts[term] = [btp_loss(o, tiny_batch, loss_cfg, gfcm=cfg.gfcm, point_top_k=model.point_top_k)[1]["global"]
                       for o in (out, raised)]
    assert torch.equal(*parts["patch-max"])  # the patch logits did not move
    assert not torch.allclose(*parts["points-top"])
    with pytest.raises(ValueError, match="point_top_k"):  # no silent top-1 when the caller forgets it
        btp_loss(out, tiny_batch, replace(cfg.loss, object_term="points-top"), gfcm=cfg.gfcm)
    bad = tiny_config()
    bad.loss.object_term = "points-top"
    with pytest.raises(ValueError, match="object_term"):
        bad.validate()
