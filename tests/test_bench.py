"""btp.benchmarks: report schema, ordered timings, the pure comparator, goals, FLOP counting, ops rows.

No timed assertions: speed goals live in the committed benchmark reports, not here. Tiny sizes
and short durations keep this file well under a minute.
"""
from __future__ import annotations

import copy
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from btp.export import compare as cmp
from btp.benchmarks import report as rep
from btp.benchmarks.goals import evaluate_goals
from btp.benchmarks.stats import measure, summarize


def _ordered(stats: dict) -> None:
    assert stats["min"] > 0
    assert stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert stats["min"] <= stats["mean"] <= stats["max"]


# ---- stats ------------------------------------------------------------------------------------

def test_summarize_orders_percentiles():
    s = summarize([5.0, 1.0, 3.0, 2.0, 100.0, 4.0]).to_dict()
    _ordered(s)
    assert s["n"] == 6 and s["p50"] == 3.5 and s["max"] == 100.0
    with pytest.raises(ValueError):
        summarize([])


def test_measure_excludes_warmup_and_respects_min_iters():
    calls = []
    samples = measure(lambda: calls.append(1), warmup_s=0.0, duration_s=0.0, min_iters=7, min_warmup_iters=3)
    assert len(samples) == 7 and len(calls) == 10
    assert all(ms >= 0 for ms in samples)


# ---- the pure comparator ------------------------------------------------------------------------

def test_compare_verdicts_per_kind():
    ref = {"patch_probs": np.array([[0.1, 0.5]]), "patch_embed": np.array([[[1.0, 0.0]]]),
           "fps_idx": np.array([[0, 3, 2]]), "o_auroc": np.array([0.80])}
    test = {"patch_probs": np.array([[0.1, 0.50005]]), "patch_embed": np.array([[[1.0, 0.1]]]),
            "fps_idx": np.array([[0, 3, 1]]), "o_auroc": np.array([0.8004])}
    tols = (cmp.Tolerance("patch_probs", kind="abs", limit=1e-4, why="t"),
            cmp.Tolerance("patch_embed", kind="cosine", limit=0.999, why="t"),
            cmp.Tolerance("fps_idx", kind="index", limit=1.0, why="t"),
            cmp.Tolerance("o_auroc", kind="metric", limit=1e-3, why="t"),
            cmp.Tolerance("object_score", kind="abs", limit=1e-4, why="t"))
    res = {r.output: r for r in cmp.compare(ref, test, tols)}
    assert res["patch_probs"].verdict == "PASS" and res["patch_probs"].value == pytest.approx(5e-5)
    assert res["patch_embed"].verdict == "FAIL" and res["patch_embed"].value == pytest.approx(1 / np.sqrt(1.01))
    assert res["fps_idx"].verdict == "FAIL" and res["fps_idx"].value == pytest.approx(2 / 3)
    assert res["o_auroc"].verdict == "PASS"
    assert res["object_score"].verdict == "SKIP" and "reference" in res["object_score"].note
    assert cmp.overall(list(res.values())) == "FAIL"
    mismatch = cmp.check(np.zeros(3), np.zeros(4), cmp.Tolerance("x", kind="abs", limit=1.0, why="t"))
    assert mismatch.verdict == "FAIL" and "shape" in mismatch.note


def test_fp16_tolerances_follow_the_score_scale():
    ref = {"patch_logits": np.array([[-3.0, 0.5, 2.0]]), "global_prob": np.array([0.5])}
    fp32 = {t.output: t for t in cmp.tolerances("fp32", ref)}
    fp16 = {t.output: t for t in cmp.tolerances("fp16", ref)}
    assert fp32["patch_probs"].limit == 1e-4
    # max over the reference logits of sigma'(l) * r * max(|l|, 1)
    lg = ref["patch_logits"][0]
    s = 1 / (1 + np.exp(-lg))
    assert fp16["patch_probs"].limit == pytest.approx(np.max(s * (1 - s) * np.maximum(np.abs(lg), 1)) * cmp.FP16_REL)
    # global prob 0.5 -> slope 0.25, error 2r/T
    assert fp16["global_prob"].limit == pytest.approx(0.25 * 2 * cmp.FP16_REL / 0.07)
    assert fp16["object_score"].limit == pytest.approx(0.5 * fp16["global_prob"].limit + 0.5 * fp16["patch_probs"].limit)
    assert fp16["fps_idx"].limit == 1.0 and all(t.why for t in fp16.values())
    assert fp16["patch_probs"].limit > fp32["patch_probs"].limit


