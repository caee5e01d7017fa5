"""`btp-bench engines`: engine variants of one model.onnx, timed in the same run, with parity.

Variants (each on the CPU, batch 1, the machine's default thread count):

- ``ort``: the exported graph in an ONNX Runtime session with graph optimisation level ALL and
  otherwise default options (btp-run's backend also turns idle-worker spinning off: see
  benchmarks/results/cpu-findings-2026-12-01.md).
- ``ort-fusions``: the graph after ``onnxruntime.transformers.optimizer`` (model type ``bert``,
  the encoder's heads and width): Attention / LayerNorm / GELU fusions where its patterns match;
  the fused op counts are reported.
- ``ort-int8-qdq``: the INT8 variant of ``btp-export --precision int8`` (btp.export.precision:
  static QDQ, per-channel int8 weights, uint8 activations, MatMul / Conv / Gemm, the committed
  recipe's layer groups kept in FP32), calibrated (MinMax) on engine inputs of real scans of
  *training-split* meshes.
- ``openvino`` / ``openvino-bf16``: the runtime's OpenVINO backends (btp.runtime.backends.openvino:
  the same model.onnx on OpenVINO's CPU plugin, float32 / bfloat16 inside), where the optional
  ``openvino`` package is installed.

- ``--compare OTHER.onnx`` (repeatable): other models with the same engine inputs (G, K, C), as
  exported, in ORT like ``ort``: how their engine times compare in the same run (a size/accuracy
  table's cost column). Parity does not apply to them.

Timing: the variants take turns, ``rounds`` times ``iters`` calls each on the same inputs, after
a warm-up; the median of all calls is reported with its ratio to ``ort``. Parity: on engine
inputs of other training-split meshes (not the calibration ones), max |difference| of
``patch_probs`` and ``object_score`` against ``ort``. A variant is adoptable only when it is faster
than ``ort`` in this run; whether its accuracy holds is the gate of ``btp-export --precision``
(held-out O-/P-AUROC within 0.5 point, OK/NG decisions agreeing on 99 % of the scans).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

VARIANTS = ("ort", "ort-fusions", "ort-int8-qdq", "openvino", "openvino-bf16")
# training-split meshes of the shared shapes (btp.train.split): calibration and parity scans
CALIBRATION_MESHES = ("cgal__stanford_bunny.ply", "cgal__pinion.ply", "trimesh__featuretype_block.ply")
PARITY_MESHES = ("cgal__bull.ply", "cgal__camel.ply", "cgal__blobby.ply")
# a variant "holds parity" when its patch probabilities and object score stay this close to ort's
PARITY_TOLERANCE = 0.02


def _inputs(meshes, per_mesh: int, cfg, seed: int) -> list[dict[str, np.ndarray]]:
    """Batch-1 engine feeds of ``per_mesh`` scans of 4N points of each mesh (the runtime's chain,
    its default rule)."""
    from btp.benchmarks.data import sample_cloud
    from btp.export.samples import engine_inputs

    feeds = []
    for i, mesh in enumerate(meshes):
        for j in range(per_mesh):
            scan = sample_cloud(4 * cfg.preprocess.num_points, mesh=mesh, seed=seed + 100 * i + j)
            neighborhood, center = engine_inputs([scan], cfg)
            feeds.append({"neighborhood": neighborhood, "center": center})
    return feeds


def _ort_runner(path: Path) -> Callable[[dict], dict]:
    from btp.export.precision import ort_runner

    return ort_runner(path)


def _fused(path: Path, out: Path, cfg) -> tuple[Path, dict]:
    from onnxruntime.transformers.optimizer import optimize_model

    enc = cfg.encoder
    model = optimize_model(str(path), model_type="bert", num_heads=enc.num_heads, hidden_size=enc.trans_dim,
                           opt_level=1)
    counts = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(out))
    return out, counts


def _quantized(path: Path, out: Path, feeds) -> tuple[Path, list[str]]:
    """The INT8 variant ``btp-export --precision int8`` makes (btp.export.precision): the committed
    recipe's groups kept in FP32 for known weights, else every group in INT8 -> (path, kept groups)."""
    from btp.export.precision import Int8Builder, Int8Settings, committed_keep
    from btp.runtime.metadata import read_model_meta

    keep = list(committed_keep(read_model_meta(path)) or ())
    Int8Builder(path, feeds, Int8Settings(), out.parent).build(out, keep=keep)
    return out, keep


