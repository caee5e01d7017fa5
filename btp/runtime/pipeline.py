"""``Pipeline``: a raw scan in, an object score and a per-point anomaly map out (torch-free).

Reads as its data flow, with a timing per stage (ms), like CUDA-PointPillars:

    pre-processing   load -> sanitize -> downsample (N) -> normalize -> fps (G) -> group (K)
    engine           model.onnx on the chosen backend: neighborhood [B,G,K,C], center [B,G,3]
    post-processing  propagate (patch -> N points) -> interpolate (N -> raw M) -> object score

    pipe = Pipeline("model.onnx")                 # everything else comes from the ONNX metadata
    result = pipe(points)                         # [M, 3] array, PointCloud or a file path
    result.object_score, result.point_scores      # float, float32 [M] in the input's order
    results = pipe.run_batch(["a.pcd", "b.ply"])  # one engine call per batch
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from btp.runtime import stages
from btp.runtime.backends import make_backend
from btp.runtime.metadata import read_model_meta


@dataclass(frozen=True)
class Result:
    """Scores of one scan.

    object_score  float                 alpha * global_prob + (1 - alpha) * mean(top patch probs)
    point_scores  float32 [M]           per raw point, in the input's order (mean patch probability)
    patch_probs   float32 [G]           per FPS patch
    timings       {stage: ms}           load, sanitize, downsample, normalize, fps, group, engine,
                                        propagate, interpolate, object (engine = the whole batch call)
    points        float32 [M, 3]        the raw points the scores belong to
    """

    object_score: float
    point_scores: np.ndarray
    patch_probs: np.ndarray
    timings: dict[str, float]
    global_prob: float = float("nan")
    points: np.ndarray | None = field(default=None, repr=False)
    path: Path | None = None
    batch_size: int = 1
    warnings: tuple[str, ...] = ()
    sampled_idx: np.ndarray | None = field(default=None, repr=False)  # int64 [N] into points
    sampled_scores: np.ndarray | None = field(default=None, repr=False)  # float32 [N] before interpolation
    row_mask: np.ndarray | None = field(default=None, repr=False)  # bool [R]: file rows kept (None = all)

    def scores_per_row(self) -> np.ndarray:
        """float32 [R]: one score per row of the input file, NaN where a NaN/inf row was dropped."""
        if self.row_mask is None:
            return self.point_scores
        full = np.full(self.row_mask.shape[0], np.nan, dtype=np.float32)
        full[self.row_mask] = self.point_scores
        return full

    @property
    def total_ms(self) -> float:
        return float(sum(self.timings.values()))


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = (time.perf_counter() - t0) * 1e3


@dataclass
class Job:
    """One scan between pre-processing and the engine: its prepared arrays, stage timings, source."""

    prep: stages.Prepared
    timings: dict[str, float]
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    row_mask: np.ndarray | None = None  # bool [R] from btp.io: which file rows were kept


class Pipeline:
    def __init__(self, model_path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                 downsample_method: str = "auto", **backend_options):
        """``backend``: ort-cpu | ort-cuda | ort-trt | trt; ``threads``: intra-op threads (None = ORT's
        default); ``backend_options`` go to the backend (e.g. ``precision="fp16"`` for trt).
        OMP_NUM_THREADS (pykdtree's kNN/interpolation) defaults to 1 for the process when unset, so
        OpenMP does not fight ORT's pool for the cores (``stages.default_openmp_threads``)."""
        stages.default_openmp_threads()
        self.model_path = Path(model_path)
        self.meta = read_model_meta(self.model_path)
        self.cfg = self.meta.config
        self.engine = make_backend(backend, self.model_path, self.meta, threads=threads, **backend_options)
        self.downsample_method = downsample_method

    def __call__(self, points) -> Result:
        return self.run_batch([points])[0]

    def run_batch(self, sources, batch_size: int | None = None) -> list[Result]:
        """Score several scans; the engine sees them ``batch_size`` at a time (default: all, or the
        model's fixed batch). Raises on the first bad input (btp-run uses prepare/infer/finish to
        skip bad files instead)."""
        jobs = [self.prepare(s) for s in sources]
        return self.infer(jobs, batch_size)

    # ---- pre-processing ------------------------------------------------------------------
    def prepare(self, source) -> Job:
        cfg, t = self.cfg, {}
        with _timed(t, "load"):
            if isinstance(source, (str, Path)):
                cloud, notes = stages.read_with_warnings(source, cfg)
            else:
                cloud, notes = stages.load(source, cfg), []
        with _timed(t, "sanitize"):
            raw = stages.sanitize(cloud, cfg)  # [M, 3]
        if cfg.preprocess.normalize == "unit_sphere_raw":  # the whole scan first, then sample it
            with _timed(t, "normalize"):
                normed_raw, centre, scale = stages.normalize_points(raw)  # [M, 3]
            with _timed(t, "downsample"):
                sample_idx = stages.downsample_points(normed_raw, cfg, self.downsample_method)  # [N]
                points = normed_raw[sample_idx]  # [N, 3]
        else:
            with _timed(t, "downsample"):
                sample_idx = stages.downsample_points(raw, cfg, self.downsample_method)  # [N]
            with _timed(t, "normalize"):
                points, centre, scale = stages.normalize_points(raw[sample_idx])  # [N, 3]
        with _timed(t, "fps"):
            center_idx = stages.fps_centres(points, cfg)  # [G]
        with _timed(t, "group"):
            patch_idx, neighborhood, center = stages.knn_group(points, center_idx, cfg)  # [G,K], [G,K,C], [G,3]
        prep = stages.Prepared(raw, sample_idx, points, center_idx, patch_idx, neighborhood, center, centre, scale)
        if len(sample_idx) < cfg.preprocess.num_points:
            notes.append(f"scan has {len(raw)} points, fewer than the model's N = {cfg.preprocess.num_points}: "
                         "all of them were scored (patches cover more surface than in training)")
        return Job(prep, t, cloud.path, tuple(notes), cloud.row_mask)

    # ---- engine + post-processing ----------------------------------------------------------
    def infer(self, jobs: list[Job], batch_size: int | None = None) -> list[Result]:
        fixed = self.meta.batch
        step = fixed or batch_size or max(len(jobs), 1)
        if getattr(self.engine, "max_batch", None):  # a TensorRT profile's largest batch
            step = min(step, int(self.engine.max_batch))
        results: list[Result] = []
        for start in range(0, len(jobs), step):
            chunk = jobs[start:start + step]
            neighborhood = np.stack([j.prep.neighborhood for j in chunk])  # [B, G, K, C]
            center = np.stack([j.prep.center for j in chunk])  # [B, G, 3]
            if fixed and len(chunk) < fixed:  # a fixed-batch graph: pad with copies of the first scan
                pad = fixed - len(chunk)
                neighborhood = np.concatenate([neighborhood, np.repeat(neighborhood[:1], pad, 0)])
                center = np.concatenate([center, np.repeat(center[:1], pad, 0)])
            t_engine = {}
            with _timed(t_engine, "engine"):
                outputs = self.engine.run(neighborhood, center)
            results += [self.finish(job, outputs, b, t_engine["engine"], len(chunk)) for b, job in enumerate(chunk)]
        return results

    def finish(self, job: Job, outputs: dict[str, np.ndarray], b: int, engine_ms: float, batch: int) -> Result:
        t = dict(job.timings, engine=engine_ms)
        patch_probs = np.asarray(outputs["patch_probs"][b], dtype=np.float32)  # [G]
        with _timed(t, "propagate"):
            sampled_scores = stages.propagate(patch_probs, job.prep, self.cfg)  # [N]
        with _timed(t, "interpolate"):
            point_scores = stages.interpolate(sampled_scores, job.prep, self.cfg)  # [M]
        with _timed(t, "object"):
            score = stages.object_score(outputs, b)
        global_prob = float(outputs["global_prob"][b]) if "global_prob" in outputs else float("nan")
        return Result(score, point_scores, patch_probs, t, global_prob, job.prep.raw_points, job.path, batch,
                      job.warnings, job.prep.sample_idx, sampled_scores, job.row_mask)