# ---- goals -------------------------------------------------------------------------------------------

def _row(backend, points, e2e, engine, batch=1):
    st = lambda v: {"p50": v, "p90": v * 1.1, "p99": v * 1.2, "mean": v, "min": v * 0.9, "max": v * 1.3, "n": 10}
    return {"backend": backend, "points": points, "batch": batch, "throughput": batch * 1e3 / e2e,
            "peak_rss_mb": 100.0, "stages": {"end_to_end": st(e2e), "engine": st(engine)}}


def test_goals_met_and_missed_with_margins():
    lat = {"results": [_row("ort-cpu", 2048, 20.0, 19.0), _row("torch", 2048, 50.0, 48.0),
                       _row("ort-cpu", 400000, 40.0, 19.0)]}
    ops = [{"op": "fps", "n_points": 2048, "n_groups": 512, "ratio_vs_best": 1.1, "best_library": "a",
            "meets_goal": True, "ratio_vs_best_exact": 1.0},
           {"op": "knn", "n_points": 2048, "n_groups": 512, "ratio_vs_best": 2.0, "best_library": "b",
            "meets_goal": False, "ratio_vs_best_exact": 2.0}]
    goals = {g.name.split(" (")[0]: g for g in evaluate_goals(lat, ops, {"total": 5e9, "gflop": 5.0},
                                                             {"gflops": 500.0})}
    assert goals["ORT CPU vs PyTorch eager"].met and goals["ORT CPU vs PyTorch eager"].value == pytest.approx(2.5)
    assert goals["pre+post share of e2e"].met and goals["pre+post share of e2e"].value == pytest.approx(0.05)
    assert not goals["400k-point scan vs 2048"].met and "over by" in goals["400k-point scan vs 2048"].detail
    assert goals["our CPU FPS vs best library"].met and not goals["our CPU KNN vs best library"].met
    gf = goals["encoder achieved GFLOP/s"]
    assert gf.met is None and gf.value == pytest.approx(5e9 / 0.019 / 1e9 / 500)
    missing = evaluate_goals({"results": []})
    assert all(g.met is None for g in missing) and len(missing) == 6


# ---- FLOPs ----------------------------------------------------------------------------------------

def test_onnx_flops_counts_matmul_conv_gemm(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from btp.benchmarks.flops import matmul_peak, onnx_flops

    B, G, K, C, H = 1, 8, 4, 6, 16
    w_conv = numpy_helper.from_array(np.zeros((H, C, 1), np.float32), "w_conv")
    w_mm = numpy_helper.from_array(np.zeros((H, 5), np.float32), "w_mm")
    w_gemm = numpy_helper.from_array(np.zeros((5, 3), np.float32), "w_gemm")
    shape = numpy_helper.from_array(np.array([-1, C, K], np.int64), "shape")
    shape2 = numpy_helper.from_array(np.array([-1, H], np.int64), "shape2")
    nodes = [
        helper.make_node("Reshape", ["neighborhood", "shape"], ["x"]),  # [B*G*K/K.., C, K] (layout only)
        helper.make_node("Conv", ["x", "w_conv"], ["y"]),  # [B*G, H, K]
        helper.make_node("ReduceMax", ["y"], ["z"], axes=[2], keepdims=0),  # [B*G, H]
        helper.make_node("Reshape", ["z", "shape2"], ["z2"]),
        helper.make_node("MatMul", ["z2", "w_mm"], ["m"]),  # [B*G, 5]
        helper.make_node("Gemm", ["m", "w_gemm"], ["patch_logits"]),  # [B*G, 3]
    ]
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("neighborhood", TensorProto.FLOAT, ["B", G, K, C]),
                     helper.make_tensor_value_info("center", TensorProto.FLOAT, ["B", G, 3])],
        [helper.make_tensor_value_info("patch_logits", TensorProto.FLOAT, None)],
        [w_conv, w_mm, w_gemm, shape, shape2])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    f = onnx_flops(path)
    assert f.by_op["Conv"] == 2 * B * G * H * K * C
    assert f.by_op["MatMul"] == 2 * B * G * H * 5
    assert f.by_op["Gemm"] == 2 * B * G * 5 * 3
    assert f.total == sum(f.by_op.values())
    peak = matmul_peak(size=128, seconds=0.01)
    assert peak.gflops > 0 and peak.gflops == max(peak.by_library.values())


