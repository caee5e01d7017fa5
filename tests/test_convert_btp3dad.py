"""`btp convert btp-3dad`: a model trained with the official BTP-3DAD code, brought in and scored
exactly as the official test_standard_aupro.py scores it.

Fakes use the official key names and layouts (ULIP-2 PointBERT, OpenCLIP text tower, train.py's
best.pth heads) with seeded random weights. The reference is tests/official_reference.py: plain
torch functions over the official state dicts, no btp model class.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from btp.cli import app
from btp.config import btp3dad_config
from btp.geometry import propagate_patch_scores
from btp.geometry.prepare import prepare, seeded_start
from btp.io import load_mesh, sample_surface
from btp.model.checkpoint import load_checkpoint
from btp.model.convert import ConversionError, convert_btp3dad
from official_reference import ref_forward, ref_text
from test_convert import _bn, _w, openclip_text_state, save_ulip, ulip_pointbert_state

SMALL = dict(c_in=6, p=(16, 32, 64), enc=32, t=64, depth=11, pos_hidden=16, d=32)
FULL = dict(c_in=6, p=(128, 256, 512), enc=256, t=384, depth=18, pos_hidden=128, d=1280)


def _lin(d_out, d_in):
    return torch.randn(d_out, d_in) * d_in ** -0.5  # unit-scale activations, like a trained head


def official_heads(t: int, d: int, hidden: int = 512, fpfh: int = 33, conv=(64, 128, 256), gfcm_hidden: int = 128,
                   n_ctx: int = 8, width: int = 64, ctx_len: int = 77) -> dict:
    """train.py's best.pth: the three state dicts under the official names, plus epoch and loss."""
    pfe = {}
    for name, d_in in (("mapper_pointbert", t), ("mapper_fpfh", fpfh), ("mapper_global", t)):
        pfe.update({f"{name}.0.weight": _lin(hidden, d_in) * 3, f"{name}.0.bias": _w(hidden),
                    f"{name}.2.weight": _lin(d, hidden), f"{name}.2.bias": _w(d)})
    pfe.update({"fusion_proj.0.weight": _lin(d, 3 * d) * 2, "fusion_proj.0.bias": _w(d),
                "fusion_proj.2.weight": _lin(d, d) * 2, "fusion_proj.2.bias": _w(d),
                "layer_weights": 1 + 0.3 * torch.randn(4)})
    pge, c_in = {}, 3
    for i, c in enumerate(conv, start=1):
        pge.update({f"mlp{i}.0.weight": _lin(c, c_in)[..., None, None] * 3, f"mlp{i}.0.bias": _w(c),
                    **_bn(f"mlp{i}.1", c)})
        c_in = c
    pge.update({"fc.0.weight": _lin(gfcm_hidden, conv[-1]), "fc.0.bias": _w(gfcm_hidden),
                "fc.2.weight": _lin(fpfh, gfcm_hidden), "fc.2.bias": _w(fpfh)})
    prompt = {"ctx": _w(n_ctx, width), "token_prefix_pos": _w(1, 1, width), "token_suffix_pos": _w(1, ctx_len - 1, width),
              "token_prefix_neg": _w(1, 1, width), "token_suffix_neg": _w(1, ctx_len - 1, width)}
    return {"patch_feature_embedder": pfe, "patch_geo_encoder": pge, "prompt_learner": prompt, "epoch": 37,
            "loss": 0.4123}


def flat(heads: dict) -> dict:
    return {f"{g}.{k}": v for g in ("patch_feature_embedder", "patch_geo_encoder", "prompt_learner")
            for k, v in heads[g].items()}