def _backend_runner(name: str, path: Path) -> Callable[[dict], dict]:
    """A btp.runtime backend (e.g. openvino) as a runner of engine feeds."""
    from btp.runtime.backends import make_backend
    from btp.runtime.metadata import read_model_meta

    backend = make_backend(name, path, read_model_meta(path))
    return lambda feed: backend.run(feed["neighborhood"], feed["center"])


GEMM_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "Conv", "FusedConv")


def engine_profile(model: Path, feed: dict, calls: int = 20) -> dict:
    """ONNX Runtime's own profile of ``calls`` runs of ``model`` (as btp-run runs it): ms per call
    by op type, and how much of the engine time the GEMM-class ops (MatMul / Gemm / Conv and their
    fused forms) take - the part that can run near the matmul peak."""
    import json

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="btp-profile-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        for _ in range(5):
            session.run(None, feed)
        t0 = time.perf_counter()
        for _ in range(calls):
            session.run(None, feed)
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1e3
    n_runs = max(1, len(runs))
    by_op = {op: ms / n_runs for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])}
    kernels = sum(by_op.values())
    gemm = sum(ms for op, ms in by_op.items() if op in GEMM_OPS)
    return {"calls_profiled": n_runs, "wall_ms_per_call": wall_ms, "kernel_ms_per_call": kernels,
            "gemm_ms_per_call": gemm, "ms_per_call_by_op": by_op}


def _keep_metadata(source: Path, variant: Path, dest: Path) -> Path:
    """``variant`` saved as ``dest`` with ``source``'s btp metadata (so btp-run / btp eval take it)."""
    import onnx

    original = onnx.load(str(source), load_external_data=False)
    graph = onnx.load(str(variant))
    del graph.metadata_props[:]
    graph.metadata_props.extend(original.metadata_props)
    onnx.save(graph, str(dest))
    return dest


def run_engines(model, *, variants=VARIANTS, rounds: int = 7, iters: int = 10, warmup: int = 5,
                save: Path | None = None, progress: Callable[[str], None] | None = None,
                compare: tuple = ()) -> dict:
    """Engine variants of one model on one feed, taking turns: build each variant, time them,
    check their outputs against ``ort``, profile ``ort``, give each a verdict (the accuracy gate of
    ``btp-export --precision`` decides whether a variant beyond the raw-output tolerance is kept).
    ``save``: also write the ORT variants' graphs there (``<variant>.onnx``, with the model's
    metadata), e.g. for ``btp eval --model`` on a variant that is faster. ``compare``: other
    models (same engine inputs) timed in the same turns."""
    from btp.benchmarks.machine import describe_machine, package_version
    from btp.runtime.metadata import read_model_meta

    say = progress or (lambda _msg: None)
    model = Path(model)
    cfg = read_model_meta(model).config
    if save:
        Path(save).mkdir(parents=True, exist_ok=True)
    calibration = _inputs(CALIBRATION_MESHES, 8, cfg, seed=0)
    check = _inputs(PARITY_MESHES, 4, cfg, seed=1000)
    with tempfile.TemporaryDirectory(prefix="btp-engines-") as tmp:
        runners, rows = _variants(model, cfg, variants, Path(tmp), calibration, save, say)
        others = _other_models(model, cfg, compare)
        for name, (run, row) in others.items():
            runners[name], rows[name] = run, row
        times = _take_turns(runners, check[0], rounds=rounds, iters=iters, warmup=warmup, say=say)
        for name, row in rows.items():
            if name in times:
                row.update(median_ms=statistics.median(times[name]), calls=len(times[name]))
        if "ort" in runners:
            _parity(runners, rows, check, skip=set(others))
    profile = _ort_profile(model, check[0], rows["ort"]["median_ms"], say) if "ort" in runners else None
    _verdicts(rows, others=set(others))
    return {"machine": describe_machine(), "model": str(model), "name": cfg.name, "rounds": rounds, "iters": iters,
            "warmup": warmup, "parity_scans": f"{len(check)} scans of {', '.join(PARITY_MESHES)}",
            "parity_tolerance": PARITY_TOLERANCE, "onnxruntime": package_version("onnxruntime"), "variants": rows,
            "profile": profile}


