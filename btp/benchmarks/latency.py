"""`btp-bench latency`: end-to-end and per-stage latency of the runtime pipeline per backend.

For every (backend, points, batch) the same deterministic scans (sampled from a real mesh, raw
units, not normalised) run through ``btp.runtime.Pipeline``: warm-up (not recorded), then timed
calls for ``duration`` seconds (at least ``min_iters``). End-to-end = wall clock of the whole
call (perf_counter), stages = the pipeline's own ``Result.timings``; a backend that times its
stages otherwise (CUDA events) says so in its ``timer`` attribute, recorded per row. Peak RSS is sampled by a psutil thread during each configuration;
device memory is read from nvidia-smi after a GPU configuration.

Backends that cannot run here are rows with ``skipped: <reason>``, never dropped. The torch
row is PyTorch eager on the same model behind the same pipeline (same preprocessing), run after
the others so that importing torch does not inflate their RSS.
"""
from __future__ import annotations

import importlib.util
import subprocess
import threading
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from btp import contract
from btp.benchmarks.data import sample_cloud
from btp.benchmarks.stats import Stats, measure, summarize

# PyTorch eager on the same model, the reference rows (btp.benchmarks.torch_backend); the runtime's
# rows are btp.contract's backends under their bench names (a precision after the dash)
TORCH_BACKENDS = ("torch", "torch-fp16", "torch-fp16-mixed")
RUNTIME_BACKENDS = {name: row for row in contract.BACKENDS for name in row.bench}  # bench name -> backend row
BACKENDS = TORCH_BACKENDS + tuple(RUNTIME_BACKENDS)
GPU_BACKENDS = tuple(name for name, row in RUNTIME_BACKENDS.items() if row.gpu)
DEFAULT_POINTS = (2048, 40000, 400000)
DEFAULT_BATCHES = (1, 4)
BATCH_STAGES = ("engine",)  # btp.runtime.Result: "engine = the whole batch call"


@dataclass(frozen=True, kw_only=True)
class LatencyRow:
    backend: str
    points: int
    batch: int
    stages: dict  # stage -> Stats dict (ms); always has "end_to_end"
    throughput: float  # scans per second (batch / mean end-to-end)
    peak_rss_mb: float
    rss_before_mb: float
    device_memory_mb: float | None
    iterations: int
    timer: str  # "perf_counter" | "cuda-events" (the stages' timer)
    precision: str
    weights: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skipped:
    backend: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class LatencyReport:
    machine: dict
    model: dict
    settings: dict
    results: list = field(default_factory=list)  # [LatencyRow]
    skipped: list = field(default_factory=list)  # [Skipped]

    def to_dict(self) -> dict:
        return {"machine": self.machine, "model": self.model, "settings": self.settings,
                "results": [r.to_dict() for r in self.results],
                "skipped": [s.to_dict() for s in self.skipped]}


# ---- availability ----------------------------------------------------------------------------

def split_rule(backend: str) -> tuple[str, str]:
    """"ort-cpu@exact" -> ("ort-cpu", "exact"): a backend with its raw-scan downsampling rule
    (``btp.runtime.Pipeline(downsample=)``), so several rules are timed as rows of one run. The
    rule may carry the voxel rule's cells per sample: "ort-cpu@auto:3" -> ("ort-cpu", "auto:3")
    (``rule_parts``)."""
    name, _, rule = backend.partition("@")
    return name, rule or "auto"