def write_fakes(folder: Path, sizes: dict, text_width: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    point, proj = ulip_pointbert_state(**sizes)
    text = openclip_text_state(width=text_width, layers=2, d=sizes["d"])
    heads = official_heads(sizes["t"], sizes["d"], width=text_width)
    ulip = save_ulip(folder / "ULIP-2-PointBERT-10k-xyzrgb-pc-vit_g-objaverse_shapenet-pretrained.pt", point, proj)
    clip = folder / "open_clip_pytorch_model.bin"
    torch.save(text, clip)
    best = folder / "best.pth"
    torch.save(heads, best)
    return {"point": point, "proj": proj, "text": text, "heads": heads, "ulip": ulip, "clip": clip, "best": best}


def scan(shapes_root, name="cgal__stanford_bunny.ply", m=6000, seed=3) -> np.ndarray:
    v, f = load_mesh(shapes_root / name)
    return sample_surface(v, f, m, seed)[0] * 40.0 + 7.0  # raw units, off the origin


def compare_with_reference(model, fakes, raw, atol):
    p = prepare(raw, btp3dad_config(), "exact")  # the CPU chain, exact FPS
    with torch.no_grad():
        out = model(torch.from_numpy(p.neighborhood[None]), torch.from_numpy(p.center[None]))
    ours_points = propagate_patch_scores(out["patch_probs"][0].numpy(), p.patch_idx, p.center, p.points, "zero")
    text = ref_text(fakes["text"])
    ref = ref_forward(fakes["point"], fakes["proj"], flat(fakes["heads"]), text, torch.from_numpy(p.points[None]),
                      torch.from_numpy(p.center_idx[None]), torch.from_numpy(p.patch_idx[None]))
    probs = ref["patch_probs"][0].numpy()
    assert probs.std() > 1e-3, "fake weights give constant probabilities: the comparison would be vacuous"
    np.testing.assert_allclose(out["patch_probs"][0].numpy(), probs, atol=atol, rtol=0)
    np.testing.assert_allclose(ours_points, ref["point_scores"][0].numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(out["global_prob"].numpy(), ref["global_prob"].numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(out["object_score"].numpy(), ref["object_score"].numpy(), atol=atol, rtol=0)
    return p, ref


@pytest.fixture()
def small(tmp_path):
    return write_fakes(tmp_path, SMALL)


def test_seeded_start_is_torch_randint_after_manual_seed():
    for n in (2048, 2049, 6000, 40000, 400_000, 5_000_000):
        for seed in (0, 1, 123):
            torch.manual_seed(seed)
            assert seeded_start(n, seed) == int(torch.randint(0, n, (1,))), (n, seed)


def test_small_fake_matches_the_official_forward_in_torch(small, shapes_root):
    model, report = convert_btp3dad(small["best"], small["ulip"], small["clip"])
    cfg = model.cfg
    assert (cfg.name, cfg.encoder.num_group, cfg.encoder.group_size, cfg.preprocess.num_points) == ("btp-3dad", 512, 32, 2048)
    assert cfg.encoder.feature_layers == (2, 5, 8, 11) and cfg.scoring.top_ratio == 0.2
    assert model.text_encoder is None and model.is_text_frozen
    torch.testing.assert_close(model.frozen_text, ref_text(small["text"]), atol=1e-6, rtol=0)
    assert report.official == {"epoch": 37, "loss": pytest.approx(0.4123)}
    compare_with_reference(model, small, scan(shapes_root), atol=1e-5)


def test_cli_convert_export_run(small, shapes_root, tmp_path):
    runner = CliRunner()
    ckpt = tmp_path / "model.safetensors"
    res = runner.invoke(app, ["convert", "btp-3dad", "--heads", str(small["best"]), "--point-ckpt", str(small["ulip"]),
                              "--clip-ckpt", str(small["clip"]), "--out", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert "G=512 K=32 N=2048" in res.output and "top 20%" in res.output
    _, provenance = load_checkpoint(ckpt)
    assert set(provenance["sha256"]) == {"heads", "point", "clip"} and provenance["text_frozen"]
    onnx_path = tmp_path / "model.onnx"
    res = runner.invoke(app, ["export", "--model", str(ckpt), "--out", str(onnx_path)])
    assert res.exit_code == 0, res.output

    from btp.runtime import Pipeline
    from btp.runtime.metadata import read_model_meta

    meta = read_model_meta(onnx_path)
    c = meta.config
    assert (c.encoder.num_group, c.encoder.group_size, c.scoring.top_ratio, c.scoring.object_alpha) == (512, 32, 0.2, 0.5)
    assert c.preprocess.normalize == "unit_sphere_raw" and c.scoring.uncovered_points == "zero"

    raw = scan(shapes_root)
    np.save(tmp_path / "part.npy", raw)
    out = tmp_path / "results"
    res = runner.invoke(app, ["run", str(onnx_path), str(tmp_path / "part.npy"), "--out", str(out),
                              "--downsample", "exact"])
    assert res.exit_code == 0, res.output
    scores = np.load(out / "part.npy")
    assert scores.shape == (len(raw),) and np.isfinite(scores).all()

    # the runtime (ORT CPU, its own CPU preprocessing) against the official reference: <= 1e-4
    result = Pipeline(onnx_path, downsample="exact")(raw)
    model, _ = load_checkpoint(ckpt)
    p, ref = compare_with_reference(model, small, raw, atol=1e-5)
    np.testing.assert_array_equal(result.sampled_idx, p.sample_idx)
    np.testing.assert_allclose(result.patch_probs, ref["patch_probs"][0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(result.sampled_scores, ref["point_scores"][0].numpy(), atol=1e-4, rtol=0)
    assert abs(result.object_score - float(ref["object_score"][0])) <= 1e-4
    assert abs(result.global_prob - float(ref["global_prob"][0])) <= 1e-4
    summary = json.loads((out / "part.json").read_text())
    assert summary["object_score"] == pytest.approx(result.object_score, abs=1e-6)


def test_learned_context_flag_freezes_the_text_through_it(small):
    plain, _ = convert_btp3dad(small["best"], small["ulip"], small["clip"])
    learned, _ = convert_btp3dad(small["best"], small["ulip"], small["clip"], use_learned_context=True)
    assert learned.cfg.text.prompt_context and not plain.cfg.text.prompt_context
    torch.testing.assert_close(learned.prompt_ctx, small["heads"]["prompt_learner"]["ctx"])
    assert (learned.frozen_text - plain.frozen_text).abs().max() > 1e-3


def test_a_missing_head_key_is_refused_by_name(small, tmp_path):
    heads = small["heads"]
    del heads["patch_feature_embedder"]["fusion_proj.0.weight"]
    heads["patch_geo_encoder"]["extra.weight"] = torch.zeros(2)
    heads["patch_geo_encoder"]["fc.2.bias"] = torch.zeros(5)
    torch.save(heads, tmp_path / "bad.pth")
    with pytest.raises(ConversionError) as err:
        convert_btp3dad(tmp_path / "bad.pth", small["ulip"], small["clip"])
    text = str(err.value)
    assert "patch_feature_embedder.fusion_proj.0.weight" in text
    assert "patch_geo_encoder.extra.weight" in text and "patch_geo_encoder.fc.2.bias" in text
    res = CliRunner().invoke(app, ["convert", "btp-3dad", "--heads", str(tmp_path / "bad.pth"), "--point-ckpt",
                                   str(small["ulip"]), "--clip-ckpt", str(small["clip"]), "--out",
                                   str(tmp_path / "m.safetensors")])
    assert res.exit_code == 1 and "patch_feature_embedder.fusion_proj.0.weight" in res.output
    assert not (tmp_path / "m.safetensors").exists()


class Payload:
    """Unpickling this would create a file: weights_only must refuse it without running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickled_object_is_refused_not_executed(small, tmp_path):
    marker = tmp_path / "pwned"
    heads = small["heads"]
    heads["optimizer_hook"] = Payload(marker)
    torch.save(heads, tmp_path / "evil.pth")
    with pytest.raises(ConversionError, match="weights_only"):
        convert_btp3dad(tmp_path / "evil.pth", small["ulip"], small["clip"])
    assert not marker.exists()


def test_head_widths_that_do_not_fit_the_encoder_are_named(tmp_path):
    fakes = write_fakes(tmp_path, SMALL)
    heads = official_heads(48, SMALL["d"])  # MGFEM built for a 48-d encoder; ours is 64-d
    torch.save(heads, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match="mapper_pointbert.0.weight"):
        convert_btp3dad(tmp_path / "other.pth", fakes["ulip"], fakes["clip"])


@pytest.mark.slow
def test_full_size_fake_matches_the_official_forward_torch_and_onnx(tmp_path, shapes_root):
    """ULIP-2 at full size (226 tensors, 32.5 M) + full-size heads (~9 M), D = 1280; the text tower
    is narrow (its size does not enter the exported graph: the text is frozen)."""
    from btp.export.onnx import export_onnx, load_model, onnx_outputs

    fakes = write_fakes(tmp_path, FULL, text_width=64, seed=1)
    assert len(fakes["point"]) == 226 and sum(v.numel() for v in fakes["point"].values()) > 32e6
    assert 8.5e6 < sum(v.numel() for v in flat(fakes["heads"]).values()) < 9.5e6
    model, _ = convert_btp3dad(fakes["best"], fakes["ulip"], fakes["clip"])
    raw = scan(shapes_root, "cgal__fandisk.ply" if (shapes_root / "cgal__fandisk.ply").is_file() else
               "cgal__stanford_bunny.ply", m=9000, seed=5)
    p, ref = compare_with_reference(model, fakes, raw, atol=1e-5)

    from btp.model.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "full.safetensors", model, {"source": "test"})
    result = export_onnx(load_model(ckpt), tmp_path / "full.onnx", parity_scans=2)
    assert result.verdict == "PASS" and result.size_bytes < 2 ** 31  # one file, no external data
    got = onnx_outputs(result.path, p.neighborhood[None], p.center[None], None)
    np.testing.assert_allclose(got["patch_probs"][0], ref["patch_probs"][0].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["object_score"], ref["object_score"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["global_prob"], ref["global_prob"].numpy(), atol=1e-4, rtol=0)
