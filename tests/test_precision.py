"""Reduced precision with an accuracy gate (btp.export.precision, `btp-export --precision`): the
default model, gated on small held-out sets of the shared shapes in both layouts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.export import precision as P
from btp.io import write_point_cloud
from btp.io.locations import packaged_model
from btp.runtime import Pipeline
from btp.runtime.metadata import META_KEY, ModelMetadataError, read_model_meta
from btp.train.synth import SynthConfig, SynthPlan, write_dataset
from runtime_helpers import real_scan

pytest.importorskip("onnxruntime.quantization")

BLOCK_TORCH = """import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this process")
sys.meta_path.insert(0, _NoTorch())
"""

# held-out shapes (btp.train.split): the gate never sees a mesh the model or the calibration saw
GATE_CLASSES = ["anchor", "fandisk", "rotor", "three_holes"]


@pytest.fixture(scope="module")
def model():
    path = packaged_model()
    if path is None:
        pytest.skip("the package's default model.onnx is missing")
    return path


@pytest.fixture(scope="module")
def gate_sets(shapes_root, tmp_path_factory):
    """Synthetic defects on held-out shapes, in both public layouts (8192-point scans)."""
    root = tmp_path_factory.mktemp("gate")
    for seed, layout in enumerate(("anomaly-shapenet", "real3d"), 7):
        write_dataset(shapes_root, root / layout, GATE_CLASSES,
                      SynthPlan(per_class_train=0, per_class_test_good=3, per_class_test_bad=3, seed=seed,
                                layout=layout),
                      SynthConfig(num_points=8192))
    return root


def test_layer_groups_cover_the_quantisable_nodes(model):
    proto = onnx.load(str(model), load_external_data=False)
    groups = P.layer_groups(proto)
    nodes = [n.name for n in proto.graph.node if n.op_type in P.QUANTIZED_OPS]
    assert sorted(n for names in groups.values() for n in names) == sorted(nodes)
    assert "gfcm" in groups and "blocks.0/attn" in groups and "blocks.5/mlp" in groups
    assert P.group_of("/inner/point_encoder/blocks/blocks.3/mlp/fc1/MatMul") == "blocks.3/mlp"
    assert P.group_of("/inner/MatMul_3") == "head"


def test_gate_refuses_a_broken_quantisation(model, gate_sets, shapes_root, tmp_path):
    """Every layer in INT8, ranges from one scan of one mesh: refused, and nothing written."""
    out = tmp_path / "broken.onnx"
    tiny = P.Int8Settings(calibration_scans=1, calibration_meshes=1)
    with pytest.raises(P.PrecisionError, match="fails the accuracy gate") as err:
        P.make_variant(model, out, "int8", gate_data=[gate_sets], shapes=shapes_root, keep_fp32=[], settings=tiny)
    assert "below FP32" in str(err.value) or "agree on" in str(err.value)
    assert not out.exists()
    forced = P.make_variant(model, out, "int8", gate_data=[gate_sets], shapes=shapes_root, keep_fp32=[],
                            settings=tiny, force=True)
    record = read_model_meta(out).export["precision"]
    assert record["mode"] == "int8" and record["forced"] is True and record["gate"]["passed"] is False
    assert not forced.gate.passed
    # the parity check's tolerance follows from the gate: no move there, none allowed here
    still = P.SetScores(name="s", o_auroc=0.5, p_auroc=0.5, labels=(0, 1), object_scores=(0.3, 0.4))
    check = P.parity(model, out, "ort-cpu", [still], [still])
    assert check["object_score_tolerance"] <= 1e-6 and not check["passed"]
    moved = P.SetScores(name="s", o_auroc=0.5, p_auroc=0.5, labels=(0, 1), object_scores=(0.3, 0.9))
    assert P.parity(model, out, "ort-cpu", [still], [moved])["passed"]


def test_committed_recipe_passes_and_runs(model, gate_sets, shapes_root, tmp_path):
    """The default model's INT8 recipe through btp-export without torch: gate passed, metadata,
    btp-run reports it."""
    out = tmp_path / "int8.onnx"
    argv = ["btp-export", "--model", str(model), "--out", str(out), "--precision", "int8", "--gate-data",
            str(gate_sets), "--calibration-shapes", str(shapes_root)]
    # torch-free: any import of torch fails in this process (a finder, not sys.modules['torch'] =
    # None, which scipy's array-API probe would trip over)
    code = (BLOCK_TORCH + f"sys.argv = {argv!r}\nfrom btp.cli import export_main\nexport_main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})
    res = proc.stdout + proc.stderr
    assert proc.returncode == 0, res
    assert "accuracy gate passed" in res and "O-AUROC" in res
    meta = read_model_meta(out)
    record = meta.export["precision"]
    assert meta.precision == "int8" and record["forced"] is False
    assert record["kept_fp32"] == list(P.committed_keep(read_model_meta(model)))
    assert record["gate"]["passed"] and record["gate"]["agreement"] >= P.GATE_AGREEMENT
    assert record["parity"]["passed"] and "parity on 6 sample scans" in res
    assert len(record["gate"]["sets"]) == 2
    assert meta.model["weights_sha256"] == read_model_meta(model).model["weights_sha256"]
    graph_ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= graph_ops

    scans = tmp_path / "scans"
    scans.mkdir()
    write_point_cloud(scans / "bunny.pcd", real_scan(shapes_root, n=6000, seed=3))
    res = CliRunner().invoke(app, ["run", str(out), str(scans), "--out", str(tmp_path / "o"), "--heatmap", "none"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o" / "bunny.json").read_text())
    assert doc["model"]["precision"] == "int8" and doc["backend"] == "ort-cpu"
    fp32 = Pipeline(model)(real_scan(shapes_root, n=6000, seed=3))
    assert abs(doc["object_score"] - fp32.object_score) < 0.02


def test_precision_needs_gate_data_and_fp32_source(model, tmp_path):
    res = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(tmp_path / "m.onnx"),
                                          "--precision", "int8"])
    assert res.exit_code == 2 and "--gate-data" in res.output
    res = CliRunner().invoke(app, ["export", "--model", str(model), "--out", str(tmp_path / "m.onnx"),
                                          "--precision", "fp16"])
    assert res.exit_code == 2 and "choose one of fp32, int8, bf16" in res.output


def _with_precision(model, dest, record) -> None:
    proto = onnx.load(str(model))
    prop = next(p for p in proto.metadata_props if p.key == META_KEY)
    doc = json.loads(prop.value)
    doc["export"]["precision"] = record
    prop.value = json.dumps(doc)
    onnx.save(proto, str(dest))


def test_metadata_precision_is_checked_and_drives_the_backend(model, tmp_path, monkeypatch, shapes_root):
    bad = tmp_path / "bad.onnx"
    _with_precision(model, bad, {"mode": "int4"})
    with pytest.raises(ModelMetadataError, match="precision"):
        read_model_meta(bad)
    bf16 = tmp_path / "bf16.onnx"
    _with_precision(model, bf16, {"mode": "bf16", "kept_fp32": [], "forced": False})
    from btp.runtime.backends import openvino

    monkeypatch.setattr(openvino, "cpu_bf16", lambda: (False, "neither avx512_bf16 nor amx_bf16"))
    with pytest.warns(RuntimeWarning, match="float32 on ort-cpu"):
        pipe = Pipeline(bf16)
    assert pipe.backend.name == "ort-cpu"
    with pytest.raises(P.PrecisionError, match="no native bfloat16"):
        P.make_variant(model, tmp_path / "x.onnx", "bf16", gate_data=[tmp_path])
    monkeypatch.undo()
    if openvino.bf16_unavailable():
        pytest.skip(f"openvino-bf16 cannot run here: {openvino.bf16_unavailable()}")
    pipe = Pipeline(bf16)
    assert pipe.backend.name == "openvino-bf16"
    scan = real_scan(shapes_root, n=5000, seed=4)
    assert np.isfinite(pipe(scan).object_score)
