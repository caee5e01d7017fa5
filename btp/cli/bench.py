"""`btp bench` / `btp-bench`: latency, parity, ops, table (owned by btp.benchmarks).

Heavy imports happen inside the commands. Reports go to benchmarks/results/ (or --out), named
``<kind>-<machine>-<date>.{md,json,png}``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(name="btp-bench", help="Latency and accuracy-parity reports.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x.replace("_", "").replace("k", "000")) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _match_openmp(threads: int | None) -> None:
    """--threads N also caps the OpenMP libraries (pykdtree in kNN/interpolation) at N, unless
    OMP_NUM_THREADS is already set: libgomp reads it once, when first loaded (later in this
    process). Recorded in the report's machine header (thread_env)."""
    import os

    if threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _print_paths(paths) -> None:
    for p in paths:
        if p:
            typer.echo(f"wrote {p}")


def _write_report(kind: str, data: dict, markdown: str, out: Path | None, machine: dict | None = None) -> None:
    """``<out or benchmarks/results>/<kind>-<machine>-<date>[-2...].json|md``, and their paths printed."""
    from btp.benchmarks import report as rep

    base = rep.report_base(Path(out or rep.RESULTS_DIR), kind, machine or data["machine"])
    _print_paths([rep.write_json(base.with_suffix(".json"), data), rep.write_text(base.with_suffix(".md"), markdown)])


def ops_report(latency_data: dict) -> dict:
    """The ops report of a `latency --ops` run, from its rows (same machine header, same run)."""
    from btp.benchmarks.ops import DEFAULT_GROUPS, DEFAULT_K, DEFAULT_POINTS

    return {"machine": latency_data["machine"],
            "settings": {"points": list(DEFAULT_POINTS), "groups": list(DEFAULT_GROUPS), "k": DEFAULT_K, "repeat": 7,
                         "threads": latency_data["settings"]["threads"], "run": "btp bench latency --ops"},
            "rows": latency_data["ops_rows"], "summary": latency_data["ops_summary"]}


