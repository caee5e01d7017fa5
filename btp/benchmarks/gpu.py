"""GPU check + benchmark behind benchmarks/gpu_check.sh: run it on any NVIDIA machine.

    python -m btp.benchmarks.gpu --out benchmarks/results [--sizes 2048,40000,400000,2000000]

For each N (points sampled from a real mesh, tests' shapes): our kernels (FPS, kNN grouping,
the whole GpuPreprocessor, score propagation + interpolation) timed with CUDA events (median
and p90 of ``--iters`` runs, ``--warmup`` runs excluded), each checked once against btp.geometry
(exact equality for indices / inputs); next to PyTorch references on the same GPU (a plain torch
FPS loop, ``torch.cdist`` + ``topk`` kNN) when torch has CUDA. Then the torch-CUDA model path
(tiny BTPModel on CUDA vs CPU) and TensorRT (tiny model: ``btp build`` route, FP32 and FP16,
vs ONNX Runtime CPU) when importable. Writes ``gpu-<device>-<date>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_SIZES = (2048, 40000, 400000, 2000000)


def summarize(times_ms: list[float]) -> dict[str, float]:
    """median / p90 / min of per-iteration milliseconds (warm-up already excluded)."""
    ordered = sorted(times_ms)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_ms": round(statistics.median(ordered), 4), "p90_ms": round(p90, 4),
            "min_ms": round(ordered[0], 4), "iters": len(ordered)}


def time_device(fn: Callable[[], Any], dev, warmup: int, iters: int) -> dict[str, float]:
    """CUDA-event time of fn() enqueued on the device's stream (pycuda or cuda-python)."""
    for _ in range(warmup):
        fn()
    dev.synchronize()
    return summarize([dev.elapsed_ms(fn) for _ in range(iters)])