def _variants(model: Path, cfg, variants, tmp: Path, calibration, save, say) -> tuple[dict, dict]:
    """-> ({variant: run(feed) -> outputs}, {variant: its report row}); a variant this machine
    cannot build gets a row that says why, and no runner."""
    from btp.benchmarks.machine import package_version
    from btp.runtime.backends import BackendError

    runners: dict[str, Callable] = {}
    rows: dict[str, dict] = {}
    for name in variants:
        try:
            if name == "ort":
                runners[name], rows[name] = _ort_runner(model), {"graph": "model.onnx as exported"}
            elif name == "ort-fusions":
                path, counts = _fused(model, tmp / "fused.onnx", cfg)
                runners[name], rows[name] = _ort_runner(path), {"fused_ops": counts}
                if save:
                    _keep_metadata(model, path, Path(save) / f"{name}.onnx")
            elif name == "ort-int8-qdq":
                path, kept = _quantized(model, tmp / "int8.onnx", calibration)
                runners[name] = _ort_runner(path)
                rows[name] = {"calibration": f"{len(calibration)} scans of {', '.join(CALIBRATION_MESHES)}",
                              "size_mb": round(path.stat().st_size / 1e6, 2),
                              "kept_fp32": ", ".join(kept) or "none (no committed recipe for these weights)"}
                if save:
                    _keep_metadata(model, path, Path(save) / f"{name}.onnx")
            elif name in ("openvino", "openvino-bf16"):
                runners[name] = _backend_runner(name, model)
                rows[name] = {"openvino": f"{package_version('openvino')}, {'f32' if name == 'openvino' else 'bf16'}"}
            else:
                raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
            say(f"{name}: ready")
        except (ImportError, BackendError) as err:
            rows[name] = {"skipped": f"{type(err).__name__}: {err}"}
            say(f"{name}: skipped ({err})")
    return runners, rows


def _other_models(model: Path, cfg, compare) -> dict[str, tuple[Callable, dict]]:
    """``{"model:<stem>": (ORT runner, row)}`` for each model of ``compare``; ValueError for one whose
    engine inputs differ from ``model``'s (they could not take turns on one feed)."""
    from btp.benchmarks.flops import onnx_flops
    from btp.runtime.metadata import read_model_meta

    others = {}
    for other in map(Path, compare):
        o_cfg = read_model_meta(other).config
        mine, theirs = ((c.encoder.num_group, c.encoder.group_size, c.encoder.in_channels) for c in (cfg, o_cfg))
        if mine != theirs:
            raise ValueError(f"{other}: engine inputs (G, K, C) = {theirs}, {model.name} has {mine}: "
                             "only models with the same inputs can take turns on one feed")
        others[f"model:{other.stem}"] = (_ort_runner(other), {
            "graph": f"another model: {other} ({o_cfg.name}, {onnx_flops(other).total / 1e9:.2f} GFLOP), ORT as `ort`"})
    return others