@app.command()
def latency(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx (from btp-export)"),
    backends: str = typer.Option("torch,ort-cpu,ort-cuda,trt-fp32,trt-fp16", help="comma-separated backends; "
                                 "unavailable ones are reported as skipped with the reason; BACKEND@RULE also sets "
                                 "the raw-scan rule (e.g. ort-cpu@exact next to ort-cpu, whose rule is auto), "
                                 "BACKEND@RULE:R also the voxel rule's cells per sample (e.g. ort-cpu@auto:3; auto is the voxel "
                                 "rule above 8N points only for a model sampling in canonical order)"),
    points: str = typer.Option("2048,40000,400000", help="raw-scan sizes (points)"),
    batch: str = typer.Option("1,4", help="batch sizes"),
    warmup: float = typer.Option(1.0, help="warm-up seconds per row (not recorded)"),
    duration: float = typer.Option(5.0, help="timed seconds per row (at least --min-iters calls)"),
    min_iters: int = typer.Option(10, help="minimum timed calls per row"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads for ORT and torch, and OMP_NUM_THREADS for "
                                          "OpenMP libraries unless set (default: one per physical core)"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint for the torch row (default: from the ONNX "
                                              "provenance / beside the model / $BTP_MODELS / the package's "
                                              "own weights)"),
    ops: bool = typer.Option(False, "--ops", help="also run the FPS/kNN ops benchmark in the same run, so the "
                             "report shows every goal"),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="engine-only 1- vs 2-thread medians per CPU "
                               "backend in the same run"),
    variant: List[Path] = typer.Option([], "--variant", help="a reduced-precision file of the same model "
                                       "(`btp-export --precision int8|bf16`), timed in the same run on its "
                                       "precision's backend; repeat for several"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write the JSON here"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """End-to-end and per-stage latency per backend (p50/p90/p99/mean, throughput, peak RSS)."""
    from btp.benchmarks import report as rep
    from btp.benchmarks.flops import matmul_peak, onnx_flops
    from btp.benchmarks.goals import evaluate_goals
    from btp.benchmarks.latency import run_latency

    _match_openmp(threads)
    result = run_latency(model, backends=_names(backends), points=_ints(points, "--points"),
                         batches=_ints(batch, "--batch"), warmup_s=warmup, duration_s=duration,
                         min_iters=min_iters, threads=threads, checkpoint=checkpoint, variants=variant,
                         progress=_say)
    data = result.to_dict()
    _say("counting encoder FLOPs and measuring the matmul peak")
    data["flops"] = onnx_flops(model).to_dict()
    data["matmul_peak"] = matmul_peak(threads=threads).to_dict()
    if sweep:
        from btp.benchmarks.latency import engine_thread_sweep

        _say("engine-only thread sweep (1 and 2 intra-op threads)")
        data["thread_sweep"] = engine_thread_sweep(model, backends=[b for b in ("ort-cpu", "torch")
                                                                      if b in _names(backends)],
                                                   checkpoint=checkpoint)
    if ops:
        from btp.benchmarks.ops import ops_summary, run_ops

        rows = run_ops(threads=threads, progress=_say)
        data["ops_rows"] = [r.to_dict() for r in rows]
        data["ops_summary"] = ops_summary(rows)
        ops_paths = rep.write_ops(ops_report(data), out)  # the same rows as their own report
    data["goals"] = [g.to_dict() for g in evaluate_goals(data, data.get("ops_summary"), data["flops"],
                                                         data["matmul_peak"])]
    paths = rep.write_latency(data, out) + (ops_paths if ops else [])
    if json_file:
        paths.append(rep.write_json(json_file, data))
    _print_paths(paths)
    for g in data["goals"]:
        typer.echo(f"{g['verdict']:>7}  {g['name']}: {g['measured']} (target {g['target']})")


@app.command()
def parity(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx (from btp-export)"),
    data: Path = typer.Option(..., exists=True, file_okay=False, help="test data in the Anomaly-ShapeNet or "
                              "Real3D-AD layout (e.g. written by `btp data synth`)"),
    backends: str = typer.Option("ort-cpu,ort-cuda,trt-fp32,trt-fp16,torch-fp16,torch-fp16-mixed",
                                 help="backends to compare (torch-fp16-mixed: float16 with the export's FP32 "
                                      "keep-list - LayerNorm, the scoring head - in float32, as a TensorRT FP16 "
                                      "engine; torch-fp16: the model run entirely in float16 by torch "
                                      "on the CPU, a worst-case check of the FP16 tolerances without a GPU)"),
    reference: str = typer.Option("torch", help="reference backend"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint for the torch reference"),
    limit: Optional[int] = typer.Option(None, help="at most this many test samples"),
    layout: Optional[str] = typer.Option(None, help="anomaly-shapenet | real3d (auto-detected)"),
    threads: Optional[int] = typer.Option(None, help="intra-op threads"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write the JSON here"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Accuracy parity of each backend against a reference (Polygraphy-style PASS/FAIL per check)."""
    from btp.benchmarks import report as rep
    from btp.benchmarks.parity import run_parity

    _match_openmp(threads)
    result = run_parity(model, data, backends=_names(backends), reference=reference, checkpoint=checkpoint,
                        limit=limit, layout=layout, threads=threads, progress=_say)
    paths = rep.write_parity(result, out)
    if json_file:
        paths.append(rep.write_json(json_file, result))
    _print_paths(paths)
    failed = False
    for b in result["backends"]:
        typer.echo(f"{b['backend']}: {b.get('verdict') or 'skipped: ' + b['skipped']}")
        failed |= b.get("verdict") == "FAIL"
    if failed:
        raise typer.Exit(code=1)


@app.command()
def ops(
    points: str = typer.Option("2048,8192,40000,400000", help="cloud sizes N"),
    groups: str = typer.Option("512,1024", help="FPS samples / kNN queries G"),
    k: int = typer.Option(32, help="neighbours per query"),
    repeat: int = typer.Option(7, help="timed calls per row (median)"),
    threads: Optional[int] = typer.Option(None, help="threads for torch / OpenMP libraries"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write the JSON here"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Our FPS/kNN (btp.geometry) against fpsample, open3d, scipy, pykdtree, torch: medians, ratios, checks."""
    from btp.benchmarks import report as rep
    from btp.benchmarks.machine import describe_machine
    from btp.benchmarks.ops import ops_summary, run_ops

    machine = describe_machine()
    rows = run_ops(_ints(points, "--points"), _ints(groups, "--groups"), k, repeat=repeat, threads=threads,
                   progress=_say)
    data = {"machine": machine, "settings": {"points": _ints(points, "--points"), "groups": _ints(groups, "--groups"),
                                             "k": k, "repeat": repeat, "threads": threads},
            "rows": [r.to_dict() for r in rows], "summary": ops_summary(rows)}
    paths = rep.write_ops(data, out)
    if json_file:
        paths.append(rep.write_json(json_file, data))
    _print_paths(paths)
    for s in data["summary"]:
        typer.echo(f"{s['op']:>4} N={s['n_points']:>6} G={s['n_groups']:>4}: ours {s['ours_ms']:.2f} ms, "
                   f"best {s['best_library']} {s['best_ms']:.2f} ms -> {s['ratio_vs_best']:.2f}x")


@app.command()
def serve(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx (from btp-export)"),
    concurrency: str = typer.Option("1,4,16", help="client threads per row"),
    protocols: str = typer.Option("http,grpc", help="http and/or grpc"),
    duration: float = typer.Option(10.0, help="seconds per row"),
    points: int = typer.Option(8192, help="points per scan"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Load test of btp on a real Triton server (Python-backend repository) vs the in-process runtime."""
    from btp.benchmarks.serve import run_serve_bench, serve_markdown

    data = run_serve_bench(model, concurrency=_ints(concurrency, "--concurrency"), protocols=_names(protocols),
                           duration_s=duration, points=points, progress=_say)
    _write_report("serve", data, serve_markdown(data), out)


@app.command()
def render(
    points: str = typer.Option("100000", help="scan sizes (points sampled from a real mesh)"),
    repeats: int = typer.Option(10, min=3, help="timed renders per size (after one warm-up)"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Time of the three-view heat-map PNG (btp.runtime.outputs.render_views) per scan size."""
    import time

    import numpy as np

    from btp.benchmarks import report as rep
    from btp.benchmarks.data import sample_cloud
    from btp.benchmarks.machine import describe_machine, machine_line
    from btp.benchmarks.stats import summarize
    from btp.runtime.outputs import render_views

    machine = describe_machine()
    rows = []
    tmp = Path(out or rep.RESULTS_DIR) / ".render-bench.png"
    for n in _ints(points, "--points"):
        pts = sample_cloud(n, seed=0)
        scores = np.exp(-np.linalg.norm(pts - pts[0], axis=1) / (0.05 * np.ptp(pts, axis=0).max()))
        render_views(tmp, pts, scores, title="warm-up", point_threshold=0.5)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            render_views(tmp, pts, scores, title=f"{n} points", point_threshold=0.5)
            times.append((time.perf_counter() - t0) * 1e3)
        st = summarize(times)
        rows.append({"points": n, "p50_ms": st.p50, "p90_ms": st.p90, "max_ms": st.max, "n": len(times)})
        _say(f"{n} points: p50 {st.p50:.0f} ms")
    tmp.unlink(missing_ok=True)
    data = {"machine": machine, "rows": rows, "goal": "<= 300 ms per scan at 100k points"}
    lines = ["# Heat-map rendering (three views, `render_views`)", "", f"- Machine: {machine_line(machine)}",
             f"- Date (UTC): {machine['date_utc']}", "- Run: `btp-bench render`; one warm-up render, then "
             f"{repeats} timed ones per size (Agg canvas, PNG encoded in memory and written).", "",
             "| points | p50 ms | p90 ms | max ms | verdict (<= 300 ms at 100k) |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = ("MET" if r["p50_ms"] <= 300 else "MISSED") if r["points"] == 100000 else ""
        lines.append(f"| {r['points']:,} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['max_ms']:.0f} | {verdict} |")
    _write_report("render", data, "\n".join(lines) + "\n", out, machine=machine)


@app.command()
def reference(
    model: Path = typer.Option(..., "--model", help="model.onnx the reference is built for"),
    points: str = typer.Option("40000,400000", help="scan sizes timed with and without a reference"),
    repeats: int = typer.Option(7, min=1, help="timed calls per size and pipeline, interleaved (after one warm-up)"),
    embeddings: bool = typer.Option(False, "--embeddings", help="the reference with the model's patch embeddings "
                                    "(`btp reference build --embeddings`; the model must give patch_embed)"),
    out: Path = typer.Option(None, help="report folder (default benchmarks/results/)"),
) -> None:
    """Cost of reference-guided inspection: build time and size of a 4-scan reference, the time it
    adds to btp-run's end to end, and the bank's kNN library measured."""
    from btp.benchmarks.machine import describe_machine, machine_line
    from btp.benchmarks.reference import markdown, run_reference_bench

    machine = describe_machine()
    data = run_reference_bench(model, sizes=_ints(points, "--points"), repeats=repeats, embeddings=embeddings, log=_say)
    data["machine"] = machine
    _write_report("reference-embeddings" if embeddings else "reference", data,
                  markdown(data, machine_line(machine), machine["date_utc"]), out, machine=machine)


@app.command()
def throughput(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx (from btp-export)"),
    files: int = typer.Option(100, min=2, help="scan files written for the run"),
    points: int = typer.Option(40000, min=64, help="points per scan (sampled from real meshes)"),
    prefetch: int = typer.Option(2, min=1, help="files read ahead in the overlapped run"),
    repeats: int = typer.Option(3, min=1, help="runs of each mode, alternated (the median is reported)"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """btp-run on a folder of scans: scans/s of the serial loop against reading/preprocessing ahead
    of the engine (run_files(prefetch=...)); both runs' outputs must be identical."""
    from btp.benchmarks.throughput import run_throughput, throughput_markdown

    data = run_throughput(model, files=files, points=points, prefetch=prefetch, repeats=repeats, progress=_say)
    _write_report("throughput", data, throughput_markdown(data), out)


@app.command()
def engines(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx (from btp-export)"),
    variants: str = typer.Option("ort,ort-fusions,ort-int8-qdq,openvino,openvino-bf16",
                                 help="comma-separated: ort, ort-fusions, ort-int8-qdq, openvino, openvino-bf16"),
    rounds: int = typer.Option(7, min=1, help="turns of every variant (interleaved)"),
    iters: int = typer.Option(10, min=1, help="calls per variant and round"),
    save: Path = typer.Option(None, help="also write the ORT variants' graphs here (<variant>.onnx, with the "
                              "model's metadata: btp eval --model takes them)"),
    compare: list[Path] = typer.Option([], "--compare", exists=True, dir_okay=False,
                                       help="another model.onnx with the same engine inputs, timed in ORT in "
                                            "the same turns (repeatable): engine cost against MODEL"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Engine variants of one model in the same run: ORT as exported, ORT after its transformer
    fusions, static QDQ INT8 (per-channel, calibrated on real scans), OpenVINO - time and parity;
    with --compare, other models' ORT engine times in the same turns."""
    from btp.benchmarks.engines import engines_markdown, run_engines

    data = run_engines(model, variants=_names(variants), rounds=rounds, iters=iters, save=save,
                       progress=_say, compare=tuple(compare))
    _write_report("engines", data, engines_markdown(data), out)


@app.command()
def rules(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx or a .safetensors checkpoint"),
    data: list[Path] = typer.Option(..., "--data", exists=True, file_okay=False,
                                    help="held-out test set (repeatable), e.g. `btp data eval-sets --points 100000`"),
    rule: str = typer.Option("auto", help="the rule compared with exact: auto | voxel | bucket | exact-start1 "
                             "(the exact rule from another start point: the comparison's noise floor)"),
    starts: str = typer.Option(None, help="FPS start indices, e.g. 0,1,2: every rule from each, the difference "
                               "as mean ± standard error over starts (default: the model's fps_start only)"),
    voxel_reps: str = typer.Option(None, help="voxel cells per sample to try, e.g. 6,3: the rule runs once per "
                                   "value against one exact run (default: the model's preprocess.voxel_reps; with "
                                   "auto they act only where auto is the voxel rule: for a model sampling in "
                                   "canonical order, scans of more than 8N points)"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """What the default raw-scan rule (auto: voxel + gather; bucket FPS up to 8N points) changes in held-out
    O-/P-AUROC against the exact rule, per data set (goal: <= 0.5 point)."""
    from btp.benchmarks.rules import rules_markdown, run_rules

    if rule not in ("auto", "voxel", "bucket", "exact-start1"):
        raise typer.BadParameter(f"{rule!r}: choose auto, voxel, bucket or exact-start1", param_hint="--rule")
    start_list = _start_list(starts)
    reps = _int_list(voxel_reps, "--voxel-reps", minimum=1) if voxel_reps else None
    if reps and rule not in ("auto", "voxel"):
        raise typer.BadParameter(f"--voxel-reps applies to the voxel rule (auto or voxel), not {rule!r}",
                                 param_hint="--voxel-reps")
    result = run_rules(model, data, rules=("exact", rule), starts=start_list, voxel_reps=reps, progress=_say)
    name = f"accuracy-{rule}" + (f"-reps-{'-'.join(map(str, reps))}" if reps else "") + \
        (f"-{len(start_list)}-starts" if start_list else "")
    _write_report(name, result, rules_markdown(result), out)


@app.command()
def stability(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="model.onnx"),
    data: list[Path] = typer.Option(..., "--data", exists=True, file_okay=False,
                                    help="test set (repeatable): <class>/test/* scans, e.g. `btp data eval-sets`"),
    orders: str = typer.Option("input,canonical", help="sampling orders to compare (preprocess.sampling_order)"),
    permutations: int = typer.Option(8, min=2, help="random row orders per scan"),
    drops: int = typer.Option(8, min=2, help="random drops per scan"),
    drop_share: float = typer.Option(0.001, min=0.0, max=0.5, help="share of the points each drop removes"),
    poses: int = typer.Option(8, min=0, help="random small poses per scan (0: none)"),
    pose_deg: float = typer.Option(10.0, min=0.0, max=180.0,
                                   help="largest angle of a pose, degrees (about the scan's centroid)"),
    limit: int = typer.Option(None, min=1, help="at most this many scans per set (spread over the set)"),
    downsample: str = typer.Option("auto", help="raw-scan rule: auto | exact | bucket | voxel"),
    seed: int = typer.Option(0, help="seed of the permutations and drops"),
    out: Path = typer.Option(None, help="report folder (default benchmarks/results/)"),
) -> None:
    """How far the object score moves when only the sampling changes: the same scan in other row
    orders and with a few points dropped (goal: std <= 0.003 on every scan), per sampling order,
    with the end-to-end cost of each; and how far it moves when the part is turned a little."""
    from btp.benchmarks.stability import run_stability, stability_markdown, test_scans
    from btp.config import SAMPLING_ORDERS
    from btp.geometry.sampling import DOWNSAMPLE_METHODS

    names = _names(orders)
    if not names or any(o not in SAMPLING_ORDERS for o in names):
        raise typer.BadParameter(f"{orders!r}: choose from {', '.join(SAMPLING_ORDERS)}", param_hint="--orders")
    if downsample not in DOWNSAMPLE_METHODS:
        raise typer.BadParameter(f"{downsample!r}: choose one of {', '.join(DOWNSAMPLE_METHODS)}",
                                 param_hint="--downsample")
    files = test_scans(data, limit)
    if not files:
        raise typer.BadParameter("no <class>/test/* scans under the given sets", param_hint="--data")
    result = run_stability(model, files, orders=tuple(names), permutations=permutations, drops=drops,
                           drop_share=drop_share, poses=poses, pose_deg=pose_deg, seed=seed, downsample=downsample,
                           progress=_say)
    _write_report(f"stability-{downsample}", result, stability_markdown(result), out)


def _int_list(text: str, hint: str, minimum: int = 0) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: comma-separated integers, e.g. 0,1,2", param_hint=hint) from None
    if not values or min(values) < minimum or len(set(values)) != len(values):
        raise typer.BadParameter(f"{text!r}: distinct integers >= {minimum}", param_hint=hint)
    return values


def _start_list(starts: str | None) -> list[int] | None:
    return _int_list(starts, "--starts") if starts else None


@app.command()
def models(
    model_a: Path = typer.Argument(..., exists=True, dir_okay=False, help="reference model (.onnx or .safetensors)"),
    model_b: Path = typer.Argument(..., exists=True, dir_okay=False, help="the model compared with it"),
    data: list[Path] = typer.Option(..., "--data", exists=True, file_okay=False,
                                    help="test set (repeatable), e.g. from `btp data eval-sets` (held-out, or "
                                         "--split validation for two `btp train --validate` models)"),
    starts: str = typer.Option("0,1,2", help="FPS start indices: both models from each, the difference as "
                               "mean ± standard error over starts"),
    rule: str = typer.Option("exact", help="raw-scan rule for both: exact | auto"),
    out: Path = typer.Option(None, help="report folder (default ./benchmarks/results/)"),
) -> None:
    """Two models on the same test samples: O-/P-AUROC and AU-PRO of each and their paired
    difference (B - A) per set, from several FPS starts."""
    from btp.benchmarks.rules import models_markdown, run_models

    if rule not in ("exact", "auto"):
        raise typer.BadParameter(f"{rule!r}: choose exact or auto", param_hint="--rule")
    start_list = _start_list(starts)
    result = run_models([model_a, model_b], data, rule=rule, starts=start_list, progress=_say)
    a, b = (re.sub(r"[^A-Za-z0-9._-]+", "-", label) for label in result["models"])
    name = f"accuracy-models-{b}-vs-{a}" + (f"-{len(start_list)}-starts" if start_list else "")
    _write_report(name, result, models_markdown(result), out)


@app.command()
def table(
    results: Path = typer.Option(None, help="results folder (default benchmarks/results/)"),
    out: Path = typer.Option(None, help="output (default <results>/README-table.md)"),
    readme: Path = typer.Option(None, help="also replace the block between the perf-table markers of this "
                                            "README (e.g. README.md)"),
) -> None:
    """Generate README's performance table from the newest committed CPU results."""
    from btp.benchmarks import report as rep

    results = Path(results or rep.RESULTS_DIR)
    try:
        text = rep.readme_table(results)
    except FileNotFoundError as exc:
        typer.echo(f"btp bench table: {exc}", err=True)
        raise typer.Exit(code=2) from None
    path = rep.write_text(Path(out or results / "README-table.md"), text)
    typer.echo(f"wrote {path}")
    if readme is not None:
        start, end = "<!-- perf-table:start -->", "<!-- perf-table:end -->"
        doc = Path(readme).read_text()
        if start not in doc or end not in doc:
            typer.echo(f"btp bench table: {readme} has no {start} ... {end} block to replace", err=True)
            raise typer.Exit(code=2)
        head, rest = doc.split(start, 1)
        tail = rest.split(end, 1)[1]
        rep.write_text(Path(readme), f"{head}{start}\n{text.rstrip()}\n{end}{tail}")
        typer.echo(f"updated {readme}")
