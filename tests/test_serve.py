"""Triton serving: `btp export --format triton` -> `btp serve` (a real tritonserver on free loopback
ports) -> a real scan over plain KServe-v2 HTTP JSON gets btp-run's scores; bad requests get a 4xx
and the server keeps serving; with `--reference PART.btpref`, btp-run --reference's results (fused
map, deviation, scores, threshold, fitness, decision) and a scan that does not register flagged.
Skipped with the reason where the server binary cannot start."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.export import triton_stages
from runtime_helpers import BUNNY, PINION, build_references, real_scan, tiny_export, turned, with_bump


def _server_or_skip():
    from btp.errors import NotAvailableError
    from btp.export.triton import find_tritonserver

    try:
        return find_tritonserver()
    except NotAvailableError as exc:
        pytest.skip(str(exc))


def _infer(port: int, points: np.ndarray):
    body = {"inputs": [{"name": "points", "shape": list(points.shape), "datatype": "FP32",
                        "data": points.ravel().tolist()}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/btp/infer", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return {o["name"]: np.asarray(o["data"], bool if o["datatype"] == "BOOL" else np.float32)
                for o in json.loads(r.read())["outputs"]}


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture(scope="module")
def served(tmp_path_factory, shapes_root):
    _server_or_skip()
    model = tiny_export(tmp_path_factory)[0]
    repo = tmp_path_factory.mktemp("repo") / "btp-repo"
    res = CliRunner().invoke(app, ["export", "--format", "triton", "--model", str(model), "--out", str(repo)])
    assert res.exit_code == 0, res.output
    for port, proc in _serve(repo):
        yield model, port, proc


def _serve(repo: Path):
    """`btp serve repo` on free loopback ports: yields (HTTP port, the process) once it is ready,
    then stops it with SIGTERM."""
    from btp.export.triton import free_port

    ports = [free_port() for _ in range(3)]
    proc = subprocess.Popen([sys.executable, "-m", "btp.cli", "serve", str(repo), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not _ready(ports[0]):
        if proc.poll() is not None or time.time() > deadline:
            out = proc.stdout.read() if proc.poll() is not None else ""
            proc.kill()
            log = (repo / "tritonserver.log").read_text()[-3000:] if (repo / "tritonserver.log").exists() else ""
            pytest.fail(f"btp serve did not become ready: {out}\n{log}")
        time.sleep(0.5)
    yield ports[0], proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def test_a_scan_over_kserve_http_gets_btp_runs_scores(served, shapes_root, tmp_path):
    model, port, _ = served
    scan = real_scan(shapes_root, n=3000, seed=11)
    got = _infer(port, scan)
    np.save(tmp_path / "scan.npy", scan)
    res = CliRunner().invoke(app, ["run", str(model), str(tmp_path / "scan.npy"), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    ref_points = np.load(tmp_path / "out" / "scan.npy")
    ref_object = json.loads((tmp_path / "out" / "scan.json").read_text())["object_score"]
    assert got["point_scores"].shape == (3000,)
    np.testing.assert_allclose(got["point_scores"], ref_points, atol=1e-5, rtol=0)
    assert abs(float(got["object_score"][0]) - ref_object) <= 1e-6
    assert 0 <= float(got["global_prob"][0]) <= 1


def test_bad_requests_get_a_4xx_and_the_server_keeps_serving(served, shapes_root):
    _, port, proc = served
    for bad in (np.zeros((3, 3), np.float32),                      # fewer points than the model needs
                np.full((500, 3), np.nan, np.float32)):              # NaN rows only
        with pytest.raises(urllib.error.HTTPError) as err:
            _infer(port, bad)
        assert 400 <= err.value.code < 500
        assert "fewer than the 32 needed" in err.value.read().decode()  # max(G, K) of the tiny model
    for shape, dtype in (([10, 2], "FP32"), ([400, 3], "FP64")):  # wrong shape, wrong dtype
        n = shape[0] * shape[1]
        body = {"inputs": [{"name": "points", "shape": shape, "datatype": dtype, "data": [0.5] * n}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/btp/infer", data=json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert 400 <= err.value.code < 500, (shape, dtype)
    assert _ready(port) and proc.poll() is None
    assert _infer(port, real_scan(shapes_root, n=2000, seed=3))["point_scores"].shape == (2000,)


def test_nan_rows_keep_one_score_per_input_row(served, shapes_root):
    _, port, _ = served
    scan = real_scan(shapes_root, n=2000, seed=4)
    scan[::50] = np.nan
    got = _infer(port, scan)["point_scores"]
    assert got.shape == (2000,) and np.isnan(got[::50]).all() and np.isfinite(np.delete(got, np.s_[::50])).all()


def test_ensemble_layout_is_written_for_triton_containers(tmp_path_factory, tmp_path):
    from btp.export.triton import export_repository

    model = tiny_export(tmp_path_factory)[0]
    repo = export_repository(model, tmp_path / "ens", layout="ensemble")
    ensemble = (repo / "btp" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ensemble and ensemble.count("model_name:") == 3
    engine = (repo / "btp_engine" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in engine and "dynamic_batching" in engine
    assert (repo / "btp_engine" / "1" / "model.onnx").is_file()
    stages_source = Path(triton_stages.__file__).read_bytes()
    for step in ("btp_pre", "btp_post"):
        assert (repo / step / "1" / "model.py").read_bytes() == stages_source  # the package's module, as it is
        assert json.loads((repo / step / "1" / "btp_env.json").read_text())["stage"] == step[4:]


def test_configs_list_the_stages_ports(tmp_path_factory, tmp_path):
    """Every config.pbtxt names exactly the tensors btp.export.triton_stages.ports gives (the engine's
    from btp.contract), with the model's G, K, C."""
    from btp.export.triton import export_repository
    from btp.runtime.metadata import read_model_meta

    model = tiny_export(tmp_path_factory)[0]
    cfg = read_model_meta(model).config
    repo = export_repository(model, tmp_path / "ens", layout="ensemble")
    g, k, c = cfg.encoder.num_group, cfg.encoder.group_size, cfg.encoder.in_channels
    for folder, stage in (("btp", "pipeline"), ("btp_pre", "pre"), ("btp_post", "post"), ("btp_engine", "engine")):
        text = (repo / folder / "config.pbtxt").read_text()
        ins, outs = triton_stages.ports(stage, cfg)
        assert text.count("{ name:") == len(ins) + len(outs), folder
        for port in ins + outs:
            assert f'name: "{port.name}" data_type: TYPE_{port.dtype} dims: [ {", ".join(map(str, port.dims))} ]' \
                in text, (folder, port)
    engine = (repo / "btp_engine" / "config.pbtxt").read_text()
    assert f'name: "neighborhood" data_type: TYPE_FP32 dims: [ {g}, {k}, {c} ]' in engine
    assert 'name: "object_score" data_type: TYPE_FP32 dims: [ 1 ] reshape: { shape: [  ] }' in engine
    assert "patch_logits" not in engine  # the runtime does not read it (btp.contract: runtime="")
    with pytest.raises(Exception, match="--layout 'flat': choose one of python, ensemble"):
        export_repository(model, tmp_path / "bad", layout="flat")