def rule_parts(rule: str) -> tuple[str, int | None]:
    """"auto:3" -> ("auto", 3): the downsampling rule and the voxel cells per sample that replace
    the model's ``preprocess.voxel_reps`` for the row (None: the model's own). ValueError if the
    count is not an integer >= 1."""
    method, sep, reps = rule.partition(":")
    if not sep:
        return method, None
    if not reps.isdigit() or int(reps) < 1:
        raise ValueError(f"{rule!r}: the voxel cells per sample after ':' must be an integer >= 1")
    return method, int(reps)


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run on this machine (None = try it)."""
    from btp.geometry.sampling import DOWNSAMPLE_METHODS

    backend, rule = split_rule(backend)
    try:
        method, reps = rule_parts(rule)
    except ValueError as exc:
        return str(exc)
    if method not in DOWNSAMPLE_METHODS:
        return f"unknown raw-scan rule {method!r} after '@'; choose from {', '.join(DOWNSAMPLE_METHODS)}"
    if reps is not None and method not in ("auto", "voxel"):
        return f"':{reps}' (voxel cells per sample) applies to the voxel rule (auto or voxel), not {method!r}"
    if backend == "auto":  # a variant's own backend (its precision's): the Pipeline says if it cannot run
        return None
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}"
    if backend in TORCH_BACKENDS:
        return None if importlib.util.find_spec("torch") else "torch not installed (pip install btp-edge[train])"
    if backend == "ort-cpu":
        return None if importlib.util.find_spec("onnxruntime") else "onnxruntime not installed"
    if RUNTIME_BACKENDS[backend].module == "openvino":
        return (None if importlib.util.find_spec("openvino") else
                "openvino not installed (pip install btp-edge[openvino])")
    from btp.benchmarks.machine import gpus

    has_gpu = bool(gpus())
    if backend == "ort-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
                    + ("" if has_gpu else "; no NVIDIA GPU on this machine"))
        return None if has_gpu else "no NVIDIA GPU on this machine (nvidia-smi not found)"
    missing = [m for m in ("tensorrt", "pycuda") if importlib.util.find_spec(m) is None]
    if missing or not has_gpu:
        parts = []
        if missing:
            parts.append(f"{' and '.join(missing)} not importable (pip install btp-edge[gpu])")
        if not has_gpu:
            parts.append("no NVIDIA GPU on this machine")
        return "; ".join(parts)
    return None


def precision_of(backend: str) -> str:
    return ("fp16" if "fp16" in backend else "int8" if backend.endswith("int8") else
            "bf16" if backend.endswith("bf16") else "fp32")


# ---- pipeline construction ---------------------------------------------------------------------

def make_pipeline(backend: str, model_path, *, threads: int | None = None, checkpoint=None):
    """A ``btp.runtime.Pipeline`` for ``backend`` (``split_rule``: an "@rule[:R]" suffix sets its
    downsampling rule and the voxel rule's cells per sample); the torch row gets a TorchBackend in it.

    Returns (pipeline, weights label).
    """
    backend, rule = split_rule(backend)
    rule, reps = rule_parts(rule)
    pipe, label = _pipeline(backend, rule, model_path, threads, checkpoint)
    if reps is not None:
        pipe.cfg.preprocess.voxel_reps = reps  # the pipeline's own copy of the model's config
    return pipe, label


def _pipeline(backend: str, rule: str, model_path, threads, checkpoint):
    from btp.runtime import Pipeline

    if backend in TORCH_BACKENDS:
        from btp.benchmarks.torch_backend import TorchBackend

        torch_backend = TorchBackend.for_onnx(model_path, checkpoint=checkpoint, threads=threads,
                                              half=backend != "torch", mixed=backend == "torch-fp16-mixed")
        return Pipeline(model_path, backend=torch_backend, preprocess="cpu", downsample=rule), torch_backend.weights
    if backend == "auto":
        pipe = Pipeline(model_path, backend="auto", threads=threads, preprocess="cpu", downsample=rule)
        return pipe, f"{Path(model_path).name} ({pipe.meta.precision}, backend {pipe.backend.name})"
    row = RUNTIME_BACKENDS[backend]
    if row.precisions:  # the bench name carries the precision: trt-fp16 -> trt, precision="fp16"
        pipe = Pipeline(model_path, backend=row.name, threads=threads, precision=precision_of(backend),
                        downsample=rule)
    else:
        pipe = Pipeline(model_path, backend=backend, threads=threads, preprocess="cpu", downsample=rule)
    info = getattr(getattr(pipe, "meta", None), "model", {}) or {}
    label = "model.onnx" + (f" ({info.get('source')})" if info.get("source") else "")
    return pipe, label


def call_pipeline(pipe, scans: Sequence[np.ndarray]):
    """Run one batch of scans; returns the list of Results."""
    return pipe.run_batch(list(scans))


# ---- memory ----------------------------------------------------------------------------------

class RssSampler:
    """Peak resident set size of this process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.before_mb = self._proc.memory_info().rss / 2**20
        self.peak_mb = self.before_mb
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)


