"""The TensorRT-free logic of btp.runtime.tensorrt: engine cache keys, manifest checks (rebuild,
never load blindly), optimization profiles from the ONNX metadata, the FP16 precision policy,
ORT TensorRT-EP options, and `btp build` failing cleanly without TensorRT."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.config import tiny_config
from btp.runtime import tensorrt as trt_export
from btp.runtime.tensorrt import CacheDecision, EngineKey, check_cache, make_manifest

G, K, C = 32, 16, 6  # tiny_config


def tiny_onnx(path, *, batch="B", num_group=G, with_meta=True, precision=None):
    """A small graph shaped like the exported BTP model, with torch.onnx-style node names."""
    import onnx
    from onnx import TensorProto, helper

    nb = helper.make_tensor_value_info("neighborhood", TensorProto.FLOAT, [batch, num_group, K, C])
    ce = helper.make_tensor_value_info("center", TensorProto.FLOAT, [batch, num_group, 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [batch, num_group]) for n in ("patch_logits", "patch_probs")]
    outs.append(helper.make_tensor_value_info("patch_embed", TensorProto.FLOAT, [batch, num_group, 8]))
    w = helper.make_tensor("w_embed", TensorProto.FLOAT, [C * K, 8], np.ones(C * K * 8, np.float32) * 0.01)
    text = helper.make_tensor("frozen_text", TensorProto.FLOAT, [8, 2], np.ones(16, np.float32))
    shape = helper.make_tensor("flat_shape", TensorProto.INT64, [3], [0, num_group, C * K])
    gamma = helper.make_tensor("ln_gamma", TensorProto.FLOAT, [8], np.ones(8, np.float32))
    nodes = [
        helper.make_node("Reshape", ["neighborhood", "flat_shape"], ["flat"], name="/point_encoder/Reshape"),
        helper.make_node("MatMul", ["flat", "w_embed"], ["tok"], name="/point_encoder/blocks.0/mlp/fc1/MatMul"),
        helper.make_node("LayerNormalization", ["tok", "ln_gamma"], ["tok_n"], name="/point_encoder/blocks.0/norm1/LayerNormalization", axis=-1),
        helper.make_node("Softmax", ["tok_n"], ["att"], name="/point_encoder/blocks.0/attn/Softmax", axis=-1),
        helper.make_node("ReduceMean", ["att"], ["m"], name="/point_encoder/norm/ReduceMean", keepdims=1, axes=[-1]),
        helper.make_node("Sub", ["att", "m"], ["patch_embed"], name="/mgfem/fuse/fuse.2/Sub"),
        helper.make_node("MatMul", ["patch_embed", "frozen_text"], ["scores"], name="/MatMul_3"),
        helper.make_node("ReduceSum", ["scores"], ["patch_logits"], name="/mgfem_tail/ReduceSum", keepdims=0),
        helper.make_node("Sigmoid", ["patch_logits"], ["patch_probs"], name="/Sigmoid"),
    ]
    graph = helper.make_graph(nodes, "btp", [nb, ce], outs, [w, text, shape, gamma])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if with_meta:
        export = {"precision": {"mode": precision}} if precision else {}
        helper.set_model_props(model, {"btp": json.dumps({"format": "btp-onnx", "format_version": 1, "config": tiny_config().to_dict(), "model": {}, "export": export})})
    onnx.save(model, str(path))
    return path


def key(**changes) -> EngineKey:
    base = EngineKey(model_sha256="ab" * 32, gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7",
                     trt_version="10.3.0", precision="fp16", batch=(1, 1, 4), workspace_mb=2048)
    return dataclasses.replace(base, **changes)


# ---- keys and manifests --------------------------------------------------------------------------

def test_key_digest_changes_with_every_field():
    base = key()
    variants = [key(model_sha256="cd" * 32), key(gpu_name="NVIDIA H100"), key(compute_capability="9.0"),
                key(trt_version="10.8.0"), key(precision="fp32"), key(batch=(1, 2, 8)), key(workspace_mb=1024),
                key(calib_sha256="x")]
    digests = {base.digest(), *(v.digest() for v in variants)}
    assert len(digests) == len(variants) + 1
    assert base.digest() == key().digest()  # stable
    assert base.dirname().startswith("nvidia-jetson-agx-orin-sm87-trt10.3.0-fp16-b1-4-")


def test_key_validates_precision_and_batch():
    with pytest.raises(ValueError, match="precision"):
        key(precision="bf16")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        key(batch=(2, 1, 4))


def write_slot(tmp_path, k: EngineKey, plan=b"PLAN-BYTES"):
    plan_path, manifest_path = tmp_path / "engine.plan", tmp_path / "manifest.json"
    plan_path.write_bytes(plan)
    manifest = make_manifest(k, plan, profile={"center": {"min": (1, G, 3), "opt": (1, G, 3), "max": (4, G, 3)}},
                             outputs=["patch_logits"], fp32_layers=["/Sigmoid"], build_seconds=1.0,
                             strongly_typed=False)
    manifest_path.write_text(json.dumps(manifest))
    return plan_path, manifest_path


def test_matching_manifest_loads(tmp_path):
    plan, manifest = write_slot(tmp_path, key())
    assert check_cache(plan, manifest, key()) == CacheDecision("load")
    assert json.loads(manifest.read_text())["key"]["batch"] == [1, 1, 4]


@pytest.mark.parametrize("change,words", [
    ({"trt_version": "10.8.0"}, "another TensorRT version"),
    ({"gpu_name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}, "another GPU"),
    ({"model_sha256": "cd" * 32}, "model file changed"),
    ({"precision": "fp32"}, "another precision"),
    ({"batch": (1, 1, 8)}, "another batch profile"),
])
def test_mismatched_engine_is_rebuilt_never_loaded(tmp_path, change, words):
    plan, manifest = write_slot(tmp_path, key())
    decision = check_cache(plan, manifest, key(**change))
    assert decision.action == "build"
    assert any(words in reason for reason in decision.reasons), decision.reasons


def test_missing_corrupt_or_foreign_files_rebuild(tmp_path):
    plan, manifest = write_slot(tmp_path, key())
    plan.write_bytes(b"OTHER-BYTES")  # replaced plan
    assert "does not match the hash" in check_cache(plan, manifest, key()).reasons[0]
    manifest.write_text("{not json")
    assert check_cache(plan, manifest, key()).action == "build"
    manifest.write_text(json.dumps({"format": "something-else"}))
    assert "not a btp-trt-engine" in check_cache(plan, manifest, key()).reasons[0]
    manifest.unlink()
    assert "not loaded blindly" in check_cache(plan, manifest, key()).reasons[0]
    plan.unlink()
    assert check_cache(plan, manifest, key()).reasons[0].startswith("no engine")


def test_cache_layout(tmp_path):
    k = key()
    slot = trt_export.engine_dir(tmp_path, "models/model.onnx", k)
    assert slot == tmp_path / "engines" / f"model-{'ab' * 6}" / k.dirname()
    assert trt_export.timing_cache_path(tmp_path, k).name == "nvidia-jetson-agx-orin-sm87-trt10.3.0.cache"


def test_machine_caches_live_under_one_variable(tmp_path, monkeypatch):
    """Kernels, TensorRT engines and Triton's backend stubs: all under $BTP_CACHE_DIR (the demo's
    project-local export is the one other cache, $BTP_CACHE)."""
    from btp.export import triton
    from btp.kernels.build import cache_dir

    monkeypatch.setenv("BTP_CACHE_DIR", str(tmp_path / "machine"))
    monkeypatch.setenv("BTP_CACHE", str(tmp_path / "demo"))
    assert cache_dir() == tmp_path / "machine"
    assert trt_export.default_cache_dir() == tmp_path / "machine" / "trt"
    seen = {}

    def backend_dir(root, cache):
        seen["cache"] = cache
        return tmp_path / "backends"

    monkeypatch.setattr(triton, "find_tritonserver", lambda: (tmp_path / "bin" / "tritonserver", tmp_path / "a" / "b" / "c"))
    monkeypatch.setattr(triton, "backend_dir", backend_dir)
    monkeypatch.setattr(triton.subprocess, "Popen", lambda cmd, **kw: cmd)
    cmd = triton.start_server(tmp_path / "repo")
    assert seen["cache"] == tmp_path / "machine" / "triton"
    assert f"--backend-directory={tmp_path / 'backends'}" in cmd


# ---- profiles from the ONNX ----------------------------------------------------------------------

def test_profile_from_onnx_metadata(tmp_path):
    io = trt_export.read_onnx_io(tiny_onnx(tmp_path / "m.onnx"))
    assert io.inputs == {"neighborhood": ["B", G, K, C], "center": ["B", G, 3]}
    assert io.outputs == ["patch_logits", "patch_probs", "patch_embed"]
    profile = trt_export.profile_shapes(io, (1, 2, 8))
    assert profile["neighborhood"] == {"min": (1, G, K, C), "opt": (2, G, K, C), "max": (8, G, K, C)}
    assert profile["center"]["max"] == (8, G, 3)


def test_profile_refuses_inconsistent_models(tmp_path):
    fixed = trt_export.read_onnx_io(tiny_onnx(tmp_path / "fixed.onnx", batch=1))
    assert trt_export.profile_shapes(fixed, (1, 1, 1))["center"]["max"] == (1, G, 3)
    with pytest.raises(ValueError, match="batch fixed to 1"):
        trt_export.profile_shapes(fixed, (1, 1, 4))
    other_g = trt_export.read_onnx_io(tiny_onnx(tmp_path / "g.onnx", num_group=64))
    with pytest.raises(ValueError, match="disagree with the config"):
        trt_export.profile_shapes(other_g, (1, 1, 4))
    bare = trt_export.read_onnx_io(tiny_onnx(tmp_path / "bare.onnx", with_meta=False))
    with pytest.raises(ValueError, match="no btp metadata"):
        trt_export.profile_shapes(bare, (1, 1, 4))


# ---- precision policy ----------------------------------------------------------------------------

def test_precision_policy_keeps_sensitive_layers_fp32():
    layers = [
        ("/point_encoder/blocks.0/norm1/LayerNormalization", "LayerNormalization"),
        ("/point_encoder/blocks.0/norm1/ReduceMean", "ReduceMean"),
        ("/point_encoder/blocks.0/norm2/Sub", "Sub"),              # decomposed LayerNorm
        ("/point_encoder/blocks.3/attn/Softmax", "Softmax"),
        ("/point_encoder/blocks.0/mlp/fc1/MatMul", "MatMul"),
        ("/point_encoder/blocks.0/attn/qkv/MatMul", "MatMul"),
        ("/gfcm/convs/convs.0/Conv", "Conv"),
        ("/MatMul_3", "MatMul"),                                  # text dot product at top level
        ("/Sigmoid", "Sigmoid"),
        ("/mgfem/layer_mlp/Gemm", "Gemm"),
        ("blocks.2.norm1 + residual", "NORMALIZATION"),           # a TensorRT layer type
        ("/point_encoder/normalize_feats/Div", "Div"),            # 'normalize' is not a LayerNorm scope
    ]
    got = {p.name: p.precision for p in trt_export.precision_policy(layers, scoring_tail={"/mgfem/layer_mlp/Gemm"})}
    assert got == {
        "/point_encoder/blocks.0/norm1/LayerNormalization": "fp32",
        "/point_encoder/blocks.0/norm1/ReduceMean": "fp32",
        "/point_encoder/blocks.0/norm2/Sub": "fp32",
        "/point_encoder/blocks.3/attn/Softmax": "fp32",
        "/point_encoder/blocks.0/mlp/fc1/MatMul": "fp16",
        "/point_encoder/blocks.0/attn/qkv/MatMul": "fp16",
        "/gfcm/convs/convs.0/Conv": "fp16",
        "/MatMul_3": "fp32",
        "/Sigmoid": "fp32",
        "/mgfem/layer_mlp/Gemm": "fp32",
        "blocks.2.norm1 + residual": "fp32",
        "/point_encoder/normalize_feats/Div": "fp16",
    }


def test_scoring_tail_is_everything_downstream_of_patch_embed():
    nodes = [("c", ["b"], ["c_out"]), ("a", ["x"], ["patch_embed"]), ("b", ["patch_embed", "t"], ["b_out"]),
             ("d", ["c_out"], ["y"]), ("e", ["x"], ["z"])]
    assert trt_export.scoring_tail(nodes) == {"b"}  # "c" reads "b" (a node name), not a tensor
    nodes[0] = ("c", ["b_out"], ["c_out"])
    assert trt_export.scoring_tail(nodes) == {"b", "c", "d"}


def test_precision_plan_on_an_onnx_graph(tmp_path):
    plan = {p.name: p for p in trt_export.precision_plan(tiny_onnx(tmp_path / "m.onnx"))}
    assert plan["/point_encoder/blocks.0/mlp/fc1/MatMul"].precision == "fp16"
    assert plan["/point_encoder/blocks.0/norm1/LayerNormalization"].precision == "fp32"
    assert plan["/mgfem_tail/ReduceSum"].reason == "scoring tail (after patch_embed)"
    assert plan["/MatMul_3"].precision == "fp32"


# ---- without TensorRT ----------------------------------------------------------------------------------

needs_no_trt = pytest.mark.skipif(trt_export.tensorrt_unavailable_reason() is None,
                                  reason="TensorRT is usable here: the 'missing TensorRT' paths cannot be seen")


@needs_no_trt
def test_btp_build_exits_2_naming_what_is_missing(tmp_path):
    from btp.cli import app

    model = tiny_onnx(tmp_path / "m.onnx")
    result = CliRunner().invoke(app, ["build", str(model), "--fp16"])
    assert result.exit_code == 2
    assert "TensorRT is not available here" in result.output and "tensorrt" in result.output.lower()


def test_btp_build_checks_the_model_before_tensorrt(tmp_path):
    from btp.cli import app

    runner = CliRunner()
    bare = tiny_onnx(tmp_path / "bare.onnx", with_meta=False)
    result = runner.invoke(app, ["build", str(bare)])
    assert result.exit_code == 2 and "no btp metadata" in result.output
    result = runner.invoke(app, ["build", str(tiny_onnx(tmp_path / "m.onnx")), "--int8"])
    assert result.exit_code == 2 and "--int8 needs --calib" in result.output
    result = runner.invoke(app, ["build", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2 and "no such file" in result.output


@needs_no_trt
def test_trt_backend_says_what_is_missing(tmp_path):
    from btp.errors import NotAvailableError
    from btp.runtime.backends.trt import TensorRTBackend

    with pytest.raises(NotAvailableError, match="TensorRT"):
        TensorRTBackend(tiny_onnx(tmp_path / "m.onnx"), None)


# ---- cache orchestration (the TensorRT calls replaced by a stand-in builder) -------------------------

def test_cached_engine_builds_once_then_reuses_and_rebuilds_on_change(tmp_path, monkeypatch):
    model = tiny_onnx(tmp_path / "m.onnx")
    current = {"trt": "10.3.0"}
    builds = []

    def fake_key(model_path, precision, batch, workspace_mb, calib_dir=None):
        return EngineKey(model_sha256=trt_export.file_sha256(model_path), gpu_name="NVIDIA H100 80GB HBM3",
                         compute_capability="9.0", trt_version=current["trt"],
                         precision=precision, batch=tuple(batch), workspace_mb=workspace_mb)

    def fake_build(model_path, key, timing_cache, *, calib_dir=None, log=print):
        builds.append(key.trt_version)
        profile = trt_export.profile_shapes(trt_export.read_onnx_io(model_path), key.batch)
        return f"plan for {key.digest()}".encode(), {"profile": profile, "outputs": ["patch_logits"],
                                                      "fp32_layers": [], "strongly_typed": False}

    monkeypatch.setattr(trt_export, "engine_key_for", fake_key)
    monkeypatch.setattr(trt_export, "build_engine", fake_build)
    lines = []
    first = trt_export.cached_engine(model, cache_dir=tmp_path / "cache", log=lines.append)
    assert first.built and builds == ["10.3.0"]
    manifest = json.loads(first.manifest_path.read_text())
    assert manifest["key"]["trt_version"] == "10.3.0" and manifest["profile"]["center"]["max"] == [4, G, 3]
    again = trt_export.cached_engine(model, cache_dir=tmp_path / "cache", log=lines.append)
    assert not again.built and again.plan_path == first.plan_path and builds == ["10.3.0"]
    current["trt"] = "10.8.0"  # TensorRT upgraded: another slot, built, the old plan never loaded
    upgraded = trt_export.cached_engine(model, cache_dir=tmp_path / "cache", log=lines.append)
    assert upgraded.built and upgraded.plan_path != first.plan_path and builds == ["10.3.0", "10.8.0"]
    forced = trt_export.cached_engine(model, cache_dir=tmp_path / "cache", force=True, log=lines.append)
    assert forced.built and builds[-1] == "10.8.0" and len(builds) == 3
    assert any(line.startswith("engine cache hit") for line in lines)


def _fake_engine_build(monkeypatch, plan, seconds: float = 1.0) -> dict:
    """TensorRT "available" and cached_engine replaced by a stand-in returning ``plan``: -> the
    keyword arguments btp build passed it."""
    calls = {}

    def fake_cached_engine(model_path, **kwargs):
        calls.update(kwargs)
        return trt_export.BuildResult(plan_path=plan, manifest_path=plan.with_name("manifest.json"), built=True,
                                      seconds=seconds, reasons=())

    monkeypatch.setattr(trt_export, "tensorrt_unavailable_reason", lambda: None)
    monkeypatch.setattr(trt_export, "cached_engine", fake_cached_engine)
    return calls


def test_btp_build_prints_the_plan(tmp_path, monkeypatch):
    from btp.cli import app

    model = tiny_onnx(tmp_path / "m.onnx")
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"x" * 2_000_000)
    calls = _fake_engine_build(monkeypatch, plan, seconds=12.5)
    result = CliRunner().invoke(app, ["build", str(model), "--fp32", "--max-batch", "8", "--workspace", "512"])
    assert result.exit_code == 0, result.output
    assert "engine.plan (2.0 MB, fp32, built in 12.5 s)" in result.output
    assert calls["precision"] == "fp32" and calls["batch"] == (1, 1, 8) and calls["workspace_mb"] == 512


def test_btp_build_takes_an_int8_model_without_calibration(tmp_path, monkeypatch):
    """An INT8 model.onnx (btp-export --precision int8) carries its scales: INT8, no --calib."""
    from btp.cli import app

    model = tiny_onnx(tmp_path / "int8.onnx", precision="int8")
    calls = _fake_engine_build(monkeypatch, model)
    result = CliRunner().invoke(app, ["build", str(model)])
    assert result.exit_code == 0, result.output
    assert calls["precision"] == "int8" and calls["calib_dir"] is None
    result = CliRunner().invoke(app, ["build", str(tiny_onnx(tmp_path / "fp32.onnx")), "--int8"])
    assert result.exit_code == 2 and "--int8 needs --calib" in result.output


def test_common_scope_and_scoped_root_ops():
    names = ["/inner/point_encoder/blocks/blocks.0/attn/qkv/MatMul", "/inner/MatMul", "/inner/Sub_1",
             "/inner/mgfem/fuse/fuse.2/Add", "onnx::MatMul_815"]
    assert trt_export.common_scope(names) == "/inner/"
    assert trt_export.common_scope(["/MatMul_3", "/a/b/Conv"]) == "/"
    got = {p.name: p.precision for p in trt_export.precision_policy((n, "MatMul") for n in names)}
    assert got == {"/inner/point_encoder/blocks/blocks.0/attn/qkv/MatMul": "fp16", "/inner/MatMul": "fp32",
                   "/inner/Sub_1": "fp32", "/inner/mgfem/fuse/fuse.2/Add": "fp32", "onnx::MatMul_815": "fp16"}
    no_root = trt_export.precision_policy([("/inner/MatMul", "MatMul")], root_ops=False)
    assert no_root[0].precision == "fp16"


@pytest.fixture(scope="module")
def exported_tiny(tmp_path_factory):
    pytest.importorskip("torch")
    from btp.export.onnx import export_onnx, fresh_model

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(fresh_model(tiny_config()), path, parity_scans=2)
    return path


def test_precision_plan_on_the_real_exported_model(exported_tiny):
    import onnx

    plan = {p.name: p for p in trt_export.precision_plan(exported_tiny)}
    nodes = {n.name: n for n in onnx.load(str(exported_tiny)).graph.node}
    for name, node in nodes.items():
        if node.op_type in ("LayerNormalization", "Softmax", "TopK", "Sigmoid"):
            assert plan[name].precision == "fp32", name
    # the text dot products and logits sit at the model's top level: FP32
    text_matmuls = [n for n, node in nodes.items() if node.op_type == "MatMul" and "/" not in n[len("/inner/"):]]
    assert text_matmuls and all(plan[n].precision == "fp32" for n in text_matmuls)
    producers = {out: n for n, node in nodes.items() for out in node.output}
    for output in ("patch_logits", "object_score", "global_prob"):
        assert plan[producers[output]].precision == "fp32", output
    # the heavy layers (attention, MLPs, convs) run FP16
    heavy = [n for n, node in nodes.items()
             if node.op_type in ("MatMul", "Conv", "Gemm") and ("/blocks" in n or "/convs" in n)]
    assert heavy and all(plan[n].precision == "fp16" for n in heavy)
    # the MGFEM fusion head feeds the unnormalised patch embedding: FP32
    head = [n for n in nodes if "/mgfem/" in n]
    assert head and all(plan[n].precision == "fp32" for n in head)
    share = sum(p.precision == "fp16" for p in plan.values()) / len(plan)
    assert share > 0.6


def test_precision_plan_keeps_gfcm_frame_and_geometry_fp32(tmp_path):
    """GFCM's local frame, in-patch and context geometry (covariances, closed-form eigen-solves)
    and context distances are named under gfcm/ in the export and kept FP32 for that reason; its
    convs and head run FP16."""
    pytest.importorskip("torch")
    import onnx

    from btp.export.onnx import export_onnx, fresh_model

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k = "local", 4
    cfg.gfcm.point_dim, cfg.gfcm.point_geometry, cfg.gfcm.context_geometry = 8, (0.5, 1.0), (2.0,)
    path = tmp_path / "geo.onnx"
    export_onnx(fresh_model(cfg.validate()), path, parity_scans=1)
    plan = {p.name: p for p in trt_export.precision_plan(path)}
    nodes = {n.name: n for n in onnx.load(str(path)).graph.node}
    in_gfcm = [n for n in nodes if n.startswith("/inner/gfcm/")]
    geometry = [n for n in in_gfcm if "/convs" not in n and "/head" not in n]
    assert len(geometry) > 100  # the frame + 2 widths of geometry + the context: hundreds of small ops
    assert {n.op_type for n in map(nodes.get, geometry)} >= {"Acos", "Cos", "Sqrt", "ReduceSum", "Mul", "TopK",
                                                             "GatherElements"}
    for name in geometry:
        if plan[name].op_type not in trt_export.FP32_OP_TYPES:
            assert plan[name].precision == "fp32" and plan[name].reason.startswith("GFCM"), (name, plan[name])
    convs = [n for n in in_gfcm if nodes[n].op_type == "Conv"]
    assert convs and all(plan[n].precision == "fp16" for n in convs)
    assert not any(plan[n].reason.startswith("top-level") for n in in_gfcm)
