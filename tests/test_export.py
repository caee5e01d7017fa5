"""btp.export.onnx: parity with PyTorch on real shapes, metadata, frozen text, TensorRT-parsable ops."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from btp.config import tiny_config
from btp.export.onnx import (
    ExportError,
    export_onnx,
    fresh_model,
    load_model,
    op_types,
    state_sha256,
    torch_outputs,
    trt_supported_ops,
    unsupported_trt_ops,
)
from btp.export.samples import engine_inputs
from btp.runtime.backends.ort import OrtBackend
from btp.runtime.metadata import read_model_meta
from runtime_helpers import REAL_SHAPES, real_scan, tiny_export


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_export(tmp_path_factory)


@pytest.fixture(scope="module")
def real_inputs(shapes_root):
    """Engine inputs of 3 real shapes (not the shipped demo meshes) through the runtime's stages."""
    scans = [real_scan(shapes_root, name, 2000, seed=i) for i, name in enumerate(REAL_SHAPES)]
    return engine_inputs(scans, tiny_config())


def test_parity_torch_vs_ort_cpu_on_real_shapes(exported, real_inputs):
    path, loaded = exported
    neighborhood, center = real_inputs
    ref = torch_outputs(loaded.model, neighborhood, center)
    got = OrtBackend(path, provider="ort-cpu").run(neighborhood, center)
    assert set(got) == {"patch_logits", "patch_probs", "global_prob", "object_score"}
    assert got["patch_probs"].shape == (3, tiny_config().encoder.num_group)
    for name in ("patch_probs", "global_prob", "object_score"):
        assert np.abs(got[name] - ref[name]).max() <= 1e-4, name
    # the scores are not degenerate: patches of one real shape differ
    assert np.ptp(got["patch_logits"][0]) > 0


def test_same_inputs_same_outputs_across_sessions(exported, real_inputs):
    path, _ = exported
    a = OrtBackend(path, threads=1).run(*real_inputs)
    b = OrtBackend(path, threads=2).run(*real_inputs)
    c = OrtBackend(path, threads=2).run(*real_inputs)
    for name in a:
        np.testing.assert_array_equal(b[name], c[name])
        np.testing.assert_allclose(a[name], b[name], atol=1e-6)


