"""`btp eval --references train`: each class's good train/ scans as its reference (torch-free here).

Per class, the first ``shots`` train/ samples build a reference (``btp.runtime.guided.build_reference``,
with the model's zero-shot maps of them); every test scan (turned by a random rotation with
``random_pose``, its ground truth rows with it) is scored by

    model           the fused map and object score (``Settings.fusion``)       -> report "classes"/"mean"
    zero_shot       the model alone                                            -> "zero_shot"
    reference_only  max of the normalised residual and feature maps            -> "reference_only"
    fusions         every rule of ``btp.runtime.guided.FUSIONS`` the maps allow (to choose one on
                    validation sets; the embedding rules with ``settings.embedding``, which needs a
                    model that gives its patch embeddings)
    icp_baseline    coarse-to-fine ICP (3 scales, from the centroid alignment, no global step) to the
                    train scans ICP-merged into a template; point score = mean distance to the 16
                    nearest template points
    fpfh_baseline   an FPFH memory bank of the train scans (one radius, no alignment); point score =
                    distance to the nearest bank descriptor
    object score of the reference rows and baselines: mean of the top 1 % point scores

A test scan that does not register to its reference keeps the normalised zero-shot map in the
reference rows (counted in ``data.unregistered``): the metrics see every scan. A good train/ scan
that does not register to the others is left out of its class's reference
(``data.references_left_out``), as long as 2 remain.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from btp.eval.evaluate import CloudScorer, _Collected, _metrics
from btp.eval.scoring import CloudScores
from btp.geometry import knn
from btp.geometry import registration as reg
from btp.geometry.scores import top_mean
from btp.io import detect_layout, read_sample, sample_files
from btp.runtime import guided
from btp.runtime.guided import (EMBEDDING_FUSIONS, FUSIONS, OBJECT_TOP_RATIO, RESIDUAL_K, ReferenceScorer, Settings,
                                build_reference)
from btp.runtime.refbuild import cad_surface

ROWS = ("model", "zero_shot", "reference_only", "icp_baseline", "fpfh_baseline")
BASELINE_CELLS = 40.0  # both baselines' voxel = size / 40 (the ICP scales are 4, 2, 1 of it)
FPFH_BASELINE_RADIUS = 5.0  # in voxels


def random_rotation(seed: int, index: int) -> np.ndarray:
    """float64 [3,3]: a uniformly random rotation for test scan ``index`` under ``--random-pose seed``."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=np.random.default_rng([seed, index])).as_matrix()


class IcpBaseline:
    """The strong baseline when poses are close: coarse-to-fine ICP to a template + 16-NN distance."""

    def __init__(self, train: list[np.ndarray]):
        size = reg.part_size(train[0])
        self.voxel = size / BASELINE_CELLS
        first = reg.make_target(train[0], self.voxel)
        merged = [train[0]]
        for scan in train[1:]:
            merged.append(reg.transform(scan, self._icp(scan, first)))
        self.template = np.concatenate(merged).astype(np.float32)
        self.target = reg.make_target(self.template, self.voxel)

    @staticmethod
    def _icp(scan: np.ndarray, target: reg.Target) -> np.ndarray:
        shift = np.eye(4)
        shift[:3, 3] = target.points.mean(axis=0) - scan.mean(axis=0)
        # open3d's default convergence (1e-6), as the baseline is published
        return reg.icp(reg.voxel_down(scan, target.voxel), target, shift, tolerance=1e-6).transform

    def __call__(self, points: np.ndarray) -> np.ndarray:
        aligned = reg.transform(points, self._icp(points, self.target))
        _, d2 = knn(self.template, aligned, min(RESIDUAL_K, len(self.template)))
        return np.sqrt(np.maximum(d2, 0.0)).mean(axis=1).astype(np.float32)