# ---- ops ------------------------------------------------------------------------------------------

def test_ops_rows_schema_and_checks(shapes_root, monkeypatch):
    monkeypatch.setenv("BTP_SHAPES", str(shapes_root))
    from btp.benchmarks.ops import OURS, ops_summary, run_ops

    rows = run_ops((600,), (64,), 8, repeat=1,
                   impls=("fpsample vanilla", "fpsample bucket (kdline)", "pykdtree", "scipy cKDTree",
                          "numpy reference"))
    by = {(r.op, r.impl): r for r in rows}
    assert {op for op, _ in by} == {"fps", "knn"}
    for op in ("fps", "knn"):
        ours = by[(op, OURS)]
        assert ours.exact and ours.same_set == 1.0 and ours.median_ms > 0
        assert by[(op, "numpy reference")].exact
    assert by[("knn", "pykdtree")].same_set == 1.0
    assert 0 < by[("fps", "fpsample bucket (kdline)")].quality  # covering-radius ratio
    summary = ops_summary(rows)
    assert {s["op"] for s in summary} == {"fps", "knn"}
    for s in summary:
        assert s["ratio_vs_best"] == pytest.approx(s["ours_ms"] / s["best_ms"])
        assert s["best_library"] not in (OURS, "numpy reference")
    json.dumps([r.to_dict() for r in rows])  # serialisable


def test_ops_downsample_rows_name_the_products_rule(shapes_root, monkeypatch):
    monkeypatch.setenv("BTP_SHAPES", str(shapes_root))
    from btp.benchmarks.ops import OURS, ops_summary, run_ops

    rows = run_ops((20000,), (64,), 8, repeat=1, impls=("btp exact rule", "btp voxel rule", "fpsample bucket (kdline)"))
    down = {r.impl: r for r in rows if r.op == "downsample"}
    assert set(down) == {OURS, "btp exact rule", "btp voxel rule", "fpsample bucket (kdline)"}
    assert all(r.n_groups == 2048 and r.median_ms > 0 for r in down.values())
    assert down["btp exact rule"].exact and down["btp exact rule"].quality == 1.0
    # above 16384 points the product's auto rule is the voxel rule: the same indices
    assert down[OURS].same_set == down["btp voxel rule"].same_set and down[OURS].quality < 1.5
    summary = {s["op"]: s for s in ops_summary(rows)}
    assert "voxel" in summary["downsample"]["product_runs"] and "fpsample vanilla" in summary["fps"]["product_runs"]
    assert summary["downsample"]["best_library"] == "fpsample bucket (kdline)"  # ours are not libraries


def test_engine_variants_time_parity_and_saved_graphs(tmp_path_factory, tmp_path, shapes_root, monkeypatch):
    monkeypatch.setenv("BTP_SHAPES", str(shapes_root))
    from btp.benchmarks.engines import engines_markdown, run_engines
    from btp.runtime import Pipeline
    from runtime_helpers import real_scan, tiny_export

    model = tiny_export(tmp_path_factory)[0]
    data = run_engines(model, variants=("ort", "ort-fusions", "ort-int8-qdq"), rounds=1, iters=2, warmup=1,
                       save=tmp_path)
    rows = data["variants"]
    assert rows["ort"]["max_abs_patch_probs"] == 0 and rows["ort"]["ratio_to_ort"] == 1.0
    assert rows["ort-fusions"]["max_abs_patch_probs"] <= 1e-4  # same math, fused
    for row in rows.values():
        assert row["median_ms"] > 0 and row["calls"] == 2 and "verdict" in row
    int8 = Pipeline(tmp_path / "ort-int8-qdq.onnx")  # the saved variant keeps the model's metadata
    scan = real_scan(shapes_root, n=3000, seed=3)
    assert np.isfinite(int8(scan).point_scores).all()
    assert "ort-int8-qdq" in engines_markdown(data)
    with pytest.raises(ValueError, match="unknown variant"):
        run_engines(model, variants=("ort", "tvm"), rounds=1, iters=1, warmup=1)