def test_pipeline_stage_drops_nan_rows_through_btp_io(tmp_path_factory, shapes_root):
    """The stage classes import and run without Triton: the pipeline stage is btp-run's scores, NaN
    where a row was NaN, and refuses too few finite rows with btp.io's error."""
    from btp.io import InvalidValuesError, TooFewPointsError
    from btp.runtime import Pipeline

    model = tiny_export(tmp_path_factory)[0]
    stage = triton_stages.PipelineStage(str(model))
    scan = real_scan(shapes_root, n=2500, seed=5)
    scan[::40] = np.nan
    with pytest.warns(UserWarning, match="dropped 63 of 2500 rows"):
        got = stage({"points": scan})
    finite = np.isfinite(scan).all(axis=1)
    ref = Pipeline(model)(scan[finite])
    assert np.isnan(got["point_scores"][~finite]).all()
    np.testing.assert_array_equal(got["point_scores"][finite], ref.point_scores)
    assert got["object_score"][0] == np.float32(ref.object_score)
    with pytest.raises(TooFewPointsError):
        stage({"points": scan[finite][:5]})
    with pytest.raises(InvalidValuesError), pytest.warns(UserWarning):
        stage({"points": np.full((500, 3), np.nan, np.float32)})


class _FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def __dlpack__(self, **kw):
        return self.array.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    @classmethod
    def from_dlpack(cls, name, array):
        return cls(name, np.from_dlpack(array))