class FpfhBaseline:
    """An FPFH memory bank without alignment (PatchCore-like on a hand-made descriptor)."""

    def __init__(self, train: list[np.ndarray], bank_size: int = 4096):
        self.voxel = reg.part_size(train[0]) / BASELINE_CELLS
        feats = np.concatenate([self._features(scan)[1] for scan in train])
        self.bank = feats[reg.greedy_coreset(feats, bank_size)]

    def _features(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cells = reg.voxel_down(points, self.voxel)
        nrm = reg.normals(cells, reg.NORMAL_RADIUS * self.voxel)
        return cells, reg.fpfh(cells, nrm, FPFH_BASELINE_RADIUS * self.voxel)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        cells, feats = self._features(points)
        return guided._to_points(cells, guided._nearest_dist(self.bank, feats), points)


def _cloud_scores(point_scores: np.ndarray, zero_shot: CloudScores) -> CloudScores:
    point_scores = np.asarray(point_scores, dtype=np.float32)
    return CloudScores(object_score=top_mean(point_scores, OBJECT_TOP_RATIO), point_scores=point_scores,
                       sampled_idx=zero_shot.sampled_idx, sampled_scores=point_scores[zero_shot.sampled_idx])


def evaluate_references(root: str | Path, scorer: CloudScorer, *, layout: str | None = None,
                        classes: list[str] | None = None, shots: int = 4, random_pose: int | None = None,
                        settings: Settings = Settings(), cad: dict[str, Path] | None = None,
                        progress: Callable[[int, int], None] | None = None) -> dict:
    """The report of the module docstring; ``mean``/``classes`` are the fused model's. ``cad``:
    {class: its mesh file}: each class's template is its CAD surface (``btp reference build
    --cad``), the train/ scans give the bank and the statistics."""
    root = Path(root)
    layout = layout or detect_layout(root)
    tests = sample_files(root, layout, "test", classes)
    trains = sample_files(root, layout, "train", classes)
    if not tests:
        raise FileNotFoundError(f"{root}: no test samples found ({layout} layout, classes {classes or 'all'})")
    by_class_train: dict[str, list] = {}
    for entry in trains:
        by_class_train.setdefault(entry.cls, []).append(entry)
    if cad is not None:
        no_mesh = sorted({e.cls for e in tests} - set(cad))
        if no_mesh:
            raise FileNotFoundError(f"no CAD mesh for classes {no_mesh} (the class names must be mesh names of the "
                                    "shapes folder given)")
    missing = sorted({e.cls for e in tests if len(by_class_train.get(e.cls, [])) < 2})
    if missing:
        raise FileNotFoundError(f"{root}: classes {missing} have fewer than 2 good train/ scans; --references train "
                                "needs them (write sets with `btp data eval-sets`, which adds 4 per class)")
    embed = getattr(scorer, "embed", None)
    if settings.embedding and embed is None:
        raise ValueError("the reference settings use the model's patch embeddings; this model does not give them "
                         "(export it with `btp-export --patch-embed`)")
    fusions = [name for name in FUSIONS if settings.embedding or name not in EMBEDDING_FUSIONS]
    rows = list(ROWS) + [f"fusion:{name}" for name in fusions]
    collected: dict[str, dict[str, _Collected]] = {r: {} for r in rows}
    seconds: dict[str, float] = {}
    unregistered: dict[str, int] = {}
    build_s: dict[str, float] = {}
    left_out: dict[str, list] = {}  # good train/ scans that did not register to the others
    failed: list[dict[str, str]] = []
    current: dict = {}
    counts: dict[str, dict[str, int]] = {}
    for done, entry in enumerate(tests, 1):
        if current.get("cls") != entry.cls:
            t0 = time.perf_counter()
            train = [read_sample(e).points for e in by_class_train[entry.cls][:shots]]
            zs_train = [scorer(p).point_scores for p in train]
            ref = build_reference(train, zs_train, name=entry.cls, model={"sha256": "eval", "name": "eval"},
                                  sources=[{"file": str(e.path)} for e in by_class_train[entry.cls][:shots]],
                                  settings=settings, embed=embed, leave_out_misfits=True,
                                  cad=None if cad is None else cad_surface(cad[entry.cls], settings.seed))
            if ref.header["left_out"]:
                left_out[entry.cls] = ref.header["left_out"]
            build_s[entry.cls] = round(time.perf_counter() - t0, 2)
            current = {"cls": entry.cls, "scorer": ReferenceScorer(ref), "icp": IcpBaseline(train),
                       "fpfh": FpfhBaseline(train)}
        try:
            sample = read_sample(entry, min_points=1)
        except (ValueError, OSError) as exc:
            failed.append({"file": str(entry.path), "error": f"{type(exc).__name__}: {exc}"})
            continue
        points = sample.points
        if random_pose is not None:
            points = (points.astype(np.float64) @ random_rotation(random_pose, done).T).astype(np.float32)
        scored = _score_one(points, scorer, current, seconds, fusions, embed)
        if not scored.pop("registered"):
            unregistered[entry.cls] = unregistered.get(entry.cls, 0) + 1
        c = counts.setdefault(sample.cls, {"good": 0, "bad": 0, "points": 0})
        c["bad" if sample.object_label else "good"] += 1
        c["points"] += int(len(points))
        moved = type(sample)(points=points, labels=sample.labels, object_label=sample.object_label, cls=sample.cls,
                              path=sample.path, split=sample.split)
        for name, scores in scored.items():
            collected[name].setdefault(sample.cls, _Collected()).add(moved, scores)
        if progress:
            progress(done, len(tests))
    report: dict = {}
    notes: dict = {}
    for name, by_class in collected.items():
        per_class, mean, notes[name] = _metrics(by_class)
        if name == "model":
            report["classes"], report["mean"] = per_class, mean
        elif name.startswith("fusion:"):
            report.setdefault("fusions", {})[name.split(":", 1)[1]] = {"classes": per_class, "mean": mean}
        else:
            report[name] = {"classes": per_class, "mean": mean}
    report["model"] = {**scorer.info(), "fusion": settings.fusion}
    report["data"] = {
        "root": str(root), "layout": layout, "classes": sorted(counts), "samples": counts, "failed": failed,
        "references": "train", "shots": shots, "random_pose": random_pose, "unregistered": unregistered,
        "settings": settings.to_dict(), "reference_build_s": build_s,
        "references_left_out": left_out,
        "cad": None if cad is None else {cls: str(cad[cls]) for cls in sorted(counts)},
        "point_metrics": "p_auroc, p_ap, p_f1max, au_pro: raw test scans' points in GT row order",
        "object_score": {"model": f"top 1 % mean of the fused map ({settings.fusion})",
                         "zero_shot": "the model's object score",
                         "reference_only": "top 1 % mean of max(normalised residual, normalised feature distance)",
                         "icp_baseline": "top 1 % mean of the 16-NN template distance after coarse-to-fine ICP",
                         "fpfh_baseline": "top 1 % mean of the FPFH bank distance"},
        "ms_per_scan": {name: round(1e3 * t / len(tests), 2) for name, t in seconds.items()},
        "notes": notes,
    }
    return report


def _score_one(points: np.ndarray, scorer: CloudScorer, current: dict, seconds: dict, fusions: list[str],
               embed=None) -> dict:
    """{row: CloudScores} of one test scan, plus "registered"."""
    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    zs = timed("zero_shot", scorer, points)
    got = timed("reference", current["scorer"], points, zs.point_scores, embed)
    ref: ReferenceScorer = current["scorer"]
    out: dict = {"zero_shot": zs, "registered": got.registered}
    if got.registered:
        raw = {"residual": got.residual, "feature": got.feature, "zero_shot": zs.point_scores}
        if got.embedding is not None:
            raw[guided.EMBEDDING] = got.embedding
        z = guided.normalised(raw, ref.ref.statistics)
        out["reference_only"] = _cloud_scores(got.reference_map, zs)
        for name in fusions:
            out[f"fusion:{name}"] = _cloud_scores(FUSIONS[name](z), zs)
        out["model"] = CloudScores(object_score=got.object_score, point_scores=got.fused, sampled_idx=zs.sampled_idx,
                                   sampled_scores=got.fused[zs.sampled_idx])
    else:
        fallback = guided.normalise(zs.point_scores, ref.ref.statistics["zero_shot"])
        for name in ["reference_only", "model", *(f"fusion:{n}" for n in fusions)]:
            out[name] = _cloud_scores(fallback, zs)
    out["icp_baseline"] = _cloud_scores(timed("icp_baseline", current["icp"], points), zs)
    out["fpfh_baseline"] = _cloud_scores(timed("fpfh_baseline", current["fpfh"], points), zs)
    return out