def test_engines_compare_other_models_in_the_same_turns(tmp_path_factory, tmp_path, shapes_root, monkeypatch):
    monkeypatch.setenv("BTP_SHAPES", str(shapes_root))
    from btp.benchmarks.engines import engines_markdown, run_engines
    from btp.config import tiny_config
    from btp.export.onnx import export_onnx, fresh_model
    from runtime_helpers import tiny_export

    model = tiny_export(tmp_path_factory)[0]
    wide = tiny_config()
    wide.mgfem.hidden *= 4  # the same engine inputs, more FLOPs
    export_onnx(fresh_model(wide, seed=1), tmp_path / "wide.onnx", parity_scans=1)
    data = run_engines(model, variants=("ort",), rounds=2, iters=2, warmup=1, compare=(tmp_path / "wide.onnx",))
    row = data["variants"]["model:wide"]
    assert row["calls"] == 4 and row["ratio_to_ort"] > 0 and "max_abs_patch_probs" not in row
    assert "another model" in row["verdict"] and "model:wide" in engines_markdown(data)
    other = tiny_config()
    other.encoder.num_group //= 2
    export_onnx(fresh_model(other, seed=1), tmp_path / "half.onnx", parity_scans=1)
    with pytest.raises(ValueError, match="same inputs"):
        run_engines(model, variants=("ort",), rounds=1, iters=1, warmup=1, compare=(tmp_path / "half.onnx",))


# ---- latency runner on a stand-in pipeline (the narrow contract: call -> Result.timings) ---------------

class _FakePipeline:
    def run_batch(self, scans):
        return [self._one(points) for points in scans]

    def _one(self, points):
        t0 = time.perf_counter()
        np.sort(points, axis=0)
        pre = (time.perf_counter() - t0) * 1e3
        time.sleep(0.001)
        return SimpleNamespace(timings={"fps": pre + 1e-3, "engine": 1.0}, point_scores=np.zeros(len(points)),
                               object_score=0.0)


def _latency_data(results_rows, skipped=()):
    from btp.benchmarks.machine import describe_machine

    return {"machine": describe_machine(), "model": {"path": "model.onnx", "name": "btp-tiny", "size_mb": 0.1},
            "settings": {"backends": ["ort-cpu"], "points": [512], "batches": [1, 2], "warmup_s": 0.0,
                         "duration_s": 0.0, "min_iters": 5, "threads": None, "mesh": "bunny"},
            "results": results_rows, "skipped": list(skipped)}