def device_memory_mb() -> float | None:
    """GPU memory used (MB) on device 0 via nvidia-smi; None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


# ---- the runner --------------------------------------------------------------------------------

def make_scans(points: int, batch: int, mesh: str | None = None) -> list[np.ndarray]:
    """``batch`` different raw scans of ``points`` points each (seeds 0..batch-1)."""
    return [sample_cloud(points, mesh=mesh, seed=seed) for seed in range(batch)]


def bench_one(pipe, scans: Sequence[np.ndarray], *, warmup_s: float, duration_s: float,
              min_iters: int = 10, max_iters: int = 10_000) -> tuple[dict[str, Stats], int]:
    """Time ``pipe`` on ``scans``: -> ({stage: Stats}, iterations). One call = one batch: per-scan
    stage timings are summed over the batch's scans; per-batch stages (``BATCH_STAGES``: the
    engine call, which every Result of a batch reports whole) are counted once."""
    stage_samples: dict[str, list[float]] = {}

    def collect(results, ms):
        per_stage: dict[str, float] = {}
        for res in results:
            for stage, value in (getattr(res, "timings", None) or {}).items():
                if stage in BATCH_STAGES:
                    per_stage[stage] = max(per_stage.get(stage, 0.0), float(value))
                else:
                    per_stage[stage] = per_stage.get(stage, 0.0) + float(value)
        for stage, value in per_stage.items():
            stage_samples.setdefault(stage, []).append(value)

    e2e = measure(lambda: call_pipeline(pipe, scans), warmup_s=warmup_s, duration_s=duration_s,
                  min_iters=min_iters, max_iters=max_iters, on_result=collect)
    stats = {"end_to_end": summarize(e2e)}
    for stage, samples in stage_samples.items():
        if stage in ("end_to_end", "total"):
            stats[f"pipeline_{stage}"] = summarize(samples)
        else:
            stats[stage] = summarize(samples)
    return stats, len(e2e)


def run_latency(model_path, *, backends: Sequence[str] = ("torch", "ort-cpu") + GPU_BACKENDS,
                points: Sequence[int] = DEFAULT_POINTS, batches: Sequence[int] = DEFAULT_BATCHES,
                warmup_s: float = 1.0, duration_s: float = 5.0, min_iters: int = 10,
                threads: int | None = None, checkpoint=None, mesh: str | None = None,
                variants: Sequence[str | Path] = (),
                progress: Callable[[str], None] | None = None) -> LatencyReport:
    """``variants``: reduced-precision files of the same model (``btp-export --precision``), each
    timed in the same run on the backend its precision runs on, as rows named
    ``<precision>:<file name>``."""
    from btp.benchmarks.machine import describe_machine
    from btp.runtime.metadata import read_model_meta

    model_path = Path(model_path)
    meta = read_model_meta(model_path)
    report = LatencyReport(
        machine=describe_machine(),
        model={"path": str(model_path), "name": meta.config.name,
               "size_mb": round(model_path.stat().st_size / 2**20, 2),
               "provenance": meta.provenance, "info": meta.model},
        settings={"backends": list(backends), "points": list(points), "batches": list(batches),
                  "warmup_s": warmup_s, "duration_s": duration_s, "min_iters": min_iters,
                  "threads": threads, "mesh": mesh or "cgal__stanford_bunny.ply"},
    )
    # torch last: importing it grows the process (RSS of the other rows stays honest)
    ordered = sorted(dict.fromkeys(backends), key=lambda b: b.startswith("torch"))
    jobs = [(b, b, model_path) for b in ordered if not b.startswith("torch")]
    jobs += [(f"{read_model_meta(v).precision}:{Path(v).name}", "auto", Path(v)) for v in variants]
    jobs += [(b, b, model_path) for b in ordered if b.startswith("torch")]
    report.settings["variants"] = [str(v) for v in variants]
    for name, backend, path in jobs:
        reason = unavailable_reason(backend)
        if reason:
            report.skipped.append(Skipped(name, reason))
            if progress:
                progress(f"{name}: skipped: {reason}")
            continue
        try:
            pipe, weights = make_pipeline(backend, path, threads=threads, checkpoint=checkpoint)
        except Exception as exc:  # noqa: BLE001 - a backend that fails to start is a skipped row
            report.skipped.append(Skipped(name, f"failed to start: {type(exc).__name__}: {exc}"))
            if progress:
                progress(f"{name}: skipped: {exc}")
            continue
        precision = pipe.meta.precision if backend == "auto" else precision_of(backend)
        for n in points:
            for b in batches:
                if progress:
                    progress(f"{name}: {n} points x batch {b}")
                scans = make_scans(n, b, mesh)
                try:
                    with RssSampler() as rss:
                        stats, iters = bench_one(pipe, scans, warmup_s=warmup_s, duration_s=duration_s,
                                                 min_iters=min_iters)
                except Exception as exc:  # noqa: BLE001 - keep the other rows
                    report.skipped.append(Skipped(name, f"{n} points x batch {b}: {type(exc).__name__}: {exc}"))
                    continue
                e2e = stats["end_to_end"]
                report.results.append(LatencyRow(
                    backend=name, points=n, batch=b,
                    stages={k: v.to_dict() for k, v in stats.items()},
                    throughput=b * 1e3 / e2e.mean,
                    peak_rss_mb=round(rss.peak_mb, 1), rss_before_mb=round(rss.before_mb, 1),
                    device_memory_mb=device_memory_mb() if split_rule(backend)[0] in GPU_BACKENDS else None,
                    iterations=iters,
                    timer=str(getattr(getattr(pipe, "engine", None), "timer", "perf_counter")),
                    precision=precision, weights=weights,
                ))
        del pipe
    return report


def engine_thread_sweep(model_path, *, threads: Sequence[int] = (1, 2), backends: Sequence[str] = ("ort-cpu", "torch"),
                        checkpoint=None, repeat: int = 7, mesh: str | None = None) -> list[dict]:
    """Engine-only median ms per (backend, intra-op threads) on one real preprocessed 2048-point
    scan: shows how each backend's thread pool behaves on this machine (on a shared, loaded box a
    2-thread pool can lose to 1 thread). Torch threads are process-global: restored afterwards."""
    from btp.benchmarks.stats import median_ms
    from btp.runtime import Pipeline

    base = Pipeline(model_path, backend="ort-cpu", preprocess="cpu")
    prep = base.prepare(make_scans(base.cfg.preprocess.num_points, 1, mesh)[0]).prep
    nb, ce = prep.neighborhood[None], prep.center[None]
    rows = []
    for backend in backends:
        if unavailable_reason(backend):
            continue
        saved = None
        if backend == "torch":
            import torch

            saved = torch.get_num_threads()
        for t in threads:
            engine = make_pipeline(backend, model_path, threads=t, checkpoint=checkpoint)[0].backend
            ms, _ = median_ms(partial(engine.run, nb, ce), repeat=repeat, warmup=2, max_s=20.0)
            rows.append({"backend": backend, "threads": t, "engine_ms": ms})
            del engine  # free this session before the next thread count builds its own
        if saved is not None:
            torch.set_num_threads(saved)
    return rows
