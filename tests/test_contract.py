"""btp.contract: the one table of the engine's tensors, backends and export formats drives the
metadata, the graph check at load, the CLI's choices and help, and the benchmarks' rows."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from btp import contract
from btp.cli import app
from btp.config import tiny_config
from btp.runtime.metadata import (ModelMetadataError, build_metadata, io_spec, output_names, parse_metadata,
                                  read_model_meta)


def point_config():
    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    return cfg.validate()


# ---- tensors ----------------------------------------------------------------------------------

def test_metadata_round_trip_carries_the_tables_shapes():
    for cfg, optional in ((tiny_config(), ()), (point_config(), ("patch_embed",))):
        doc = build_metadata(cfg, model={"name": "t"}, provenance={}, export={"batch": 4}, optional=optional)
        meta = parse_metadata(json.dumps(doc))
        assert meta.config.to_dict() == cfg.to_dict() and meta.batch == 4
        outputs = [t.name for t in contract.graph_outputs(cfg, optional)]
        assert list(meta.io["outputs"]) == outputs == list(output_names(cfg, optional))
        assert list(meta.io["inputs"]) == ["neighborhood", "center"]
        g, k, c, d = cfg.encoder.num_group, cfg.encoder.group_size, cfg.encoder.in_channels, cfg.text.embed_dim
        assert meta.io["inputs"]["neighborhood"] == {"shape": [4, g, k, c], "dtype": "float32"}
        assert ("patch_point_probs" in outputs) == bool(cfg.gfcm.point_dim)
        if optional:
            assert meta.io["outputs"]["patch_embed"]["shape"] == [4, g, d]
            assert meta.io["outputs"]["patch_point_probs"]["shape"] == [4, g, k]
    assert io_spec(tiny_config(), "dynamic")["outputs"]["object_score"]["shape"] == ["B"]
    with pytest.raises(ValueError, match="choose from patch_embed"):
        io_spec(tiny_config(), "dynamic", optional=("geo_desc",))  # forward gives it, no graph does


def _graph(path, cfg, *, drop=(), shapes=None):
    """A small ONNX file whose inputs and outputs are the table's for ``cfg``, with btp metadata."""
    import onnx
    from onnx import TensorProto, helper

    shapes = shapes or {}
    rows = [t for t in contract.inputs() + contract.graph_outputs(cfg) if t.name not in drop]
    vi = {t.name: helper.make_tensor_value_info(t.name, TensorProto.FLOAT, shapes.get(t.name, t.dims(cfg)))
          for t in rows}
    outs = [t.name for t in rows if t.role == "output"]
    nodes = [helper.make_node("ReduceMean", ["neighborhood"], [name], keepdims=0) for name in outs]
    graph = helper.make_graph(nodes, "btp", [vi["neighborhood"], vi["center"]], [vi[n] for n in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    doc = build_metadata(cfg, model={}, provenance={}, export={"batch": "dynamic"})
    helper.set_model_props(model, {"btp": json.dumps(doc)})
    onnx.save(model, str(path))
    return path


def test_the_graph_check_at_load_follows_the_table(tmp_path):
    cfg = point_config()
    g, k = cfg.encoder.num_group, cfg.encoder.group_size
    assert read_model_meta(_graph(tmp_path / "ok.onnx", cfg)).config.to_dict() == cfg.to_dict()
    # an output the runtime only reads when it is there may be missing
    read_model_meta(_graph(tmp_path / "no_global.onnx", cfg, drop=("global_prob",)))
    for name in (t.name for t in contract.required_outputs(cfg)):  # one the runtime needs may not
        with pytest.raises(ModelMetadataError, match=f"the graph has no output '{name}'"):
            read_model_meta(_graph(tmp_path / f"no_{name}.onnx", cfg, drop=(name,)))
    # every contract tensor the graph has must have the config's shape, optional ones included
    with pytest.raises(ModelMetadataError, match=r"graph output 'global_prob' has shape \['B', 3\]"):
        read_model_meta(_graph(tmp_path / "bad_global.onnx", cfg, shapes={"global_prob": ["B", 3]}))
    with pytest.raises(ModelMetadataError, match=r"'patch_point_probs' has shape \['B', %d, %d\]" % (g, k + 1)):
        read_model_meta(_graph(tmp_path / "bad_point.onnx", cfg, shapes={"patch_point_probs": ["B", g, k + 1]}))


# ---- backends ---------------------------------------------------------------------------------

def test_an_unknown_backend_is_refused_with_the_tables_list(tmp_path):
    names = contract.backend_names()
    for args in (["run", str(tmp_path / "m.onnx"), str(tmp_path)], ["calibrate", str(tmp_path / "m.onnx"),
                                                                     str(tmp_path)], ["demo"]):
        res = CliRunner().invoke(app, args + ["--backend", "tensorflow"])
        assert res.exit_code == 2, (args, res.output)
        said = " ".join(res.output.split())
        assert "unknown backend 'tensorflow'" in said and ", ".join(names) in said, said
    from btp.runtime.backends import BackendError, make_backend

    with pytest.raises(BackendError, match=", ".join(names)):
        make_backend("tensorflow", tmp_path / "m.onnx", None)


def test_help_lists_every_backend_and_format_of_the_table():
    run_help = " ".join(CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output.split())
    for row in contract.BACKENDS:
        assert row.name in run_help
    assert "trt: TensorRT engine" in contract.backends_help() and "ort-cpu: ONNX Runtime" in contract.backends_help()
    export_help = " ".join(CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"}).output.split())
    for row in contract.FORMATS:
        assert row.name in export_help and row.command.split()[0] in export_help
    for row in contract.optional_outputs():
        assert row.name in export_help


def test_the_benchmarks_rows_are_the_tables_backends():
    from btp.benchmarks.latency import BACKENDS, GPU_BACKENDS, TORCH_BACKENDS, unavailable_reason

    bench = [name for row in contract.BACKENDS for name in row.bench]
    assert set(BACKENDS) == set(TORCH_BACKENDS) | set(bench)
    assert set(GPU_BACKENDS) == {name for row in contract.BACKENDS if row.gpu for name in row.bench}
    for name in bench:
        assert "unknown backend" not in (unavailable_reason(name) or "")


# ---- export formats ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--format", "engine"], "choose one of onnx, triton (`btp build` makes engines)"),
    (["--format", "onnx", "--layout", "ensemble"], "--layout does not apply to --format onnx; it applies to "
                                                   "--format triton"),
    (["--format", "triton", "--batch", "4"], "--batch does not apply to --format triton; it applies to "
                                             "--format onnx"),
    (["--format", "triton", "--layout", "flat"], "--layout 'flat': choose one of python, ensemble"),
    (["--optional-output", "geo_desc"], "optional output(s) ['geo_desc']: choose from patch_embed"),
])
def test_export_takes_only_its_formats_options(tmp_path, args, words):
    res = CliRunner().invoke(app, ["export", "--out", str(tmp_path / "x"), *args], env={"COLUMNS": "200"})
    assert res.exit_code == 2 and words in " ".join(res.output.replace("│", " ").split()), res.output
    assert not (tmp_path / "x").exists()


def test_an_optional_output_is_one_row(tmp_path, monkeypatch, shapes_root):
    """Turning a forward output into an optional graph output is one row: the CLI takes it, the
    graph gives it, the metadata lists it, the runtime loads the model and scores with it."""
    pytest.importorskip("torch", reason="exporting a model needs torch")
    import onnxruntime as ort

    from btp.runtime import Pipeline
    from runtime_helpers import real_scan

    rows = tuple(dataclasses.replace(t, graph="requested") if t.name == "global_logit" else t
                 for t in contract.TENSORS)
    monkeypatch.setattr(contract, "TENSORS", rows)
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(app, ["export", "--model", "tiny", "--out", str(out), "--optional-output",
                                   "global_logit", "--no-simplify"])
    assert res.exit_code == 0, res.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["patch_logits", "patch_probs", "global_logit", "global_prob",
                                                       "object_score"]  # the table's order
    meta = read_model_meta(out)
    assert meta.io["outputs"]["global_logit"] == {"shape": ["B"], "dtype": "float32"}
    result = Pipeline(out)(real_scan(shapes_root, n=1500, seed=2))
    assert np.isfinite(result.object_score) and result.point_scores.shape == (1500,)