def test_metadata_is_one_json_document_the_runtime_reads(exported):
    path, loaded = exported
    proto = onnx.load(str(path))
    assert [p.key for p in proto.metadata_props] == ["btp"]
    doc = json.loads(proto.metadata_props[0].value)
    meta = read_model_meta(path)
    cfg = tiny_config()
    assert meta.config.to_dict() == cfg.to_dict()
    assert (meta.num_points, meta.num_group, meta.group_size, meta.in_channels) == (512, 32, 16, 6)
    assert meta.batch is None and doc["export"]["batch"] == "dynamic" and doc["export"]["opset"] == 17
    assert doc["model"]["weights_sha256"] == state_sha256(loaded.model)
    assert doc["model"]["fresh_init"] is True
    assert doc["model"]["text_prompts"] == ["normal object.", "defective object."]
    assert "freshly initialised" in doc["provenance"]["weights"]
    assert doc["io"]["inputs"]["neighborhood"]["shape"] == ["B", 32, 16, 6]
    assert doc["io"]["outputs"]["object_score"]["shape"] == ["B"]
    # graph inputs/outputs are the contract, with a symbolic batch axis
    assert [i.name for i in proto.graph.input] == ["neighborhood", "center"]
    assert [o.name for o in proto.graph.output] == ["patch_logits", "patch_probs", "global_prob", "object_score"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "B" and [d.dim_value for d in dims[1:]] == [32, 16, 6]


def test_text_embeddings_are_frozen_initializers(exported):
    path, loaded = exported
    text = loaded.model.frozen_text.numpy()  # [2, D]
    proto = onnx.load(str(path))
    arrays = [numpy_helper.to_array(init) for init in proto.graph.initializer]
    assert any(a.shape == text.T.shape and np.array_equal(a, text.T) for a in arrays) or \
        any(a.shape == text.shape and np.array_equal(a, text) for a in arrays)
    assert loaded.model.text_encoder is None  # nothing of the text tower is exported


def test_ops_are_all_parsable_by_tensorrt(exported):
    proto = onnx.load(str(exported[0]))
    ops = op_types(proto)
    assert {d for d, _ in ops} == {"ai.onnx"}  # no torch-only / custom domain
    supported = trt_supported_ops()
    assert {"LayerNormalization", "TopK", "MatMul", "Conv"} <= supported and "NonMaxSuppression" in supported
    assert "Unique" not in supported and "SequenceAt" not in supported  # 'N' rows are not in the list
    assert unsupported_trt_ops(proto) == [], sorted(op for _, op in ops)
    # TensorRT needs TopK's K as a build-time constant: the object score's TopK takes an initializer
    inits = {i.name for i in proto.graph.initializer} | {o for n in proto.graph.node if n.op_type == "Constant"
                                                        for o in n.output}
    topk = [n for n in proto.graph.node if n.op_type == "TopK"]
    assert topk and all(n.input[1] in inits for n in topk)
    assert any(n.op_type == "LayerNormalization" for n in proto.graph.node)  # opset 17: one op, FP16-safe


def test_split_concat_conv_rewrite_keeps_the_model_and_drops_the_expand(exported, real_inputs):
    from btp.export.onnx import state_sha256
    from btp.export.rewrite import split_concat_conv

    path, loaded = exported
    model = loaded.model
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if "/encoder/" in n.name]
    assert not any(n.op_type in ("Expand", "Concat") for n in nodes)  # global half once per patch
    split = [n for n in nodes if "second_conv.0/" in n.name and n.op_type == "Conv"]
    assert len(split) == 2 and all(n.name.startswith("/inner/") for n in split)
    assert json.loads(proto.metadata_props[0].value)["export"]["rewrites"] == ["split_concat_conv"]
    # the swap is temporary and exact: same outputs, the model's own modules and weights afterwards
    before = state_sha256(model)
    nb, ct = (torch.from_numpy(a) for a in real_inputs)
    with torch.no_grad():
        ref = model(nb, ct)["patch_probs"]
        with split_concat_conv(model) as swapped:
            got = model(nb, ct)["patch_probs"]
    assert swapped == 1 and float((got - ref).abs().max()) <= 1e-5
    assert state_sha256(model) == before and "forward" not in vars(model.point_encoder.encoder)
    assert isinstance(model.point_encoder.encoder.second_conv[0], torch.nn.Conv1d)


def test_fixed_batch_fp16_safe_and_patch_embed(tmp_path, real_inputs):
    loaded = fresh_model(tiny_config(), seed=1)
    out = tmp_path / "b2.onnx"
    result = export_onnx(loaded, out, batch=2, fp16_safe=True, patch_embed=True, simplify=False)
    assert result.verdict == "PASS" and out.stat().st_size == result.size_bytes
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert [o.name for o in proto.graph.output][-1] == "patch_embed"
    meta = read_model_meta(out)
    assert meta.batch == 2
    fp16 = meta.export["fp16"]
    ln = [n.name for n in proto.graph.node if n.op_type == "LayerNormalization"]
    assert ln and set(ln) <= set(fp16["keep_fp32_nodes"])
    got = OrtBackend(out).run(real_inputs[0][:2], real_inputs[1][:2])
    ref = torch_outputs(loaded.model, real_inputs[0][:2], real_inputs[1][:2])
    cos = (got["patch_embed"] * ref["patch_embed"]).sum(-1) / (
        np.linalg.norm(got["patch_embed"], axis=-1) * np.linalg.norm(ref["patch_embed"], axis=-1))
    assert cos.min() >= 1 - 1e-5