def _take_turns(runners: dict[str, Callable], feed: dict, *, rounds: int, iters: int, warmup: int,
                say) -> dict[str, list[float]]:
    """``warmup`` calls each, then ``rounds`` rounds in which every runner makes ``iters`` calls in
    turn (so a machine that slows down slows them all) -> {name: ms per call}."""
    for run in runners.values():
        for _ in range(warmup):
            run(feed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name, run in runners.items():
            for _ in range(iters):
                t0 = time.perf_counter()
                run(feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
        say(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {statistics.median(v[-iters:]):.1f} ms"
                                                    for n, v in times.items()))
    return times


def _parity(runners: dict[str, Callable], rows: dict[str, dict], check: list[dict], skip: set[str]) -> None:
    """Each variant's largest |difference| from ``ort`` on the parity scans, into its row."""
    reference = [runners["ort"](f) for f in check]
    for name, run in runners.items():
        if name in skip:
            continue
        got = [run(f) for f in check]
        for key in ("patch_probs", "object_score"):
            rows[name][f"max_abs_{key}"] = float(max(np.abs(g[key] - r[key]).max() for g, r in zip(got, reference)))


def _ort_profile(model: Path, feed: dict, engine_ms: float, say) -> dict:
    """``engine_profile`` of the ``ort`` engine with its FLOPs and the GFLOP/s it reaches."""
    from btp.benchmarks.flops import matmul_peak, onnx_flops

    say("profiling ort")
    profile = engine_profile(model, feed)
    flops = onnx_flops(model).total
    profile.update({"gflop": flops / 1e9, "matmul_peak_gflops": matmul_peak().gflops,
                    "achieved_gflops_engine": flops / 1e6 / engine_ms,
                    "achieved_gflops_gemm_ops": flops / 1e6 / profile["gemm_ms_per_call"]})
    return profile


def _verdicts(rows: dict[str, dict], others: set[str]) -> None:
    """Each timed row's ratio to ``ort`` and verdict: faster and within tolerance, faster beyond
    it (the accuracy gate decides), or not faster."""
    base = rows.get("ort", {}).get("median_ms")
    for name, row in rows.items():
        if "median_ms" not in row or base is None:
            continue
        row["ratio_to_ort"] = row["median_ms"] / base
        if name in others:
            row["verdict"] = "another model: engine time only"
            continue
        row["parity"] = max(row["max_abs_patch_probs"], row["max_abs_object_score"]) <= PARITY_TOLERANCE
        faster = row["median_ms"] < base
        row["verdict"] = ("baseline" if name == "ort" else
                          "rejected: not faster" if not faster else
                          "faster, outputs within tolerance: the accuracy gate decides" if row["parity"] else
                          "faster, outputs beyond tolerance: the accuracy gate decides (btp-export --precision "
                          "int8|bf16 --gate-data SETS)")


def engines_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    lines = ["# Engine variants of one model, same run", "",
             f"- Machine: {machine_line(data['machine'])}", f"- Date (UTC): {data['machine']['date_utc']}",
             f"- Model: `{data['model']}` ({data['name']}); onnxruntime {data['onnxruntime']}; batch 1, default "
             "threads.",
             f"- Timing: the variants take turns, {data['rounds']} rounds x {data['iters']} calls each after "
             f"{data['warmup']} warm-up calls; median of all calls. Parity: {data['parity_scans']}, max |diff| "
             f"against `ort` (tolerance {data['parity_tolerance']}).",
             "- Run: `btp-bench engines MODEL` (`--compare OTHER.onnx`: other models' ORT engine times in the same "
             "turns)", "",
             "| variant | engine p50 ms | vs ort | max abs diff patch_probs | max abs diff object_score | verdict "
             "| notes |",
             "|---|---|---|---|---|---|---|"]
    for name, row in data["variants"].items():
        if "skipped" in row:
            lines.append(f"| {name} | - | - | - | - | skipped | {row['skipped']} |")
            continue
        notes = "; ".join(f"{k}: {v}" for k, v in row.items() if k in ("graph", "fused_ops", "calibration", "size_mb",
                                                                       "kept_fp32", "openvino"))
        diffs = " | ".join(f"{row[k]:.2g}" if k in row else "-"
                           for k in ("max_abs_patch_probs", "max_abs_object_score"))
        lines.append(f"| {name} | {row['median_ms']:.2f} | {row.get('ratio_to_ort', float('nan')):.2f}x | "
                     f"{diffs} | {row.get('verdict', '')} | {notes} |")
    prof = data.get("profile")
    if prof:
        peak = prof["matmul_peak_gflops"]
        share = prof["gemm_ms_per_call"] / prof["kernel_ms_per_call"]
        lines += ["", "## Where the engine time goes (ONNX Runtime's profile of `ort`, batch 1)", "",
                  f"- {prof['gflop']:.2f} GFLOP per call (MatMul/Gemm/Conv counted from the graph); the float32 "
                  f"matmul peak measured in this run: {peak:.0f} GFLOP/s.",
                  f"- Whole engine: {prof['achieved_gflops_engine']:.0f} GFLOP/s = "
                  f"{100 * prof['achieved_gflops_engine'] / peak:.0f}% of the peak.",
                  f"- The GEMM-class ops ({', '.join(GEMM_OPS)}) take {prof['gemm_ms_per_call']:.2f} of "
                  f"{prof['kernel_ms_per_call']:.2f} kernel ms per call ({100 * share:.0f}%) and run at "
                  f"{prof['achieved_gflops_gemm_ops']:.0f} GFLOP/s = "
                  f"{100 * prof['achieved_gflops_gemm_ops'] / peak:.0f}% of the peak; the other "
                  f"{100 * (1 - share):.0f}% of the kernel time is memory-bound work without FLOPs in the count "
                  "(below), which caps the whole engine's share of the peak.", "",
                  "| op type | ms per call | share of kernel time |", "|---|---|---|"]
        for op, ms in prof["ms_per_call_by_op"].items():
            if ms >= 0.05:
                lines.append(f"| {op} | {ms:.2f} | {100 * ms / prof['kernel_ms_per_call']:.1f}% |")
    return "\n".join(lines) + "\n"