def test_bench_one_schema_and_reports(tmp_path):
    from btp.benchmarks.latency import LatencyRow, RssSampler, Skipped, bench_one, make_scans

    rows = []
    for batch in (1, 2):
        scans = make_scans(512, batch)
        with RssSampler() as rss:
            stats, iters = bench_one(_FakePipeline(), scans, warmup_s=0.0, duration_s=0.0, min_iters=5)
        assert iters == 5 and set(stats) == {"end_to_end", "fps", "engine"}
        for s in stats.values():
            _ordered(s.to_dict())
        assert stats["engine"].p50 == pytest.approx(1.0)  # the engine call is per batch: counted once
        assert stats["fps"].min >= batch * 1e-3  # per-scan stages are summed over the batch
        rows.append(LatencyRow(backend="ort-cpu", points=512, batch=batch,
                               stages={k: v.to_dict() for k, v in stats.items()},
                               throughput=batch * 1e3 / stats["end_to_end"].mean, peak_rss_mb=rss.peak_mb,
                               rss_before_mb=rss.before_mb, device_memory_mb=None, iterations=iters,
                               timer="perf_counter", precision="fp32", weights="test").to_dict())
    assert rss.peak_mb >= rss.before_mb > 0
    data = _latency_data(rows, [Skipped("trt-fp16", "no NVIDIA GPU on this machine").to_dict()])
    data["goals"] = [g.to_dict() for g in evaluate_goals(data)]
    paths = rep.write_latency(data, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md", ".png"]
    loaded = json.loads(paths[0].read_text())
    assert set(loaded) >= {"machine", "results", "skipped"}
    r0 = loaded["results"][0]
    assert set(r0) >= {"backend", "points", "batch", "stages", "throughput", "peak_rss_mb"}
    assert set(r0["stages"]["end_to_end"]) >= {"p50", "p90", "p99", "mean"}
    md = paths[1].read_text()
    assert "skipped: no NVIDIA GPU" in md and "Where the time goes" in md and "Performance goals" in md
    assert paths[0].name.startswith("latency-cpu-") and loaded["machine"]["cpu_model"]
    table = rep.readme_table(tmp_path)
    assert "generated by `btp bench table`" in table and "| ort-cpu | 512 | 1 |" in table
    assert "trt-fp16 | | | skipped" in table


def test_unavailable_backends_have_reasons():
    from btp.benchmarks.latency import unavailable_reason

    assert "unknown backend" in unavailable_reason("tensorflow")
    assert unavailable_reason("ort-cpu") is None and unavailable_reason("ort-cpu@exact") is None
    assert "unknown raw-scan rule 'fast'" in unavailable_reason("ort-cpu@fast")
    assert unavailable_reason("ort-cpu@auto:3") is None and unavailable_reason("ort-cpu@voxel:12") is None
    assert "integer >= 1" in unavailable_reason("ort-cpu@auto:0")
    assert "applies to the voxel rule" in unavailable_reason("ort-cpu@exact:3")
    from btp.benchmarks.machine import gpus

    if not gpus():
        for name in ("ort-cuda", "trt-fp32", "trt-fp16"):
            assert unavailable_reason(name)


# ---- end to end on a tiny exported model (the real Pipeline, ORT CPU and torch) -------------------------

@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory, shapes_root):
    import os

    os.environ.setdefault("BTP_SHAPES", str(shapes_root))
    from btp.export.onnx import export_onnx, load_model

    path = tmp_path_factory.mktemp("model") / "tiny.onnx"
    export_onnx(load_model("tiny"), path, patch_embed=True, parity_scans=2)
    return path


def _write_anomaly_shapenet(root, shapes_root, n_points=1500):
    """Two classes, one normal and two 'anomalous' scans each (labels on a patch of the surface)."""
    from btp.benchmarks.data import sample_cloud
    from btp.io import write_point_cloud

    for c, mesh in enumerate(("cgal__stanford_bunny.ply", "cgal__cactus.ply")):
        cls = mesh.split("__")[1].removesuffix(".ply")
        (root / cls / "test").mkdir(parents=True)
        (root / cls / "GT").mkdir()
        for i, stem in enumerate((f"{cls}_positive0", f"{cls}_bulge0", f"{cls}_dent0")):
            pts = sample_cloud(n_points, mesh=str(shapes_root / mesh), seed=10 * c + i)
            write_point_cloud(root / cls / "test" / f"{stem}.pcd", pts)
            if "positive" not in stem:
                d = np.linalg.norm(pts - pts[7 * i], axis=1)
                labels = (d <= np.quantile(d, 0.05)).astype(np.int64)
                np.savetxt(root / cls / "GT" / f"{stem}.txt", np.column_stack([pts, labels]), fmt="%.7f %.7f %.7f %d")


def test_latency_rows_can_set_the_voxel_cells_per_sample(tiny_onnx):
    """``ort-cpu@auto:R``: the row's pipeline runs the voxel rule with R cells per sample; the
    model's own value stays with the plain row."""
    from btp.benchmarks.data import sample_cloud
    from btp.benchmarks.latency import make_pipeline

    scan = sample_cloud(20000, seed=0)  # the bunny mesh of the shared shapes

    plain, _ = make_pipeline("ort-cpu", tiny_onnx)
    coarse, _ = make_pipeline("ort-cpu@auto:2", tiny_onnx)
    assert coarse.cfg.preprocess.voxel_reps == 2 and plain.cfg.preprocess.voxel_reps != 2
    got = {name: pipe(scan) for name, pipe in (("plain", plain), ("coarse", coarse))}
    assert not np.array_equal(got["plain"].sampled_idx, got["coarse"].sampled_idx)
    assert got["coarse"].point_scores.shape == (len(scan),)