def test_failed_parity_leaves_no_file(tmp_path, monkeypatch):
    import btp.export.onnx as export_module

    real = export_module.onnx_outputs

    def broken(*args, **kwargs):  # an export whose patch scores are off by 0.01: no check may pass it
        got = real(*args, **kwargs)
        got["patch_probs"] = got["patch_probs"] + np.float32(0.01)
        return got

    monkeypatch.setattr(export_module, "onnx_outputs", broken)
    loaded = fresh_model(tiny_config(), seed=2)
    out = tmp_path / "never.onnx"
    with pytest.raises(ExportError, match="does not match PyTorch.*patch_probs"):
        export_onnx(loaded, out, simplify=False)
    assert list(tmp_path.iterdir()) == []


def test_float64_recheck_passes_onnx_no_farther_from_exact_than_pytorch(real_inputs):
    """Where FP32 is ill-conditioned, a miss against PyTorch FP32 is judged against the float64
    evaluation: ONNX Runtime may be as far from it as PyTorch FP32 is, never beyond the cap."""
    from btp.export.compare import Tolerance, compare
    from btp.export.onnx import FLOAT64_CAP, PARITY_ATOL, recheck_float64

    loaded = fresh_model(tiny_config(), seed=5)
    nb, ct = real_inputs
    exact = torch_outputs(loaded.model.double(), nb.astype(np.float64), ct.astype(np.float64))
    loaded.model.float()
    t32 = torch_outputs(loaded.model, nb, ct)
    assert np.abs(t32["patch_probs"] - exact["patch_probs"]).max() < 1e-5  # a well-conditioned model

    def verdict(ref_off: float, got_off: float):
        ref = {"patch_probs": exact["patch_probs"] + ref_off}  # as if PyTorch FP32 missed float64 by ref_off
        got = {"patch_probs": exact["patch_probs"] - got_off}
        tol = Tolerance("patch_probs", kind="abs", limit=PARITY_ATOL, why="FP32")
        checks = compare(ref, got, [tol])
        assert checks[0].passed is False  # ref and got differ by more than 1e-4
        return recheck_float64(loaded.model, nb, ct, ref, got, checks)[0]

    ok = verdict(4e-4, 3e-4)
    assert ok.passed and ok.limit == pytest.approx(4e-4, rel=1e-2) and "float64" in ok.note
    assert ok.value == pytest.approx(3e-4, rel=1e-2)
    assert verdict(4e-4, 5e-4).passed is False  # farther from float64 than PyTorch FP32
    capped = verdict(5e-3, 2e-3)  # PyTorch FP32 itself far off: the cap holds
    assert capped.passed is False and capped.limit == FLOAT64_CAP
    assert verdict(0.0, 2e-4).passed is False  # PyTorch FP32 exact: the 1e-4 bar stands


def test_bad_arguments_are_refused(tmp_path):
    loaded = fresh_model(tiny_config(), seed=3)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(loaded, tmp_path / "x.onnx", opset=13)
    with pytest.raises(ValueError, match="batch"):
        export_onnx(loaded, tmp_path / "x.onnx", batch="big")
    with pytest.raises(ExportError, match="no such checkpoint"):
        load_model(tmp_path / "missing.safetensors")


def test_checkpoint_export_hashes_the_file(tmp_path, real_inputs):
    from btp.export.onnx import file_sha256
    from btp.model import BTPModel
    from btp.model.checkpoint import save_checkpoint

    torch.manual_seed(4)
    model = BTPModel.with_default_text_encoder(tiny_config())
    model.freeze_text(drop_encoder=True)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {"data": "test"})
    loaded = load_model(ckpt)
    assert loaded.info["fresh_init"] is False and loaded.info["weights_sha256"] == file_sha256(ckpt)
    assert loaded.provenance == {"data": "test"}
    result = export_onnx(loaded, tmp_path / "m.onnx", parity_scans=2)
    assert result.verdict == "PASS"
    got = OrtBackend(tmp_path / "m.onnx").run(*real_inputs)
    ref = torch_outputs(model.eval(), *real_inputs)
    assert np.abs(got["object_score"] - ref["object_score"]).max() <= 1e-4


