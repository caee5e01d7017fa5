"""Zero-shot evaluation of a data-set folder: model + baselines, per class and mean.

`evaluate(root, ...)` reads every test sample (`btp.io.iter_samples`, Anomaly-ShapeNet or
Real3D-AD layout), scores it with each method - the model (torch checkpoint or ONNX), the
training-free surface-variation baseline, the learned baseline when one is given - and
returns the report that `btp eval --json` writes:

    {"classes": {cls: {metric: value}}, "mean": {metric: value},          # the model
     "baseline": {"classes": ..., "mean": ...},                            # surface variation
     "learned_baseline": {"classes": ..., "mean": ...},                    # {} when not given
     "model": {...}, "data": {...}}

Metric values lie in [0, 1]; an undefined one (e.g. a class without anomalous samples) is
null and `data.notes` says why. `p_auroc`, `p_ap`, `p_f1max`, `au_pro` are over the raw test
scans' points in GT row order (scores carried back from the N sampled points);
`p_auroc_sampled`, `p_ap_sampled` over the N sampled points themselves.
"""
from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from btp.config import DEFAULT_MODEL_NAME, PreprocessConfig, btp_mini_config
from btp.errors import BTPError
from btp.eval.baselines import LearnedBaseline, surface_variation_scorer
from btp.metrics import EXTRA_KEYS, METRIC_KEYS, compute_metrics, mean_metrics
from btp.eval.scoring import CloudScores, score_with
from btp.io import detect_layout, read_sample, sample_files
from btp.io.errors import GroundTruthMismatchError
from btp.io.locations import asset

# the package's own files (btp/assets/models): the default model's weights and the learned baseline
DEFAULT_MODEL = asset(f"models/{DEFAULT_MODEL_NAME}.safetensors")
DEFAULT_LEARNED_BASELINE = asset("models/learned-baseline.txt")


class CloudScorer(Protocol):
    """What `evaluate` needs from a model: raw scan [M,3] -> CloudScores, plus a description."""

    def __call__(self, raw_points: np.ndarray) -> CloudScores: ...

    def info(self) -> dict: ...


@dataclass(kw_only=True)
class _Collected:
    object_labels: list[int] = field(default_factory=list)
    object_scores: list[float] = field(default_factory=list)
    point_labels: list[np.ndarray] = field(default_factory=list)
    point_scores: list[np.ndarray] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    sampled_labels: list[np.ndarray] = field(default_factory=list)
    sampled_scores: list[np.ndarray] = field(default_factory=list)

    def add(self, sample, scores: CloudScores) -> None:
        self.object_labels.append(int(sample.object_label))
        self.object_scores.append(float(scores.object_score))
        self.point_labels.append(sample.labels)
        self.point_scores.append(scores.point_scores)
        self.points.append(sample.points)
        self.sampled_labels.append(sample.labels[scores.sampled_idx])
        self.sampled_scores.append(scores.sampled_scores)


def load_scorer(model: str | Path | None, backend: str = "ort-cpu", downsample: str = "exact") -> CloudScorer:
    """A checkpoint (.safetensors, torch) or an exported model (.onnx, btp.runtime); None = default model.
    ``downsample``: the model's raw-scan rule (btp.geometry.prepare): by default the reference rule,
    as evaluation reports use it (``btp-bench rules`` measures what the runtime's auto changes)."""
    from btp.eval.scoring import OnnxScorer, TorchScorer

    path = Path(model) if model is not None else DEFAULT_MODEL
    if not path.is_file():
        if model is None:
            raise FileNotFoundError(f"the default model {path} is missing from this install of btp; pass --model "
                                    f"CKPT|MODEL.onnx, or --no-model for the baselines alone")
        raise FileNotFoundError(f"{path}: model file not found; pass a .safetensors checkpoint or a .onnx export")
    if path.suffix.lower() == ".onnx":
        return OnnxScorer(path, backend=backend, downsample=downsample)
    return TorchScorer(path, downsample=downsample)