def test_latency_command_end_to_end(tiny_onnx, tmp_path):
    from typer.testing import CliRunner

    from btp.cli.bench import app

    out = tmp_path / "res"
    res = CliRunner().invoke(app, ["latency", str(tiny_onnx), "--backends", "torch,ort-cpu,ort-cpu@exact,trt-fp16",
                                   "--points", "600", "--batch", "1,2", "--warmup", "0", "--duration", "0",
                                   "--min-iters", "3", "--out", str(out), "--json", str(tmp_path / "lat.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "lat.json").read_text())
    assert {(r["backend"], r["points"], r["batch"]) for r in data["results"]} == {
        (b, n, k) for b in ("torch", "ort-cpu", "ort-cpu@exact") for n in (600,) for k in (1, 2)}
    for r in data["results"]:
        assert r["throughput"] > 0 and r["peak_rss_mb"] > 0 and r["iterations"] == 3
        for stage in ("end_to_end", "engine", "fps", "group", "downsample", "propagate", "interpolate"):
            _ordered(r["stages"][stage])
    torch_row = next(r for r in data["results"] if r["backend"] == "torch")
    assert "same weights as model.onnx" in torch_row["weights"]
    if unavailable := [s for s in data["skipped"] if s["backend"] == "trt-fp16"]:
        assert unavailable[0]["reason"]
    assert data["flops"]["total"] > 0 and data["matmul_peak"]["gflops"] > 0
    assert {(r["backend"], r["threads"]) for r in data["thread_sweep"]} == {
        (b, t) for b in ("torch", "ort-cpu") for t in (1, 2)}
    assert all(r["engine_ms"] > 0 for r in data["thread_sweep"])
    assert len(data["goals"]) == 6 and all(g["verdict"] == "n/a" for g in data["goals"][:3])  # no 2048 row
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".md", ".png"]
    assert "skipped" in next(out.glob("*.md")).read_text()


def test_latency_times_a_precision_variant_beside_fp32(tiny_onnx, tmp_path, shapes_root):
    """--variant int8.onnx: rows named by the variant's precision and file, on its own backend."""
    from typer.testing import CliRunner

    from btp.cli.bench import app
    from btp.export import precision as P
    from btp.runtime.metadata import read_model_meta

    cfg = read_model_meta(tiny_onnx).config
    feeds = P.engine_feeds(P.calibration_scans(shapes_root, cfg, 2, 2)[0], cfg)
    graph = P.Int8Builder(tiny_onnx, feeds, P.Int8Settings(), tmp_path).build(tmp_path / "q.onnx")
    variant = P.write_variant(tiny_onnx, graph, tmp_path / "int8.onnx", P.precision_record("int8", forced=True))
    res = CliRunner().invoke(app, ["latency", str(tiny_onnx), "--backends", "ort-cpu", "--variant", str(variant),
                                   "--points", "600", "--batch", "1", "--warmup", "0", "--duration", "0",
                                   "--min-iters", "3", "--no-sweep", "--out", str(tmp_path / "res"),
                                   "--json", str(tmp_path / "lat.json")])
    assert res.exit_code == 0, res.output
    rows = {r["backend"]: r for r in json.loads((tmp_path / "lat.json").read_text())["results"]}
    assert set(rows) == {"ort-cpu", "int8:int8.onnx"}
    assert rows["int8:int8.onnx"]["precision"] == "int8" and rows["ort-cpu"]["precision"] == "fp32"
    assert "backend ort-cpu" in rows["int8:int8.onnx"]["weights"]


def test_parity_command_end_to_end(tiny_onnx, tmp_path, shapes_root):
    from typer.testing import CliRunner

    from btp.cli.bench import app

    _write_anomaly_shapenet(tmp_path / "data", shapes_root)
    res = CliRunner().invoke(app, ["parity", str(tiny_onnx), "--data", str(tmp_path / "data"),
                                   "--backends", "ort-cpu,trt-fp16,torch-fp16", "--out", str(tmp_path / "res"),
                                   "--json", str(tmp_path / "par.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "par.json").read_text())
    assert data["n_samples"] == 6 and data["reference"] == "torch"
    ort = next(b for b in data["backends"] if b["backend"] == "ort-cpu")
    assert ort["verdict"] == "PASS"
    checks = {c["output"]: c for c in ort["checks"]}
    assert set(checks) == {"patch_probs", "global_prob", "object_score", "point_scores", "patch_embed", "fps_idx",
                           "knn_idx", "o_auroc", "p_auroc"}
    assert checks["point_scores"]["n"] == 6 * 1500 and checks["fps_idx"]["value"] == 1.0
    assert all(c["why"] and c["limit"] is not None for c in ort["checks"])
    half = next(b for b in data["backends"] if b["backend"] == "torch-fp16")
    assert half["precision"] == "fp16" and half["verdict"] in ("PASS", "FAIL")
    half_probs = next(c for c in half["checks"] if c["output"] == "patch_probs")
    assert half_probs["limit"] > checks["patch_probs"]["limit"] and "r=16u" in half_probs["why"]
    md = next((tmp_path / "res").glob("parity-*.md")).read_text()
    assert "PASS" in md and "tolerance" in md


def test_parity_rechecks_fp32_misses_against_float64(shapes_root):
    """btp-bench parity applies the export's float64 rule to FP32 engine outputs, and the raw-scan
    point scores (means of patch_point_probs) may then differ by what they average, no more."""
    torch = pytest.importorskip("torch")
    from btp.benchmarks.parity import _recheck_float64
    from btp.benchmarks.torch_backend import TorchBackend
    from btp.config import tiny_config
    from btp.export.onnx import torch_outputs
    from btp.export.samples import engine_inputs
    from btp.model import BTPModel
    from runtime_helpers import REAL_SHAPES, real_scan

    cfg = tiny_config()
    cfg.gfcm.frame, cfg.gfcm.context_k, cfg.gfcm.point_dim = "local", 4, 8
    torch.manual_seed(3)
    model = BTPModel.with_default_text_encoder(cfg.validate())
    model.freeze_text(drop_encoder=True)
    model.eval()
    nb, ct = engine_inputs([real_scan(shapes_root, REAL_SHAPES[0], 2000)], cfg)
    pre = [{"neighborhood": nb, "center": ct}]
    exact = torch_outputs(copy.deepcopy(model).double(), nb.astype(np.float64), ct.astype(np.float64))
    point = np.linspace(0.1, 0.9, 500)

    def verdicts(ref_off, got_off, point_off, engine=None):
        ref = {"patch_point_probs": exact["patch_point_probs"] + ref_off, "point_scores": point}
        got = {"patch_point_probs": exact["patch_point_probs"] - got_off, "point_scores": point + point_off}
        tols = [t for t in cmp.tolerances("fp32", ref) if t.output in ref]
        checks = cmp.compare(ref, got, tols)
        assert all(c.passed is False for c in checks)  # every output misses 1e-4 against PyTorch FP32
        out = _recheck_float64(engine or TorchBackend(model), pre, ref, got, checks)
        return {c.output: c for c in out}

    ok = verdicts(4e-4, 3e-4, 6e-4)  # ORT nearer float64 than PyTorch FP32; means within the 7e-4 they average
    assert ok["patch_point_probs"].passed and "float64" in ok["patch_point_probs"].note
    assert ok["point_scores"].passed and ok["point_scores"].limit == pytest.approx(7e-4, rel=1e-2)
    wide = verdicts(4e-4, 3e-4, 9e-4)  # means farther apart than anything they average
    assert wide["patch_point_probs"].passed and wide["point_scores"].passed is False
    far = verdicts(1e-4 / 2, 3e-4, 6e-4)  # PyTorch FP32 near exact: ORT's miss stands, and so do the means
    assert far["patch_point_probs"].passed is False and far["point_scores"].passed is False
    half = verdicts(4e-4, 3e-4, 6e-4, engine=TorchBackend(copy.deepcopy(model), half=True))
    assert half["patch_point_probs"].passed is False  # an FP16 reference is no FP32 reference


def test_metric_tolerance_counts_swappable_pairs():
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.50, 0.90, 0.5005, 0.10])
    # pairs (pos, neg): (0.50, 0.5005) within 2 * 1e-3, the other three are not
    assert cmp.auroc_swap_bound(labels, scores, 1e-3) == pytest.approx(1 / 4)
    assert cmp.auroc_swap_bound(labels, scores, 1e-5) == 0.0
    ref = {"object_score": scores, "patch_probs": np.array([[0.5, 0.6]]), "global_prob": np.array([0.5])}
    tol = {t.output: t for t in cmp.tolerances("fp16", ref, object_labels=labels)}
    assert tol["o_auroc"].limit == pytest.approx(cmp.auroc_swap_bound(labels, scores, tol["object_score"].limit))
    assert "pairs" in tol["o_auroc"].why
    assert tol["p_auroc"].limit == 5e-3  # no point labels given: the floor
    tied = {"object_score": np.full(4, 0.5), "patch_probs": np.array([[0.5]]), "global_prob": np.array([0.5])}
    vacuous = {t.output: t for t in cmp.tolerances("fp16", tied, object_labels=labels)}["o_auroc"]
    assert not vacuous.informative
    res = cmp.check(np.array([0.7]), np.array([0.6]), vacuous)
    assert res.verdict == "SKIP" and "not informative" in res.note


def test_fp16_mixed_emulation_keeps_the_keep_list_in_fp32(tiny_onnx, shapes_root):
    """torch-fp16-mixed: LayerNorm and MGFEM parameters stay float32, the rest float16, and its
    outputs are no further from FP32 than the all-FP16 emulation's on real engine inputs."""
    torch = pytest.importorskip("torch")
    from btp.benchmarks.torch_backend import TorchBackend
    from btp.config import tiny_config
    from model_batches import real_batch

    fp32 = TorchBackend.for_onnx(tiny_onnx)
    half = TorchBackend.for_onnx(tiny_onnx, half=True)
    mixed = TorchBackend.for_onnx(tiny_onnx, half=True, mixed=True)
    assert mixed.name == "torch-fp16-mixed"
    norms = [m for m in mixed.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    assert all(p.dtype == torch.float32 for p in mixed.model.mgfem.parameters())
    assert mixed.model.point_encoder.blocks.blocks[0].attn.qkv.weight.dtype == torch.float16
    batch = real_batch(shapes_root, tiny_config(), batch_size=2)
    nb, ct = batch["neighborhood"].numpy(), batch["center"].numpy()
    ref = fp32.run(nb, ct)["patch_logits"]
    err_half = np.abs(half.run(nb, ct)["patch_logits"] - ref).mean()
    got = mixed.run(nb, ct)["patch_logits"]
    err_mixed = np.abs(got - ref).mean()
    assert 0 < err_mixed <= 1.05 * err_half and np.abs(got - ref).max() < 1e-2


def test_a_second_report_of_the_day_gets_its_own_name_and_is_the_newest(tmp_path):
    from btp.benchmarks import report as rep

    machine = {"cpu_model": "AMD EPYC", "cores": 2, "gpus": [], "date_utc": "2026-12-01T10:00:00Z"}
    first = rep.report_base(tmp_path, "latency", machine)
    rep.write_json(first.with_suffix(".json"), {"run": 1})
    second = rep.report_base(tmp_path, "latency", machine)
    assert second.name == first.name + "-2"
    rep.write_json(second.with_suffix(".json"), {"run": 2})
    assert rep.report_base(tmp_path, "latency", machine).name == first.name + "-3"
    assert rep.latest("latency", tmp_path) == second.with_suffix(".json")
    import os

    os.utime(first.with_suffix(".json"))  # a newer mtime does not outrank a later run of the day
    assert rep.latest("latency", tmp_path) == second.with_suffix(".json")


def test_btp_bench_names_a_missing_shapes_folder_in_one_line(tmp_path, monkeypatch, capsys):
    """Without a shapes folder (no BTP_SHAPES, none beside the package) a bench that samples its
    scans from the shared meshes stops with the fix named, exit 2, no traceback."""
    import sys

    from btp.cli import bench_main
    from btp.io import locations

    monkeypatch.delenv("BTP_SHAPES", raising=False)
    monkeypatch.setattr(locations, "shapes_dir", lambda path=None, flag="": (_ for _ in ()).throw(
        locations.LocationError(f"no shapes folder: pass {flag} DIR or set BTP_SHAPES=DIR")))
    monkeypatch.setattr(sys, "argv", ["btp-bench", "reference", "--model", str(tmp_path / "m.onnx")])
    with pytest.raises(SystemExit) as exc:
        bench_main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("btp-bench: no shapes folder") and "Traceback" not in err