def test_btp_export_cli(tmp_path):
    from typer.testing import CliRunner

    from btp.cli import app

    res = CliRunner().invoke(app, ["export", "--model", "tiny", "--out", str(tmp_path / "cli.onnx"), "--no-simplify"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # rich wraps at the terminal width
    assert "success" in text and "MB" in text and "FRESHLY INITIALISED" in text
    assert read_model_meta(tmp_path / "cli.onnx").export["simplified"] is False
    bad = CliRunner().invoke(app, ["export", "--model", str(tmp_path / "nope.safetensors"), "--out",
                                   str(tmp_path / "x.onnx")])
    assert bad.exit_code == 1 and "no such checkpoint" in " ".join(bad.output.split())


@pytest.mark.parametrize("geometry", [(), (0.5, 1.0)])  # (0.5, 1.0): GFCM also reads in-patch local geometry
def test_per_point_scores_export_and_reach_the_raw_scan(tmp_path, shapes_root, geometry):
    """A model with per-point scores (gfcm.point_dim): the graph gives patch_point_probs [B, G, K],
    parity covers it, and the runtime's raw-scan scores are the torch scorer's, not the patch ones."""
    from btp.eval.scoring import score_cloud_torch
    from btp.geometry.prepare import prepare, scores_to_raw
    from btp.model import BTPModel
    from btp.model.checkpoint import save_checkpoint
    from btp.runtime import Pipeline

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    cfg.gfcm.point_geometry = geometry
    torch.manual_seed(7)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    with torch.no_grad():
        model.point_refine.offset.weight.normal_()  # a trained offset: points of a patch differ
    model.freeze_text(drop_encoder=True)
    model.eval()
    ckpt = save_checkpoint(tmp_path / "p.safetensors", model, {"data": "test"})
    result = export_onnx(load_model(ckpt), tmp_path / "p.onnx", parity_scans=2)
    assert result.verdict == "PASS"
    checked = {c.output: c for c in result.parity}
    assert checked["patch_point_probs"].passed and checked["patch_point_probs"].n > 0
    meta = read_model_meta(tmp_path / "p.onnx")
    g, k = cfg.encoder.num_group, cfg.encoder.group_size
    assert meta.io["outputs"]["patch_point_probs"]["shape"] == ["B", g, k]
    scan = real_scan(shapes_root, REAL_SHAPES[1], 3000)
    got = Pipeline(tmp_path / "p.onnx", threads=1, downsample="exact")(scan)
    ref = score_cloud_torch(model, scan, method="exact")
    np.testing.assert_allclose(got.point_scores, ref.point_scores, atol=1e-4)
    patch_only = scores_to_raw(got.patch_probs, prepare(scan, cfg, "exact"), cfg, exact=True)[1]
    assert np.abs(patch_only - got.point_scores).max() > 1e-3
    from btp.export.compare import tolerances  # btp-bench parity checks the output when there is one

    assert "patch_point_probs" in {t.output for t in tolerances("fp16", {"patch_point_probs": np.zeros(3)})}
    assert "patch_point_probs" not in {t.output for t in tolerances("fp32", {"patch_probs": np.zeros(3)})}


def _topk_ks(path) -> list[int]:
    """The constant k of every TopK node of an exported graph."""
    proto = onnx.load(str(path))
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            consts.update({node.output[0]: numpy_helper.to_array(a.t) for a in node.attribute if a.name == "value"})
    return [int(consts[n.input[1]].reshape(-1)[0]) for n in proto.graph.node if n.op_type == "TopK"]


@pytest.mark.parametrize("top_ratio", [0.01, 1.0])  # 1.0: the default's rule, the map's mean
def test_pooled_points_object_score_is_the_same_on_every_path(tmp_path, shapes_root, top_ratio):
    """scoring.object_source = "pooled-points": the object score is alpha * global_prob + (1 - alpha)
    * the top share of the N sampled points' scores, made after the engine - the runtime, the
    torch scorer and training's validation scores agree on it; the graph's own score differs."""
    from btp.eval.scoring import score_cloud_torch
    from btp.geometry import top_mean
    from btp.geometry.prepare import prepare
    from btp.model import BTPModel
    from btp.model.checkpoint import save_checkpoint
    from btp.runtime import Pipeline
    from btp.train.data import BTPArrays
    from btp.train.loop import sample_scores

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    cfg.scoring.object_source, cfg.scoring.top_ratio = "pooled-points", top_ratio
    torch.manual_seed(9)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    with torch.no_grad():
        model.point_refine.offset.weight.normal_()
    model.freeze_text(drop_encoder=True)
    model.eval()
    ckpt = save_checkpoint(tmp_path / "p.safetensors", model, {"data": "test"})
    export_onnx(load_model(ckpt), tmp_path / "p.onnx", parity_scans=1)
    scan = real_scan(shapes_root, REAL_SHAPES[1], 3000)
    got = Pipeline(tmp_path / "p.onnx", threads=1, downsample="exact")(scan)
    ref = score_cloud_torch(model, scan, method="exact")
    expected = 0.5 * got.global_prob + 0.5 * top_mean(got.sampled_scores, top_ratio)
    assert got.object_score == pytest.approx(expected, abs=1e-6)
    assert ref.object_score == pytest.approx(got.object_score, abs=1e-4)
    prepared = prepare(scan, cfg, "exact")
    with torch.no_grad():
        graph = model(torch.from_numpy(prepared.neighborhood[None]), torch.from_numpy(prepared.center[None]))
    assert abs(float(graph["object_score"][0]) - got.object_score) > 1e-4  # not the in-graph top mean
    # top_ratio 1.0: the in-graph top mean is a plain mean - no TopK over the G*K probabilities
    # (TensorRT caps TopK's k at 3840; the default's G*K is 8192)
    assert (model.point_top_k in _topk_ks(tmp_path / "p.onnx")) == (top_ratio < 1.0)
    arrays = {"points": prepared.points[None], "patch_idx": prepared.patch_idx[None], "center": prepared.center[None],
              "labels": np.zeros((1, len(prepared.points)), np.float32), "object_label": np.zeros(1, np.float32),
              "fpfh": np.zeros((1, cfg.encoder.num_group, 33), np.float32)}
    val = sample_scores(model, BTPArrays(arrays, cfg))
    assert val["object_scores"][0] == pytest.approx(ref.object_score, abs=1e-4)


def test_the_default_model_is_the_committed_one_of_its_card():
    """Without --model every command gets the package's btp/assets/models/<DEFAULT_MODEL_NAME>.safetensors,
    trained (not a fresh init), with the config its card (models/<DEFAULT_MODEL_NAME>.md) describes."""
    from btp.config import DEFAULT_MODEL_NAME, preset
    from btp.eval.evaluate import DEFAULT_MODEL

    loaded = load_model()
    assert loaded.info["source"] == f"{DEFAULT_MODEL_NAME}.safetensors" == DEFAULT_MODEL.name
    assert not loaded.info["fresh_init"] and loaded.model.cfg.name == DEFAULT_MODEL_NAME
    cfg = loaded.model.cfg
    assert cfg.gfcm.point_geometry == preset(DEFAULT_MODEL_NAME).gfcm.point_geometry and cfg.gfcm.point_dim
    assert 0.5 < cfg.scoring.point_threshold < 1  # calibrated on its training samples
    card = (Path(__file__).resolve().parents[1] / "models" / f"{DEFAULT_MODEL_NAME}.md").read_text()
    assert loaded.info["weights_sha256"] in card  # the card names the weights it describes
