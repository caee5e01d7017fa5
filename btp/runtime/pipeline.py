"""``Pipeline``: a raw scan in, an object score and a per-point anomaly map out (torch-free).

    pipe = Pipeline("model.onnx")                 # everything else comes from the ONNX metadata
    result = pipe(points)                         # [M, 3] array, PointCloud or a file path
    result.object_score, result.point_scores      # float, float32 [M] in the input's order
    results = pipe.run_batch(["a.pcd", "b.ply"])  # one engine call per batch

Read top to bottom, ``prepare`` -> ``infer`` -> ``finish`` is the data flow of one scan, with a
timing per stage (ms):

    load (btp.io) -> the chain of btp.geometry.prepare: sanitize, downsample (N), normalize,
    fps (G), group (K) -> engine (the backend: neighborhood [B,G,K,C], center [B,G,3] ->
    patch_probs [B,G], object_score [B]) -> propagate (patch -> N points) -> interpolate
    (N -> raw M points) -> Result

With ``preprocess="cuda"`` / ``"cuda-emu"`` the chain runs as our kernels on the device instead
(``btp.runtime.device.DeviceChain``: stages preprocess, engine, postprocess; one scan per engine call).
"""
from __future__ import annotations

import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from btp.geometry.prepare import (Prepared, ScanMaps, check_scan, engine_batch, min_points, prepare, score_maps,
                                  scores_to_raw, shown_map)
from btp.geometry.sampling import DOWNSAMPLE_METHODS, anchored_order
from btp.geometry.scores import interpolate_to_raw, object_score
from btp.io import PointCloud, read_point_cloud
from btp.io.pointcloud import centered
from btp.runtime.backends import make_backend
from btp.runtime.device import DeviceChain, PreprocessError, resolve_preprocess
from btp.runtime.guided import Embedded, GuidedResult, ReferenceSet
from btp.runtime.metadata import read_model_meta


