"""`btp convert ulip2`: fake checkpoints written with ULIP-2's and OpenCLIP's real key names and
tensor layouts (spelled out here by hand, independent of btp's module names), round trips and refusals."""
from __future__ import annotations

import argparse

import pytest
import torch
from typer.testing import CliRunner

from btp.cli import app
from btp.config import tiny_config, ulip2_config
from btp.model import OUTPUT_NAMES, OpenCLIPTextEncoder, load_checkpoint
from btp.model.convert import ConversionError, convert_ulip2
from model_batches import real_batch


def _w(*shape):
    return torch.randn(*shape) * 0.05


def _ln(prefix, dim):
    return {f"{prefix}.weight": 1 + _w(dim), f"{prefix}.bias": _w(dim)}


def _bn(prefix, dim):
    return {f"{prefix}.weight": 1 + _w(dim), f"{prefix}.bias": _w(dim), f"{prefix}.running_mean": _w(dim),
            f"{prefix}.running_var": 0.5 + torch.rand(dim), f"{prefix}.num_batches_tracked": torch.tensor(1234)}


def ulip_pointbert_state(c_in=6, p=(128, 256, 512), enc=256, t=384, depth=18, pos_hidden=128, d=1280):
    """ULIP-2 PointTransformer_Colored's state_dict layout (keys without the `module.point_encoder.` prefix)."""
    s = {"encoder.first_conv.0.weight": _w(p[0], c_in, 1), "encoder.first_conv.0.bias": _w(p[0]),
         **_bn("encoder.first_conv.1", p[0]),
         "encoder.first_conv.3.weight": _w(p[1], p[0], 1), "encoder.first_conv.3.bias": _w(p[1]),
         "encoder.second_conv.0.weight": _w(p[2], 2 * p[1], 1), "encoder.second_conv.0.bias": _w(p[2]),
         **_bn("encoder.second_conv.1", p[2]),
         "encoder.second_conv.3.weight": _w(enc, p[2], 1), "encoder.second_conv.3.bias": _w(enc),
         "reduce_dim.weight": _w(t, enc), "reduce_dim.bias": _w(t),
         "cls_token": _w(1, 1, t), "cls_pos": _w(1, 1, t),
         "pos_embed.0.weight": _w(pos_hidden, 3), "pos_embed.0.bias": _w(pos_hidden),
         "pos_embed.2.weight": _w(t, pos_hidden), "pos_embed.2.bias": _w(t),
         **_ln("norm", t)}
    for i in range(depth):
        b = f"blocks.blocks.{i}"
        s.update({**_ln(f"{b}.norm1", t), f"{b}.attn.qkv.weight": _w(3 * t, t),
                  f"{b}.attn.proj.weight": _w(t, t), f"{b}.attn.proj.bias": _w(t), **_ln(f"{b}.norm2", t),
                  f"{b}.mlp.fc1.weight": _w(4 * t, t), f"{b}.mlp.fc1.bias": _w(4 * t),
                  f"{b}.mlp.fc2.weight": _w(t, 4 * t), f"{b}.mlp.fc2.bias": _w(t)})
    return s, _w(2 * t, d)


def openclip_text_state(vocab=49408, ctx_len=77, width=32, layers=2, d=32):
    """OpenCLIP CLIP text tower layout (as in open_clip_pytorch_model.bin)."""
    s = {"token_embedding.weight": _w(vocab, width), "positional_embedding": _w(ctx_len, width),
         **_ln("ln_final", width), "text_projection": _w(width, d)}
    for i in range(layers):
        b = f"transformer.resblocks.{i}"
        s.update({**_ln(f"{b}.ln_1", width), f"{b}.attn.in_proj_weight": _w(3 * width, width),
                  f"{b}.attn.in_proj_bias": _w(3 * width), f"{b}.attn.out_proj.weight": _w(width, width),
                  f"{b}.attn.out_proj.bias": _w(width), **_ln(f"{b}.ln_2", width),
                  f"{b}.mlp.c_fc.weight": _w(4 * width, width), f"{b}.mlp.c_fc.bias": _w(4 * width),
                  f"{b}.mlp.c_proj.weight": _w(width, 4 * width), f"{b}.mlp.c_proj.bias": _w(width)})
    return s