class _FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


def _fake_pb_utils():
    """The few triton_python_backend_utils names the generated models use, over numpy."""
    import types

    class TritonError(Exception):
        INVALID_ARG = 3

        def __init__(self, msg, code=None):
            super().__init__(msg)

    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = _FakeTensor
    mod.InferenceResponse = _FakeResponse
    mod.TritonError = TritonError
    mod.TritonModelException = RuntimeError
    mod.get_input_tensor_by_name = lambda request, name: request[name]
    return mod


def _load_model_py(path, monkeypatch, config: dict | None = None):
    """The generated model.py's TritonPythonModel, initialised with ``config`` as Triton passes the
    model's config.pbtxt (JSON in args["model_config"])."""
    import importlib.util

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location(f"m_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config or {})})
    return model


def test_ensemble_steps_compute_the_pipelines_scores(tmp_path_factory, tmp_path, shapes_root, monkeypatch):
    """btp_pre -> the engine (ONNX Runtime here, as Triton's onnxruntime backend would) -> btp_post,
    run through the generated model.py files with a stand-in for Triton's Python utils: the same
    scores as btp.runtime.Pipeline (no server here has the ONNX Runtime backend)."""
    _ensemble_matches_pipeline(tiny_export(tmp_path_factory)[0], tmp_path, shapes_root, monkeypatch, (3000, 20000))


def test_ensemble_carries_per_point_scores(tmp_path, shapes_root, monkeypatch):
    """A model with per-point scores (gfcm.point_dim): the engine's patch_point_probs reach btp_post."""
    torch = pytest.importorskip("torch", reason="exporting a model needs torch")
    from btp.config import tiny_config
    from btp.export.onnx import export_onnx, load_model
    from btp.model import BTPModel
    from btp.model.checkpoint import save_checkpoint

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    cfg.scoring.object_source = "pooled-points"  # the object score is made in btp_post, not in the engine
    torch.manual_seed(8)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    with torch.no_grad():
        model.point_refine.offset.weight.normal_()
    model.freeze_text(drop_encoder=True)
    ckpt = save_checkpoint(tmp_path / "p.safetensors", model.eval(), {"data": "test"})
    export_onnx(load_model(ckpt), tmp_path / "p.onnx", parity_scans=1)
    repo, engine_scores, ensemble_scores = _ensemble_matches_pipeline(tmp_path / "p.onnx", tmp_path, shapes_root,
                                                                      monkeypatch, (3000,))
    assert "patch_point_probs" in (repo / "btp" / "config.pbtxt").read_text()
    assert engine_scores != pytest.approx(ensemble_scores, abs=1e-6)  # the pooled rule, not the graph's score


def _ensemble_matches_pipeline(model, tmp_path, shapes_root, monkeypatch, sizes):
    """btp_pre -> engine -> btp_post of ``model``'s ensemble repository == btp.runtime.Pipeline."""
    from btp.export.triton import export_repository
    from btp.runtime import Pipeline
    from btp.runtime.backends import make_backend
    from btp.runtime.metadata import read_model_meta

    repo = export_repository(model, tmp_path / "ens", layout="ensemble")
    pre = _load_model_py(repo / "btp_pre" / "1" / "model.py", monkeypatch)
    post = _load_model_py(repo / "btp_post" / "1" / "model.py", monkeypatch)
    engine_path = repo / "btp_engine" / "1" / "model.onnx"
    engine = make_backend("ort-cpu", engine_path, read_model_meta(engine_path))
    engine_scores, ensemble_scores = [], []
    for n in sizes:  # more than N points: the voxel rule, whose map travels pre -> post
        scan = real_scan(shapes_root, n=n, seed=12)
        scan[::100] = np.nan
        request = {"points": _FakeTensor("points", scan)}
        p = pre.execute([request])[0]
        assert p.error is None, p.error
        assert p.outputs["cell_rep"].size > 0
        out = engine.run(p.outputs["neighborhood"], p.outputs["center"])
        post_request = {k: _FakeTensor(k, v) for k, v in p.outputs.items()}
        post_request["points"] = request["points"]
        for name in ("patch_probs", "patch_point_probs", "object_score", "global_prob"):
            if name in out:
                post_request[name] = _FakeTensor(name, out[name])
        q = post.execute([post_request])[0]
        assert q.error is None, q.error
        finite = np.isfinite(scan).all(axis=1)
        ref = Pipeline(model)(scan[finite])
        np.testing.assert_allclose(q.outputs["point_scores"][finite], ref.point_scores, atol=1e-5, rtol=0)
        assert np.isnan(q.outputs["point_scores"][~finite]).all()
        assert abs(float(q.outputs["object_score"][0]) - ref.object_score) <= 1e-5
        engine_scores.append(float(out["object_score"][0]))
        ensemble_scores.append(float(q.outputs["object_score"][0]))
    bad = pre.execute([{"points": _FakeTensor("points", np.zeros((3, 3), np.float32))}])[0]
    assert bad.error is not None and "fewer than" in str(bad.error)
    return repo, engine_scores, ensemble_scores


# ---- with a reference: `btp export --format triton --reference PART.btpref` ------------------------

N_REF = 3000


@pytest.fixture(scope="module")
def bunny_reference(tmp_path_factory, shapes_root):
    """(model.onnx, bunny.btpref built by `btp reference build` from 3 good scans in random poses)."""
    model = tiny_export(tmp_path_factory)[0]
    refs = build_references(tmp_path_factory.mktemp("refs"), model, shapes_root, n=N_REF, parts=("bunny",))
    return model, refs / "bunny.btpref"


@pytest.fixture(scope="module")
def bunny_embedding_reference(tmp_path_factory, shapes_root):
    """(model.onnx with patch_embed, bunny.btpref built with --embeddings)."""
    model = tiny_export(tmp_path_factory, patch_embed=True)[0]
    refs = build_references(tmp_path_factory.mktemp("refs-embed"), model, shapes_root, n=N_REF, parts=("bunny",),
                            options=("--embeddings",))
    return model, refs / "bunny.btpref"


def _reference_scans(shapes_root) -> dict[str, np.ndarray]:
    """A good bunny, the same with a bump, a gear (another part: does not register), all turned at random;
    the good one with NaN rows (one output per input row)."""
    good = real_scan(shapes_root, BUNNY, n=N_REF, seed=40)
    scans = {"good": turned(good, 41), "bump": turned(with_bump(good), 42),
             "gear": turned(real_scan(shapes_root, PINION, n=N_REF, seed=60), 60)}
    scans["good"][::100] = np.nan
    return scans


def test_reference_pipeline_over_kserve_http_gets_btp_run_references_results(bunny_reference, shapes_root,
                                                                              tmp_path):
    """The served reference-guided pipeline == `btp-run --reference` on the same scans: the fused map
    and signed deviation per row (<stem>.reference.npy) within 1e-5 (float32 through JSON), the fused
    and reference scores, the part's threshold and the deviation's max within 1e-6 relative, the
    fitness within 5e-5 (btp-run's JSON rounds it to 4 decimals), the decision exactly; the zero-shot
    outputs stay btp-run's own (zero_shot_score). A scan that does not register comes back flagged:
    registered false, NaN fused outputs, not anomalous."""
    _server_or_skip()
    model, reference = bunny_reference
    repo = tmp_path / "repo"
    res = CliRunner().invoke(app, ["export", "--format", "triton", "--model", str(model), "--out", str(repo),
                                   "--reference", str(reference)])
    assert res.exit_code == 0, res.output
    copy = repo / "btp" / "1" / "bunny.btpref"
    assert copy.read_bytes() == reference.read_bytes()
    assert 'parameters { key: "reference" value: { string_value: "bunny.btpref" } }' in \
        (repo / "btp" / "config.pbtxt").read_text()
    scans = _reference_scans(shapes_root)
    got = {}
    for port, _ in _serve(repo):
        got = {stem: _infer(port, scan) for stem, scan in scans.items()}
    (tmp_path / "scans").mkdir()
    for stem, scan in scans.items():
        np.save(tmp_path / "scans" / f"{stem}.npy", scan)
    res = CliRunner().invoke(app, ["run", str(model), str(tmp_path / "scans"), "--out", str(tmp_path / "out"),
                                   "--reference", str(reference)])
    assert res.exit_code == 0, res.output
    docs = {stem: json.loads((tmp_path / "out" / f"{stem}.json").read_text()) for stem in scans}
    assert [docs[s]["decision"] for s in scans] == ["normal", "anomalous", "not registered"]
    for stem, doc in docs.items():
        served, ref = got[stem], doc["reference"]
        assert served["point_scores"].shape == (N_REF,)
        np.testing.assert_allclose(served["point_scores"], np.load(tmp_path / "out" / f"{stem}.npy"), atol=1e-5,
                                   rtol=0)
        assert float(served["object_score"][0]) == pytest.approx(doc["zero_shot_score"], abs=1e-6)
        assert bool(served["registered"][0]) == ref["registered"]
        assert bool(served["anomalous"][0]) == (doc["decision"] == "anomalous")
        assert float(served["fitness"][0]) == pytest.approx(ref["fitness"], abs=5e-5)
        assert float(served["threshold"][0]) == pytest.approx(ref["threshold"], rel=1e-6)
        if not ref["registered"]:
            continue
        maps = np.load(tmp_path / "out" / f"{stem}.reference.npy")  # [rows, 2]: fused, signed deviation
        np.testing.assert_allclose(served["fused_scores"], maps[:, 0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(served["deviation"], maps[:, 1], atol=1e-5, rtol=0)
        assert float(served["fused_object_score"][0]) == pytest.approx(doc["object_score"], rel=1e-6)
        assert float(served["reference_score"][0]) == pytest.approx(ref["reference_score"], rel=1e-6)
        assert float(np.nanmax(np.abs(served["deviation"]))) == pytest.approx(ref["deviation"]["max_abs"], rel=1e-6)
    assert np.isnan(got["good"]["fused_scores"][::100]).all() and np.isnan(got["good"]["point_scores"][::100]).all()
    gear = got["gear"]
    assert not gear["registered"][0] and not gear["anomalous"][0] and float(gear["fitness"][0]) < 0.6
    assert np.isnan(gear["fused_scores"]).all() and np.isnan(gear["deviation"]).all()
    assert np.isnan(gear["fused_object_score"]).all() and np.isnan(gear["reference_score"]).all()


def test_reference_export_refuses_what_btp_run_refuses(bunny_reference, tmp_path):
    """--reference is checked before anything is written: a reference for another model file, a
    modified one, a folder of references (a request has no path to route by), a checkpoint --model;
    a reference modified in the repository after the export stops the model's load."""
    import onnx

    model, reference = bunny_reference
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model))
    proto.doc_string = "another build of the model"
    onnx.save(proto, str(other))
    tampered = tmp_path / "tampered.btpref"
    data = reference.read_bytes()
    tampered.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    for args, message in ((["--model", str(other), "--reference", str(reference)], "built for another model"),
                          (["--model", str(model), "--reference", str(tampered)], "does not match its sha256"),
                          (["--model", str(model), "--reference", str(reference.parent)], "is a folder"),
                          (["--model", "tiny", "--reference", str(reference)], "needs --model MODEL.onnx")):
        out = tmp_path / f"repo-{len(list(tmp_path.iterdir()))}"
        res = CliRunner().invoke(app, ["export", "--format", "triton", "--out", str(out), *args])
        assert res.exit_code == 1, res.output
        assert message in " ".join(res.output.split()), res.output
        assert not out.exists() or not any(out.iterdir())
    res = CliRunner().invoke(app, ["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--reference",
                                   str(reference)], env={"COLUMNS": "200"})
    assert res.exit_code == 2, res.output
    assert "--reference does not apply to --format onnx; it applies to --format triton" in \
        " ".join(res.output.replace("│", " ").split()), res.output
    from btp.export.triton import export_repository
    from btp.runtime.reference import ReferenceError

    repo = export_repository(model, tmp_path / "repo", reference=reference)
    copy = repo / "btp" / "1" / reference.name
    copy.write_bytes(tampered.read_bytes())
    with pytest.raises(ReferenceError, match="does not match its sha256"):
        triton_stages.PipelineStage(str(repo / "btp" / "1" / "model.onnx"), reference=str(copy))


@pytest.mark.parametrize("which", ["bunny_reference", "bunny_embedding_reference"])
def test_ensemble_with_a_reference_scores_as_btp_run(which, request, tmp_path, shapes_root, monkeypatch):
    """The ensemble's btp_post scores with the reference (its copy, named in btp_post's config):
    btp_pre -> ONNX Runtime -> btp_post through the generated model.py files gives Pipeline(...,
    reference=...)'s fused map, deviation and scores; the entry ensemble maps every reference output.
    A reference with the model's embeddings: btp_post runs the model on the aligned scan itself."""
    from btp.export.triton import export_repository
    from btp.runtime import Pipeline
    from btp.runtime.backends import make_backend
    from btp.runtime.metadata import read_model_meta

    model, reference = request.getfixturevalue(which)
    repo = export_repository(model, tmp_path / "ens", layout="ensemble", reference=reference)
    post_config = (repo / "btp_post" / "config.pbtxt").read_text()
    assert 'parameters { key: "reference" value: { string_value: "bunny.btpref" } }' in post_config
    assert (repo / "btp_post" / "1" / "bunny.btpref").is_file() and not (repo / "btp_pre" / "1" / "bunny.btpref").exists()
    entry = (repo / "btp" / "config.pbtxt").read_text()
    for port in triton_stages.REFERENCE:
        assert f'output_map {{ key: "{port.name}" value: "{port.name}" }}' in entry
        assert f'name: "{port.name}" data_type: TYPE_{port.dtype}' in entry and port.name in post_config
    pre = _load_model_py(repo / "btp_pre" / "1" / "model.py", monkeypatch)
    post = _load_model_py(repo / "btp_post" / "1" / "model.py", monkeypatch,
                          config={"parameters": {"reference": {"string_value": "bunny.btpref"}}})
    engine_path = repo / "btp_engine" / "1" / "model.onnx"
    engine = make_backend("ort-cpu", engine_path, read_model_meta(engine_path))
    pipe = Pipeline(model, reference=reference)
    for stem, scan in _reference_scans(shapes_root).items():
        p = pre.execute([{"points": _FakeTensor("points", scan)}])[0]
        assert p.error is None, p.error
        out = engine.run(p.outputs["neighborhood"], p.outputs["center"])
        request = {k: _FakeTensor(k, v) for k, v in {**p.outputs, "points": scan}.items()}
        for name in ("patch_probs", "patch_point_probs", "object_score", "global_prob"):
            if name in out:
                request[name] = _FakeTensor(name, out[name])
        q = post.execute([request])[0]
        assert q.error is None, q.error
        finite = np.isfinite(scan).all(axis=1)
        guided = pipe(scan[finite]).reference
        assert bool(q.outputs["registered"][0]) == guided.scores.registered, stem
        assert bool(q.outputs["anomalous"][0]) == (guided.decision == "anomalous"), stem
        assert float(q.outputs["fitness"][0]) == pytest.approx(guided.scores.fitness, abs=1e-6)
        if not guided.scores.registered:
            assert stem == "gear" and np.isnan(q.outputs["fused_scores"]).all()
            continue
        np.testing.assert_allclose(q.outputs["fused_scores"][finite], guided.scores.fused, atol=1e-5, rtol=0)
        np.testing.assert_allclose(q.outputs["deviation"][finite], guided.scores.deviation, atol=1e-5, rtol=0)
        assert np.isnan(q.outputs["fused_scores"][~finite]).all()
        assert float(q.outputs["fused_object_score"][0]) == pytest.approx(guided.scores.object_score, abs=1e-5)