def evaluate(root: str | Path, *, layout: str | None = None, classes: list[str] | None = None,
             scorer: CloudScorer | None = None, learned: LearnedBaseline | None = None,
             preprocess: PreprocessConfig | None = None, baselines: bool = True, downsample: str = "exact",
             verify_gt: bool = True, progress: Callable[[int, int], None] | None = None) -> dict:
    """Score every test sample of `root` and compute the metrics (see the module docstring).

    `preprocess` (N, FPS start) for the baselines: the model's when a scorer with a config is
    given, else btp-mini's; ``downsample``: their raw-scan rule (the model's is its scorer's);
    ``baselines=False`` scores the model only; ``verify_gt=False`` trusts GT files as they are
    (``btp eval --trust-gt``). `progress(done, total)` is called after every sample. Class folders
    without test samples are listed in ``data.empty_classes`` with the reason.
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    files = sample_files(root, layout, "test", classes)
    empty_classes = _empty_classes(root, layout, classes, files)
    if not files:
        raise FileNotFoundError(f"{root}: no test samples found ({layout} layout, classes {classes or 'all'})")
    cfg = getattr(scorer, "cfg", None) or btp_mini_config()
    base_cfg = dataclasses.replace(cfg, preprocess=preprocess) if preprocess is not None else cfg  # the baselines'
    pre = base_cfg.preprocess
    methods: dict[str, Callable[[np.ndarray], CloudScores]] = {}
    if scorer is not None:
        methods["model"] = scorer
    if baselines:
        methods["baseline"] = lambda raw: score_with(surface_variation_scorer, raw, base_cfg, downsample)
    if learned is not None and baselines:
        methods["learned_baseline"] = lambda raw: score_with(learned, raw, base_cfg, downsample)
    collected: dict[str, dict[str, _Collected]] = {m: {} for m in methods}
    counts: dict[str, dict[str, int]] = {}
    seconds: dict[str, float] = {}
    failed: list[dict[str, str]] = []
    scans: list[dict] = []
    for done, entry in enumerate(files, 1):
        try:  # one bad file is listed and left out; it never stops the evaluation
            sample = read_sample(entry, min_points=1, verify_gt=verify_gt)
            bad_labels = np.setdiff1d(np.unique(sample.labels), [0, 1])
            if bad_labels.size:
                raise GroundTruthMismatchError(sample.path, f"ground-truth labels {bad_labels[:5].tolist()} outside "
                                                            "{0, 1}: each point must be 0 (normal) or 1 (anomalous)")
            scored = {}
            for name, method in methods.items():
                t0 = time.perf_counter()
                scored[name] = method(sample.points)
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        except (BTPError, ValueError, OSError) as exc:
            text = str(exc).removeprefix("<array>: ")  # the scorers see the points; "file" names the scan
            failed.append({"file": str(getattr(entry, "path", entry)), "error": f"{type(exc).__name__}: {text}"})
            continue
        finally:
            if progress:
                progress(done, len(files))
        c = counts.setdefault(sample.cls, {"good": 0, "bad": 0, "points": 0})
        c["bad" if sample.object_label else "good"] += 1
        c["points"] += int(sample.points.shape[0])
        for name, scores in scored.items():
            collected[name].setdefault(sample.cls, _Collected()).add(sample, scores)
        if "model" in scored:
            scans.append({"file": str(sample.path), "class": sample.cls, "label": int(sample.object_label),
                          "object_score": float(scored["model"].object_score)})
    if not counts:
        raise FileNotFoundError(f"{root}: none of the {len(files)} test samples could be scored: "
                                + "; ".join(f"{f['file']}: {f['error']}" for f in failed[:3]))
    report: dict = {"classes": {}, "mean": {}, "learned_baseline": {}}
    notes: dict = {}
    for name, by_class in collected.items():
        per_class, mean, notes[name] = _metrics(by_class)
        if name == "model":
            report["classes"], report["mean"] = per_class, mean
        else:
            report[name] = {"classes": per_class, "mean": mean}
    report["model"] = scorer.info() if scorer is not None else None
    report["data"] = {
        "root": str(root), "layout": layout, "classes": sorted(counts), "samples": counts, "failed": failed,
        "empty_classes": empty_classes,
        "num_points": pre.num_points, "fps_start": pre.fps_start,
        "point_metrics": "p_auroc, p_ap, p_f1max, au_pro: raw test scans (GT rows, scores carried back from the "
                         f"sampled points); p_auroc_sampled, p_ap_sampled: the {pre.num_points} sampled points; "
                         "all points of a class pooled with their scores as they are (no per-scan min-max "
                         "normalisation; a global one would not change AUROC/AP)",
        "object_score": {"baseline": "mean of the top 1% point scores (surface variation, k=16)",
                         "learned_baseline": "mean of the top 1% point probabilities (LightGBM)",
                         "model": "alpha * global_prob + (1 - alpha) * mean(top patch probs)"},
        "scans": scans,  # the model's object score of each scored test scan, in reading order
        "ms_per_scan": {name: round(1e3 * t / len(files), 2) for name, t in seconds.items()},  # wall, this machine
        "notes": notes,
    }
    return {k: report.get(k, {}) for k in ("classes", "mean", "baseline", "learned_baseline", "model", "data")}


def _empty_classes(root: Path, layout: str, classes: list[str] | None, files) -> dict[str, str]:
    """Class folders (of ``classes``, or all) without a test sample -> why, for the report."""
    from btp.io import list_classes

    with_samples = {f.cls for f in files}
    empty = {}
    for cls in sorted(classes or list_classes(root, layout)):
        if cls in with_samples:
            continue
        folder = (root / cls if (root / cls).is_dir() else root) / "test"
        empty[cls] = (f"no test folder ({folder})" if not folder.is_dir()
                      else f"no test scans (*.pcd, other than templates) in {folder}")
    if classes is None and not ((root / "train").is_dir() or (root / "test").is_dir()):
        for folder in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
            if folder.name not in empty and folder.name not in with_samples:
                empty[folder.name] = f"{folder} holds no train/ or test/ folder"
    return empty


def _metrics(by_class: dict[str, _Collected]) -> tuple[dict, dict, dict]:
    per_class: dict[str, dict[str, float | None]] = {}
    raw_values: dict[str, dict[str, float]] = {}
    notes: dict[str, dict[str, str]] = {}
    for cls in sorted(by_class):
        c = by_class[cls]
        rep = compute_metrics(c.object_labels, c.object_scores, c.point_labels, c.point_scores, c.points,
                              c.sampled_labels, c.sampled_scores)
        raw_values[cls] = rep.values
        per_class[cls] = rep.json_values()
        if rep.notes:
            notes[cls] = rep.notes
    mean = {k: (None if not np.isfinite(v) else v) for k, v in mean_metrics(raw_values).items()}
    return per_class, mean, notes


def table_rows(section: dict) -> list[tuple[str, dict]]:
    """(row name, metrics) for a report section: each class, then "mean"."""
    rows = [(cls, m) for cls, m in section.get("classes", {}).items()]
    if section.get("mean"):
        rows.append(("mean", section["mean"]))
    return rows


SHOWN_KEYS: tuple[str, ...] = (*METRIC_KEYS, *EXTRA_KEYS)


def summarize_runs(reports: list[dict]) -> dict:
    """Mean and std over runs (seeds) of each method's class-mean metrics, for a model card's
    "mean ± std" rows: `{"model"|"baseline"|"learned_baseline": {metric: {"mean", "std", "n"}}}`.
    Methods or metrics missing (or null) in a run are left out of that run's numbers."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    sections = {"model": lambda r: r.get("mean") or {},
                "baseline": lambda r: (r.get("baseline") or {}).get("mean") or {},
                "learned_baseline": lambda r: (r.get("learned_baseline") or {}).get("mean") or {}}
    for name, get in sections.items():
        values: dict[str, list[float]] = {}
        for report in reports:
            for key, value in get(report).items():
                if value is not None:
                    values.setdefault(key, []).append(float(value))
        if values:
            out[name] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}
                         for k, v in values.items()}
    return out