def time_torch(fn: Callable[[], Any], warmup: int, iters: int) -> dict[str, float]:
    """CUDA-event time of fn() on torch's current stream."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return summarize(times)


def real_cloud(shapes_root: Path, n: int) -> np.ndarray:
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(shapes_root / "cgal__stanford_bunny.ply")
    points, _ = sample_surface(vertices, faces, n, seed=0)
    return np.ascontiguousarray(points, dtype=np.float32)


def bench_kernels(sizes, shapes_root: Path, warmup: int, iters: int) -> list[dict[str, Any]]:
    from btp import geometry
    from btp.config import btp_mini_config
    from btp.geometry.prepare import sample_indices
    from btp.kernels import ops
    from btp.kernels.devices import open_device
    from btp.kernels.preprocess import GpuPreprocessor

    dev = open_device("auto")
    rows = []
    for n in sizes:
        points = real_cloud(shapes_root, n)
        s = 512 if n <= 2048 else 2048
        pts = dev.upload(points[None])
        start = dev.upload(np.zeros(1, np.int32))
        idx = dev.empty((1, s), np.int32)
        ws = dev.empty((1, n), np.float32)
        run_fps = lambda: ops.enqueue_fps(dev, pts, 1, n, s, start, out_idx=idx, workspace=ws)  # noqa: E731
        t = time_device(run_fps, dev, warmup, iters)
        equal = bool(np.array_equal(dev.download(idx)[0], geometry.fps(points, s, 0)))
        rows.append({"op": f"FPS {n} -> {s}", "impl": "btp CUDA kernel", "n": n, **t, "equal_to_cpu": equal})

        g, k = 512, 32
        centers = dev.upload(np.ascontiguousarray(np.random.default_rng(0).choice(n, g, replace=False)[None], dtype=np.int32))
        out = ops.enqueue_knn_group(dev, pts, None, centers, 1, n, g, k, 6, 0.5)
        run_knn = lambda: ops.enqueue_knn_group(dev, pts, None, centers, 1, n, g, k, 6, 0.5, out=out)  # noqa: E731
        t = time_device(run_knn, dev, warmup, iters)
        ref_idx, ref_d2 = geometry.knn(points, points[dev.download(centers)[0]], k)
        equal = bool(np.array_equal(dev.download(out.patch_idx)[0], ref_idx)
                     and np.array_equal(dev.download(out.patch_d2)[0], ref_d2))
        rows.append({"op": f"kNN group {g} x {k} of {n}", "impl": "btp CUDA kernel", "n": n, **t, "equal_to_cpu": equal})

        cfg = btp_mini_config()
        pre = GpuPreprocessor.from_config(cfg, device=dev)
        t = time_device(lambda: pre.prepare(points), dev, warmup, iters)
        got = pre.run(points)
        sample_idx = sample_indices(points, cfg.preprocess, "exact")[0]
        normed, _, _ = geometry.normalize(points[sample_idx])
        ref = geometry.group(normed, cfg.encoder.num_group, cfg.encoder.group_size)
        equal = bool(np.array_equal(got.sample_idx, sample_idx) and np.array_equal(got.neighborhood, ref.neighborhood))
        rows.append({"op": f"preprocess raw {n} -> N 2048 -> G 256 x K 32 (incl. H2D)", "impl": "GpuPreprocessor",
                     "n": n, **t, "equal_to_cpu": equal})

        scores = dev.upload(np.random.default_rng(1).random((1, cfg.encoder.num_group), dtype=np.float32))
        t = time_device(lambda: pre.raw_scores(pre.point_scores(scores)), dev, warmup, iters)
        rows.append({"op": f"propagate + interpolate to raw {n}", "impl": "btp CUDA kernel", "n": n, **t,
                     "equal_to_cpu": None})
    dev.close()
    return rows


def torch_fps(points, n_samples: int, start: int = 0):
    """The plain PyTorch FPS loop (reference for timing): points [N, 3] on CUDA -> int64 [S]."""
    import torch

    idx = torch.empty(n_samples, dtype=torch.long, device=points.device)
    min_d2 = torch.full((points.shape[0],), float("inf"), device=points.device)
    last = torch.tensor(start, device=points.device)
    idx[0] = last
    for i in range(1, n_samples):
        d2 = ((points - points[last]) ** 2).sum(dim=1)
        min_d2 = torch.minimum(min_d2, d2)
        last = torch.argmax(min_d2)
        idx[i] = last
    return idx


def torch_knn(points, queries, k: int, chunk: int = 64):
    """torch.cdist + topk (reference for timing), queries in chunks to bound memory."""
    import torch

    out = []
    for lo in range(0, queries.shape[0], chunk):
        d = torch.cdist(queries[lo:lo + chunk], points)
        out.append(d.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def bench_torch(sizes, shapes_root: Path, warmup: int, iters: int) -> list[dict[str, Any]]:
    import torch

    rows = []
    for n in sizes:
        points = torch.from_numpy(real_cloud(shapes_root, n)).cuda()
        s = 512 if n <= 2048 else 2048
        fps_iters = max(3, iters // 10) if n > 40000 else iters
        t = time_torch(lambda: torch_fps(points, s), min(warmup, 2), fps_iters)
        rows.append({"op": f"FPS {n} -> {s}", "impl": "torch loop", "n": n, **t, "equal_to_cpu": None})
        queries = points[torch.randperm(n, device=points.device)[:512]]
        t = time_torch(lambda: torch_knn(points, queries, 32), warmup, iters)
        rows.append({"op": f"kNN group 512 x 32 of {n}", "impl": "torch cdist+topk", "n": n, **t, "equal_to_cpu": None})
    return rows


def torch_cuda_model_check() -> dict[str, Any]:
    """Tiny BTPModel forward on CUDA vs CPU: max |diff| per output and CUDA latency."""
    import torch

    from btp.config import tiny_config
    from btp.export.onnx import fresh_model

    cfg = tiny_config()
    model = fresh_model(cfg).model.eval()  # text embeddings frozen, as exported
    g, k, c = cfg.encoder.num_group, cfg.encoder.group_size, cfg.encoder.in_channels
    nb = torch.randn(2, g, k, c) * 0.1
    ce = torch.randn(2, g, 3) * 0.5
    with torch.no_grad():
        cpu = model(nb, ce)
        gpu_model = model.cuda()
        gpu = gpu_model(nb.cuda(), ce.cuda())
        t = time_torch(lambda: gpu_model(nb.cuda(), ce.cuda()), 3, 20)
    diffs = {name: float((cpu[name] - gpu[name].cpu()).abs().max()) for name in cpu}
    return {"max_abs_diff": diffs, **t}


def tensorrt_check(warmup: int, iters: int) -> dict[str, Any]:
    """Tiny model: export -> btp build route (fp32, fp16) -> TensorRTBackend vs ONNX Runtime CPU."""
    import onnxruntime

    from btp.config import tiny_config
    from btp.export.onnx import export_onnx, fresh_model
    from btp.export.samples import parity_inputs
    from btp.runtime.backends.trt import TensorRTBackend

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "tiny.onnx"
        export_onnx(fresh_model(tiny_config()), model_path)
        neighborhood, center = parity_inputs(tiny_config(), 2)
        session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        ref = dict(zip([o.name for o in session.get_outputs()],
                       session.run(None, {"neighborhood": neighborhood, "center": center})))
        for precision in ("fp32", "fp16"):
            backend = TensorRTBackend(model_path, None, precision=precision, cache_dir=Path(tmp) / "cache")
            got = backend.run(neighborhood, center)
            diffs = {name: float(np.abs(got[name] - ref[name]).max()) for name in got if name in ref}
            t = time_device(lambda: backend.enqueue(neighborhood.shape[0]), backend.device, warmup, iters)
            out[precision] = {"max_abs_diff_vs_ort_cpu": diffs, "engine": str(backend.plan_path.name), **t}
    return out


def pipeline_check(shapes_root: Path) -> dict[str, Any]:
    """The product's path: Pipeline(preprocess="cuda") (our kernels around the engine) against
    Pipeline(preprocess="cpu", downsample="exact") on real scans of 2048 and 40000 points (tiny
    model, ORT CPU engine: the kernels' side is what is checked)."""
    from btp.config import tiny_config
    from btp.export.onnx import export_onnx, fresh_model
    from btp.runtime import Pipeline

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = Path(tmp) / "tiny.onnx"
        export_onnx(fresh_model(tiny_config()), model_path)
        gpu = Pipeline(model_path, preprocess="cuda")
        cpu = Pipeline(model_path, preprocess="cpu", downsample="exact")
        for n in (2048, 40000):
            scan = real_cloud(shapes_root, n)
            a, b = gpu(scan), cpu(scan)
            out[str(n)] = {"max_abs_diff_point_scores": float(np.abs(a.point_scores - b.point_scores).max()),
                           "object_score_diff": abs(a.object_score - b.object_score),
                           "gpu_ms": {k: round(v, 3) for k, v in a.timings.items()}}
    return out


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    from btp.kernels.devices import gpu_identity, unavailable_reasons

    try:
        name, arch = gpu_identity(0)
        info.update(device=name, compute_capability=arch)
    except Exception as exc:  # noqa: BLE001
        info["device"] = f"unavailable ({exc})"
    info["bindings"] = {binding: why or "usable" for binding, why in unavailable_reasons().items()}
    for module in ("pycuda", "cuda.bindings", "tensorrt", "torch", "onnxruntime"):
        try:
            mod = __import__(module, fromlist=["_"])
            info[module] = getattr(mod, "VERSION_TEXT", None) or getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001
            info[module] = None
    return info


def report_paths(out_dir: Path, device: str, date: str) -> tuple[Path, Path]:
    """benchmarks/results/gpu-<device slug>-<YYYY-MM-DD>.md / .json"""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"
    stem = f"gpu-{slug}-{date}"
    return out_dir / f"{stem}.md", out_dir / f"{stem}.json"


def render_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [f"# GPU check: {env.get('device')}", "",
             f"{env.get('date')}; compute capability {env.get('compute_capability')}; pycuda {env.get('pycuda')}, "
             f"cuda-python {env.get('cuda.bindings')} (bindings: {env.get('bindings')}), TensorRT {env.get('tensorrt')}, "
             f"torch {env.get('torch')}, onnxruntime {env.get('onnxruntime')}.", "",
             "Latencies: CUDA events, median (p90) of the timed runs, warm-up runs excluded. "
             "`= CPU`: the output equals btp.geometry's exactly (indices, dist2, engine inputs).", "",
             "| op | impl | median ms | p90 ms | runs | = CPU |", "|---|---|---|---|---|---|"]
    for row in (result.get("kernels") or []) + (result.get("torch") or []):
        eq = {True: "yes", False: "**NO**", None: "-"}[row.get("equal_to_cpu")]
        lines.append(f"| {row['op']} | {row['impl']} | {row['median_ms']:.3f} | {row['p90_ms']:.3f} | {row['iters']} | {eq} |")
    for section in ("pipeline", "torch_cuda_model", "tensorrt"):
        lines += ["", f"## {section}", "", "```", json.dumps(result.get(section), indent=2, sort_keys=True), "```"]
    if result.get("errors"):
        lines += ["", "## errors", ""] + [f"- {e}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    env = result["environment"]
    md, js = report_paths(out_dir, str(env.get("device", "gpu")), env.get("date", "")[:10])
    out_dir.mkdir(parents=True, exist_ok=True)
    md.write_text(render_markdown(result))
    js.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--shapes", type=Path, default=os.environ.get("BTP_SHAPES"),
                        help="real meshes (default $BTP_SHAPES)")
    args = parser.parse_args(argv)
    if args.shapes is None:
        parser.error("no meshes: pass --shapes DIR or set BTP_SHAPES=DIR (the shared shapes folder)")
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict[str, Any] = {"environment": environment(), "errors": []}
    sections = [("kernels", lambda: bench_kernels(sizes, args.shapes, args.warmup, args.iters)),
                ("torch", lambda: bench_torch(sizes, args.shapes, args.warmup, args.iters)),
                ("pipeline", lambda: pipeline_check(args.shapes)),
                ("torch_cuda_model", torch_cuda_model_check),
                ("tensorrt", lambda: tensorrt_check(args.warmup, args.iters))]
    from btp.errors import NotAvailableError

    for name, fn in sections:
        try:
            result[name] = fn()
        except NotAvailableError as exc:  # e.g. no TensorRT on a machine with cuda-python only
            result[name] = {"skipped": str(exc)}
            print(f"[gpu-check] {name} skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - record and go on: a partial report is still useful
            result[name] = None
            result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"[gpu-check] {name} skipped: {type(exc).__name__}: {exc}")
    md, js = write_report(result, args.out)
    print(f"wrote {md} and {js}")
    failed = [r for r in result.get("kernels") or [] if r.get("equal_to_cpu") is False]
    return 1 if failed or result.get("kernels") is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