VISUAL = {"visual.conv1.weight": _w(8, 3, 2, 2), "visual.proj": _w(8, 32), "logit_scale": torch.tensor(4.6)}


def tiny_point_state():
    e = tiny_config().encoder
    return ulip_pointbert_state(e.in_channels, e.pointnet_dims, e.encoder_dims, e.trans_dim, e.depth, e.pos_hidden, 32)


def save_ulip(path, point, proj, clip_inside=None, extra=None):
    """As ULIP's main.py saves it: DDP `module.` keys in `state_dict`, optimizer, argparse args."""
    state = {f"module.point_encoder.{k}": v for k, v in point.items()}
    state["module.pc_projection"] = proj
    state["module.logit_scale"] = torch.tensor(2.65)
    for k, v in (clip_inside or {}).items():
        state[f"module.open_clip_model.{k}"] = v
    state.update(extra or {})
    torch.save({"epoch": 12, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-3}]},
                "best_acc1": 61.3, "args": argparse.Namespace(model="ULIP2_PointBERT_Colored", lr=3e-3)}, path)
    return path


@pytest.fixture()
def fake(tmp_path):
    torch.manual_seed(0)
    point, proj = tiny_point_state()
    text = openclip_text_state()
    ulip = save_ulip(tmp_path / "ulip2.pt", point, proj)
    clip = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({**text, **VISUAL}, clip)
    return point, proj, text, ulip, clip