@dataclass(frozen=True, kw_only=True)
class Result:
    """Scores of one scan.

    object_score    float          alpha * global_prob + (1 - alpha) * a top mean (scoring.object_source)
    point_scores    float32 [M]    per raw point, in the input's order (the map shown, sampled_scores carried)
    patch_probs     float32 [G]    per FPS patch
    timings         {stage: ms}    load, sanitize, downsample, normalize, fps, group, engine, propagate,
                                   [selfsim], interpolate (cpu) or load, preprocess, engine, postprocess,
                                   [selfsim, point_map] (cuda); then object_score; engine = the whole
                                   batch call; selfsim with a config that reads self-similarity
    global_prob     float          the global head's probability (NaN if the graph has none)
    points          float32 [M, 3] the raw points the scores belong to
    sampled_idx     int64 [N]      the downsampled points (indices into points)
    sampled_scores  float32 [N]    their scores before interpolation (the map shown: the model's, with
                                   the self-similarity point term when the config has one)
    row_mask        bool [R]       which rows of the file were kept (None = all)
    offset          float64 [3]    points + offset = the scan's own coordinates, when a float64 scan
                                   was centered before the float32 cast (None: points are the scan's)
    reference       GuidedResult   with ``Pipeline(..., reference=...)``: the part, registration,
                                   reference and fused maps, the part's decision (btp.runtime.guided)
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
    sampled_idx: np.ndarray | None = field(default=None, repr=False)
    sampled_scores: np.ndarray | None = field(default=None, repr=False)
    row_mask: np.ndarray | None = field(default=None, repr=False)
    offset: np.ndarray | None = field(default=None, repr=False)
    reference: GuidedResult | None = field(default=None, repr=False)

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


@dataclass(kw_only=True)
class Job:
    """One scan between loading and the engine: its prepared arrays (None when the chain runs on
    the device), stage timings so far, source file, warnings and which file rows were kept."""

    raw: np.ndarray
    prep: Prepared | None
    timings: dict[str, float]
    path: Path | None = None
    warnings: tuple[str, ...] = ()
    row_mask: np.ndarray | None = None
    offset: np.ndarray | None = None


class Pipeline:
    def __init__(self, model_path: str | Path, backend="auto", threads: int | None = None, *,
                 preprocess: str = "auto", downsample: str = "auto", reference=None, **backend_options):
        """``backend``: a name of ``btp.contract.BACKENDS`` (ort-cpu, trt, ...), ``auto`` (the one the
        model's precision runs on: ort-cpu, or openvino-bf16 for a bf16 model), or a backend object
        (``run(neighborhood, center) -> outputs``, e.g. the benchmarks' PyTorch row); ``threads``: intra-op threads (None = ORT's
        default); ``preprocess``: auto | cpu | cuda | cuda-emu (btp.runtime.device); ``downsample``:
        auto | exact | bucket | voxel for scans of more than N points (exact: the reference rules,
        also for the interpolation's ties; auto: the voxel rule, whose way back to the raw scan is
        a gather, or up to 8N points in the canonical order the anchored bucket FPS over all points,
        btp.geometry.sampling.resolve_method); ``backend_options`` go to the backend (e.g.
        ``precision="fp16"`` for trt); ``reference``: a ``.btpref`` file, a folder of them (one per
        part, routed by btp.runtime.reference.ROUTING_RULE) or {part: Reference}: every scan is then
        also scored against its part (``Result.reference``); a reference built for another model
        file is refused (ReferenceError)."""
        if downsample not in DOWNSAMPLE_METHODS:
            raise PreprocessError(f"downsample={downsample!r}; choose one of {', '.join(DOWNSAMPLE_METHODS)}")
        default_openmp_threads()
        self.model_path = Path(model_path)
        self.meta = read_model_meta(self.model_path)
        self.cfg = self.meta.config
        self.preprocess, self.preprocess_reason = resolve_preprocess(preprocess, self.cfg, downsample)
        self.downsample = "exact" if self.preprocess != "cpu" else downsample
        self.backend = backend if not isinstance(backend, str) else make_backend(
            backend, self.model_path, self.meta, threads=threads, device_resident=self.preprocess == "cuda",
            **backend_options)
        self.device_chain = DeviceChain(self.cfg, self.backend, self.preprocess) if self.preprocess != "cpu" else None
        self.references = None if reference is None else load_references(reference, self.model_path)

    def __call__(self, source) -> Result:
        return self.run_batch([source])[0]

    def run_batch(self, sources, batch_size: int | None = None) -> list[Result]:
        """Score several scans; the engine sees them ``batch_size`` at a time (default: all, or the
        model's fixed batch). Raises on the first bad input (btp-run skips bad files instead)."""
        return self.infer([self.prepare(s) for s in sources], batch_size)

    def prepare(self, source) -> Job:
        """Read the scan and, on the CPU, run the chain up to the engine's inputs."""
        t: dict[str, float] = {}
        with _timed(t, "load"):
            cloud, notes = load(source, self.cfg)
        timer = partial(_timed, t)
        if self.device_chain is not None:  # the kernels run in infer, one scan at a time
            with timer("sanitize"):
                raw, prep = check_scan(cloud.points, self.cfg, cloud.path), None
        else:
            prep = prepare(cloud.points, self.cfg, self.downsample, where=cloud.path, timer=timer)
            raw = prep.raw_points
        if len(raw) < self.cfg.preprocess.num_points:
            notes.append(f"scan has {len(raw)} points, fewer than the model's N = {self.cfg.preprocess.num_points}: "
                         "all of them were scored (patches cover more surface than in training)")
        return Job(raw=raw, prep=prep, timings=t, path=cloud.path, warnings=tuple(notes), row_mask=cloud.row_mask,
                   offset=cloud.offset)

    def infer(self, jobs: list[Job], batch_size: int | None = None) -> list[Result]:
        """The engine on the prepared jobs, ``batch_size`` at a time, then ``finish`` each one."""
        if self.device_chain is not None:
            return [self.finish_on_device(job) for job in jobs]
        step = self.meta.batch or batch_size or max(len(jobs), 1)
        step = min(step, getattr(self.backend, "max_batch", None) or step)  # a TensorRT profile's largest batch
        results: list[Result] = []
        for start in range(0, len(jobs), step):
            chunk = jobs[start:start + step]
            neighborhood, center = engine_batch([job.prep for job in chunk], self.meta.batch)
            t_engine: dict[str, float] = {}
            with _timed(t_engine, "engine"):
                outputs = self.backend.run(neighborhood, center)
            results += [self.finish(job, outputs, b, t_engine["engine"], len(chunk)) for b, job in enumerate(chunk)]
        return results

    def finish(self, job: Job, outputs: dict[str, np.ndarray], b: int, engine_ms: float, batch: int) -> Result:
        """Row ``b`` of the engine's outputs -> scores of the sampled points -> of every raw point."""
        t = dict(job.timings, engine=engine_ms)
        patch_probs = np.asarray(outputs["patch_probs"][b], dtype=np.float32)  # [G]
        point_probs = outputs.get("patch_point_probs")  # [B, G, K] from a model with per-point scores
        maps = score_maps(patch_probs, job.prep, self.cfg, exact=self.downsample == "exact", timer=partial(_timed, t),
                          point_probs=None if point_probs is None else point_probs[b])
        return _result(self.cfg, job=job, outputs=outputs, row=b, timings=t, maps=maps, sample_idx=job.prep.sample_idx,
                       batch=batch, references=self.references, embed=self.embed)

    def finish_on_device(self, job: Job) -> Result:
        """The whole chain of one scan on the device (btp.runtime.device.DeviceChain)."""
        t = dict(job.timings)
        if self.cfg.preprocess.sampling_order != "canonical":
            got = self.device_chain.run(job.raw, partial(_timed, t))
            point_scores, sample_idx = got.point_scores, got.sample_idx
        else:  # the kernels take rows in their order and start at row 0: hand them the anchored
            # canonical one (the CPU chain's exact rule and small-scan order), and map back
            with _timed(t, "canonical_order"):
                order = anchored_order(job.raw)
            got = self.device_chain.run(job.raw[order], partial(_timed, t))
            point_scores = np.empty_like(got.point_scores)
            point_scores[order] = got.point_scores
            sample_idx = order[got.sample_idx]
        maps = _device_maps(self.cfg, job.raw, sample_idx, got.sampled_scores, point_scores, partial(_timed, t))
        return _result(self.cfg, job=job, outputs=got.outputs, row=0, timings=t, maps=maps, sample_idx=sample_idx,
                       batch=1, references=self.references, embed=self.embed)

    @property
    def has_embeddings(self) -> bool:
        """Whether the model file gives its patch embeddings (``btp-export --patch-embed``)."""
        return "patch_embed" in self.meta.io.get("outputs", {})

    def embed(self, points: np.ndarray):
        """The model's patch embeddings of a scan [M,3] (the engine's ``patch_embed`` row, float32
        [G,D]) and a function spreading per-patch values [G] to the scan's points [M] as the patch
        scores are spread (``btp.runtime.guided.Embedded``). The CPU chain prepares the scan, also
        where the scores' chain runs on the device."""
        if not self.has_embeddings:
            raise ValueError(f"{self.model_path} has no patch_embed output: export it with `btp-export --patch-embed`")
        prep = prepare(np.ascontiguousarray(points, dtype=np.float32), self.cfg, self.downsample)
        neighborhood, center = engine_batch([prep], self.meta.batch)
        outputs = self.backend.run(neighborhood, center)
        exact = self.downsample == "exact"

        def spread(values: np.ndarray) -> np.ndarray:
            return scores_to_raw(np.asarray(values, dtype=np.float32), prep, self.cfg, exact=exact)[1]

        return Embedded(np.asarray(outputs["patch_embed"][0], dtype=np.float32), spread)

def load_references(reference, model_path: Path) -> ReferenceSet:
    """``reference`` (a .btpref file, a folder of them, or {part: Reference}) -> a ReferenceSet,
    each reference checked against the model file's sha256."""
    from btp.io.files import file_sha256
    from btp.runtime.reference import check_model, read_references

    refs = reference if isinstance(reference, dict) else read_references(reference)
    sha = file_sha256(model_path)
    for ref in refs.values():
        check_model(ref, sha, model_path)
    return ReferenceSet(refs)


def _device_maps(cfg, raw: np.ndarray, sample_idx: np.ndarray, model: np.ndarray, point_scores: np.ndarray,
                 timer) -> ScanMaps:
    """``score_maps`` for the device chain, which gives the model's map at the sampled points and
    carried to the raw points: with a self-similarity point map the shown map is carried again on
    the CPU by the exact rule (the kernel's, stage "point_map")."""
    shown, selfsim = shown_map(model, raw[sample_idx], cfg, timer)
    if float(cfg.scoring.selfsim_point_weight) > 0:
        with timer("point_map"):
            point_scores = interpolate_to_raw(raw[sample_idx], shown, raw, method=cfg.scoring.raw_interpolation)
    return ScanMaps(model=model, sampled=shown, raw=point_scores, selfsim=selfsim)


def _result(cfg, *, job: Job, outputs: dict[str, np.ndarray], row: int, timings: dict[str, float], maps: ScanMaps,
            sample_idx: np.ndarray, batch: int, references: ReferenceSet | None = None, embed=None) -> Result:
    """Row ``row`` of a batch of ``batch`` scans: the engine's outputs, the maps of the ``sample_idx``
    points and of every raw point (``maps``) -> Result; with
    ``references``, the scan is also routed to its part and scored against it (stage "reference"; ``embed``:
    the model, for references that hold its patch embeddings)."""
    global_prob = float(outputs["global_prob"][row]) if "global_prob" in outputs else float("nan")
    point_scores, sampled_scores = maps.raw, maps.sampled
    guided, notes = None, job.warnings
    if references is not None:
        t0 = time.perf_counter()
        guided = references.score(job.path, job.raw, point_scores, embed)
        timings = dict(timings, reference=(time.perf_counter() - t0) * 1e3)
        warning = guided.warning()
        notes += (warning,) if warning else ()
    with _timed(timings, "object_score"):
        obj = object_score(cfg.scoring, outputs["object_score"][row], global_prob, maps.model, selfsim=maps.selfsim)
    return Result(object_score=obj,
                  point_scores=point_scores,
                  patch_probs=np.asarray(outputs["patch_probs"][row], dtype=np.float32), timings=timings,
                  global_prob=global_prob,
                  points=job.raw, path=job.path, batch_size=batch, warnings=notes, sampled_idx=sample_idx,
                  sampled_scores=sampled_scores, row_mask=job.row_mask, offset=job.offset, reference=guided)


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    t0 = time.perf_counter()
    yield
    timings[stage] = (time.perf_counter() - t0) * 1e3


def load(source, cfg) -> tuple[PointCloud, list[str]]:
    """A path (any ``btp.io`` format), a ``PointCloud`` or an array [M, 3] -> (PointCloud, the
    warnings ``btp.io`` raised, e.g. dropped NaN rows, as text). A file with fewer than max(G, K)
    finite points fails (InvalidValuesError / TooFewPointsError, naming the file). Float64
    coordinates are centered in float64 before the float32 cast (``btp.io.pointcloud.centered``), so
    a part far from the origin scores as the same part at the origin."""
    if isinstance(source, PointCloud):
        return source, []
    if not isinstance(source, (str, Path)):
        points = np.asarray(source)
        if points.ndim == 2 and points.shape[1:] == (3,) and points.dtype == np.float64 and np.isfinite(points).all():
            points, offset = centered(points)
            return PointCloud(points, offset=offset), []
        return PointCloud(points), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cloud = read_point_cloud(source, min_points=min_points(cfg), center=True)
    return cloud, [str(w.message) for w in caught]


OPENMP_DEFAULT_THREADS = "1"


def default_openmp_threads() -> bool:
    """Set ``OMP_NUM_THREADS=1`` for this process when it is unset; -> whether it was set here.

    The CPU chain's kNN and interpolation (pykdtree) run OpenMP threads, ONNX Runtime its own
    intra-op pool: two pools on the same cores oversubscribe them (the end-to-end and grouping
    costs with and without: benchmarks/results/cpu-findings-2026-11-25.md, proposal 1); at
    N = 2048 these queries are too small to gain from threads. An explicit OMP_NUM_THREADS is never
    overridden (e.g. ``OMP_NUM_THREADS=2`` on a dedicated edge box for 400k-point scans).
    OpenMP reads the variable when its runtime loads (the first pykdtree import), so this must
    run before any kNN in the process: ``Pipeline`` calls it first thing in its constructor.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return False
    os.environ["OMP_NUM_THREADS"] = OPENMP_DEFAULT_THREADS
    return True