def test_cli_round_trip_with_a_separate_openclip_file(fake, tmp_path, shapes_root):
    point, proj, text, ulip, clip = fake
    out = tmp_path / "model.safetensors"
    res = CliRunner().invoke(app, ["convert", "ulip2", "--point-ckpt", str(ulip), "--clip-ckpt", str(clip),
                                   "--out", str(out), "--config", "tiny", "--heads", "2"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output
    model, prov = load_checkpoint(out)
    cfg, tiny = model.cfg, tiny_config()
    assert cfg.encoder == tiny.encoder  # every dimension recovered from the shapes (+ --heads 2)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.embed_dim) == (32, 2, 1, 32)  # heads = 32 // 64 -> 1
    assert prov["point_checkpoint"] == str(ulip) and prov["clip_checkpoint"] == str(clip)
    sd = model.state_dict()
    for k, v in point.items():
        assert torch.equal(sd[f"point_encoder.{k}"], v), k
    assert torch.equal(sd["point_encoder.pc_projection"], proj)
    for k, v in text.items():
        assert torch.equal(sd[f"text_encoder.{k}"], v), k
    batch = real_batch(shapes_root, tiny, 1)
    with torch.no_grad():
        outputs = model(batch["neighborhood"], batch["center"])
    assert set(outputs) == set(OUTPUT_NAMES) and torch.isfinite(outputs["object_score"]).all()


def test_text_tower_inside_the_ulip2_checkpoint_and_ignored_keys(fake, tmp_path):
    point, proj, text, _, _ = fake
    path = save_ulip(tmp_path / "with_clip.pt", point, proj, clip_inside={**text, **VISUAL})
    model, report = convert_ulip2(path, base_config="tiny", heads=2, text_heads=2)
    assert report.text_keys == len(text) and "open_clip_model" in report.text_source
    assert model.cfg.text.heads == 2
    assert any("logit_scale" in item for item in report.ignored)
    assert any("visual" in item for item in report.ignored)
    for k, v in text.items():
        assert torch.equal(model.text_encoder.state_dict()[k], v), k


def test_point_encoder_only(fake, tmp_path):
    _, _, _, ulip, _ = fake
    model, report = convert_ulip2(ulip, base_config="tiny", heads=2)
    assert report.text_keys == 0 and model.text_encoder is None
    from btp.model import save_checkpoint

    path = save_checkpoint(tmp_path / "p.safetensors", model, {})
    loaded, _ = load_checkpoint(path)
    assert loaded.text_encoder is None and not loaded.is_text_frozen


def test_refuses_a_missing_key_and_names_it(fake, tmp_path):
    point, proj, _, _, _ = fake
    del point["blocks.blocks.1.attn.proj.weight"]
    bad = save_ulip(tmp_path / "bad.pt", point, proj)
    res = CliRunner().invoke(app, ["convert", "ulip2", "--point-ckpt", str(bad), "--out", str(tmp_path / "o.safetensors"),
                                   "--config", "tiny", "--heads", "2"])
    assert res.exit_code == 1
    assert "module.point_encoder.blocks.blocks.1.attn.proj.weight" in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_lists_unexpected_and_mis_shaped_keys(fake, tmp_path):
    point, proj, text, _, _ = fake
    point["cls_head_finetune.0.weight"] = _w(4, 4)
    point["blocks.blocks.2.mlp.fc2.bias"] = _w(7)
    text["transformer.resblocks.1.attn.out_proj.weight"] = _w(32, 31)
    bad = save_ulip(tmp_path / "bad.pt", point, proj, clip_inside=text)
    with pytest.raises(ConversionError) as err:
        convert_ulip2(bad, base_config="tiny", heads=2)
    e = err.value
    assert e.unexpected == ["module.point_encoder.cls_head_finetune.0.weight"]
    assert [m.split(":")[0] for m in e.mis_shaped] == [
        "module.open_clip_model.transformer.resblocks.1.attn.out_proj.weight",
        "module.point_encoder.blocks.blocks.2.mlp.fc2.bias"]
    assert e.missing == []


class NotWeights:
    """Stands for arbitrary pickled code: a weights_only load must refuse it."""


def test_refuses_files_that_need_arbitrary_pickle(fake, tmp_path):
    point, proj, _, _, _ = fake
    path = tmp_path / "pickle.pt"
    torch.save({"state_dict": {"module.pc_projection": proj}, "args": NotWeights()}, path)
    with pytest.raises(ConversionError, match="weights_only"):
        convert_ulip2(path, base_config="tiny")
    with pytest.raises(ConversionError, match="not found"):
        convert_ulip2(tmp_path / "absent.pt")


def test_full_ulip2_point_encoder_shapes_give_the_ulip2_config(tmp_path):
    """226 tensors at the real ULIP-2 PointBERT-10k shapes; the default `--config ulip2` and
    heads = 384 / 64 = 6 reproduce the spec's encoder config exactly."""
    torch.manual_seed(1)
    point, proj = ulip_pointbert_state()
    assert len(point) == 226
    path = save_ulip(tmp_path / "ulip2_full.pt", point, proj)
    model, report = convert_ulip2(path)
    assert model.cfg.encoder == ulip2_config().encoder
    assert model.cfg.text.embed_dim == 1280 and report.point_keys == 227
    assert torch.equal(model.point_encoder.blocks.blocks[17].mlp.fc2.weight, point["blocks.blocks.17.mlp.fc2.weight"])


def test_openclip_text_encoder_loads_an_open_clip_bin_directly(fake):
    _, _, text, _, clip = fake
    enc = OpenCLIPTextEncoder.from_file(clip, heads=4)  # visual.* and logit_scale are skipped
    assert (enc.width, enc.layers, enc.heads, enc.embed_dim, enc.context_length) == (32, 2, 4, 32, 77)
    assert enc.state_dict().keys() == text.keys()
    assert all(not p.requires_grad for p in enc.parameters())
    assert OpenCLIPTextEncoder.from_file(clip).heads == 1  # width 32 // 64, at least one head
