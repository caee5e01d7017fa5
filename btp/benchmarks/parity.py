"""`btp-bench parity`: the thin runner that feeds the same samples to a reference and test backends.

For each test sample of a data set (Anomaly-ShapeNet / Real3D-AD layout, read by btp.io):

1. Engine level (identical inputs): the sample is preprocessed once on the CPU by the runtime's
   own stages (``Pipeline.prepare``: downsample, normalize, FPS + kNN group); the same ``neighborhood``/``center`` go to the
   reference backend and to each test backend -> patch_probs, global_prob, object_score,
   patch_embed (when the model exports it).
2. Pipeline level (each backend's own full path): ``Pipeline(points)`` -> point scores at the
   raw scan's resolution and the object score; O-AUROC and P-AUROC (btp.metrics) on them.
3. Indices: the center and patch indices each backend's own ``Pipeline.prepare`` produces (the
   GPU kernels where a GPU pipeline uses them, btp.geometry on CPU) against ``fps_reference`` /
   ``knn_reference`` (the plain-numpy rule) on the reference's sampled points.

Everything is collected into arrays and handed to ``btp.export.compare.compare`` (the pure
comparator) with the tolerances of the backend's precision.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from btp.export.compare import compare, overall, sorted_index_sets, tolerances
from btp.benchmarks.latency import make_pipeline, precision_of, unavailable_reason


def _own_prepared(pipe, points: np.ndarray):
    """The backend pipeline's own preprocessing of a scan: our kernels when it runs them on the
    device (``pipe.device_chain``), else the CPU chain."""
    if pipe.device_chain is not None:
        from btp.geometry.prepare import check_scan

        return pipe.device_chain.kernels.run(check_scan(points, pipe.cfg))
    return pipe.prepare(points).prep


def _preprocess(pipe, points: np.ndarray) -> dict:
    """The runtime's own CPU preprocessing (``Pipeline.prepare``): engine inputs + indices."""
    prep = pipe.prepare(points).prep
    return {"sampled": prep.points, "neighborhood": prep.neighborhood[None], "center": prep.center[None],
            "center_idx": prep.center_idx, "patch_idx": prep.patch_idx}


def _reference_indices(sampled: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray]:
    from btp.geometry import fps_reference, knn_reference

    center_idx = fps_reference(sampled, cfg.encoder.num_group, cfg.preprocess.fps_start)
    patch_idx, _ = knn_reference(sampled, sampled[center_idx], cfg.encoder.group_size)
    return center_idx, patch_idx


def _metrics(object_labels, object_scores, point_labels, point_scores) -> dict:
    from btp.metrics import auroc

    out = {"o_auroc": float("nan"), "p_auroc": float("nan")}
    try:
        out["o_auroc"] = auroc(np.asarray(object_labels), np.asarray(object_scores))
    except ValueError:
        pass
    try:
        out["p_auroc"] = auroc(np.concatenate(point_labels), np.concatenate(point_scores))
    except ValueError:
        pass
    return out


def _recheck_float64(ref_engine, pre, ref_arrays, arrays, checks):
    """FP32 engine outputs that miss 1e-4 against PyTorch FP32 are re-checked against the float64
    evaluation of the reference model, with the export's rule (``btp.export.onnx.recheck_float64``:
    no farther from float64 than PyTorch FP32 is, at most ``FLOAT64_CAP``).

    The pipeline's ``point_scores`` are means of ``patch_point_probs`` over the same indices (the
    index checks say so), so when that output passed against float64, their limit becomes the
    largest ``patch_point_probs`` difference: the means cannot differ by more than what they average."""
    from dataclasses import replace

    if getattr(ref_engine, "name", "") != "torch":  # only an FP32 PyTorch reference
        return checks
    if not any(c.passed is False and c.kind == "abs" for c in checks):
        return checks
    from btp.export.compare import FP32_ABS
    from btp.export.onnx import recheck_float64

    neighborhood = np.concatenate([p["neighborhood"] for p in pre])
    center = np.concatenate([p["center"] for p in pre])
    before = {c.output: c for c in checks}
    checks = recheck_float64(ref_engine.model, neighborhood, center, ref_arrays, arrays, checks, atol=FP32_ABS)
    ppp_before, ppp = before.get("patch_point_probs"), {c.output: c for c in checks}.get("patch_point_probs")
    if ppp is None or not (ppp_before.passed is False and ppp.passed):  # not passed by the float64 rule
        return checks
    engine_diff = ppp_before.value  # the largest ORT vs PyTorch FP32 difference of what the means average
    limit = max(FP32_ABS, engine_diff)
    return tuple(
        replace(c, limit=limit, passed=bool(c.value <= limit),
                why=f"means of patch_point_probs, which passed against float64: max abs diff <= their "
                    f"largest ORT vs PyTorch FP32 difference {engine_diff:.2e}")
        if c.output == "point_scores" and c.passed is False else c
        for c in checks)


def run_parity(model_path, data_dir, *, backends: Sequence[str] = ("ort-cpu",), reference: str = "torch",
               checkpoint=None, limit: int | None = None, layout: str | None = None, threads: int | None = None,
               progress: Callable[[str], None] | None = None) -> dict:
    from btp.benchmarks.machine import describe_machine
    from btp.io import detect_layout, iter_samples
    from btp.runtime.metadata import read_model_meta

    say = progress or (lambda _msg: None)
    cfg = read_model_meta(model_path).config
    layout = layout or detect_layout(data_dir)
    samples = []
    for sample in iter_samples(data_dir, layout=layout, split="test"):
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise FileNotFoundError(f"{data_dir}: no test samples ({layout} layout)")
    say(f"{len(samples)} test samples; preprocessing on the CPU (btp.runtime, ort-cpu pipeline)")
    from btp.runtime import Pipeline

    cpu_pipe = Pipeline(model_path, backend="ort-cpu", threads=threads, preprocess="cpu")
    pre = [_preprocess(cpu_pipe, s.points) for s in samples]
    del cpu_pipe
    ref_idx = [_reference_indices(p["sampled"], cfg) for p in pre]

    def collect(name: str):
        """Engine outputs on identical inputs + the backend's own pipeline results, all samples."""
        pipe, weights = make_pipeline(name, model_path, threads=threads, checkpoint=checkpoint)
        engine = pipe.backend
        outs: dict[str, list] = {}
        point_scores, object_scores, fps_idx, knn_idx = [], [], [], []
        for s, p in zip(samples, pre):
            own = _own_prepared(pipe, s.points)  # this backend's own preprocessing (our kernels on a GPU)
            fps_idx.append(np.asarray(own.center_idx))
            knn_idx.append(sorted_index_sets(own.patch_idx))
            res = engine.run(p["neighborhood"], p["center"])
            for key in ("patch_logits", "patch_probs", "global_prob", "object_score", "patch_embed",
                        "patch_point_probs"):
                if key in res:
                    outs.setdefault(key, []).append(np.asarray(res[key])[0])
            result = pipe(s.points)
            point_scores.append(np.asarray(result.point_scores, dtype=np.float32))
            object_scores.append(float(result.object_score))
        arrays = {k: np.stack(v) for k, v in outs.items()}
        arrays["point_scores"] = np.concatenate(point_scores)
        arrays["fps_idx"], arrays["knn_idx"] = np.stack(fps_idx), np.stack(knn_idx)
        metrics = _metrics([s.object_label for s in samples], object_scores, [s.labels for s in samples],
                           point_scores)
        return arrays, metrics, weights, engine

    say(f"reference {reference}")
    ref_arrays, ref_metrics, ref_weights, ref_engine = collect(reference)
    ref_arrays["fps_idx"] = np.stack([c for c, _ in ref_idx])
    ref_arrays["knn_idx"] = np.stack([sorted_index_sets(k) for _, k in ref_idx])
    ref_arrays["o_auroc"] = np.array([ref_metrics["o_auroc"]])
    ref_arrays["p_auroc"] = np.array([ref_metrics["p_auroc"]])
    out = {"machine": describe_machine(), "model": str(model_path), "data": str(data_dir), "layout": layout,
           "n_samples": len(samples), "reference": reference, "reference_weights": ref_weights,
           "reference_metrics": ref_metrics, "backends": []}
    for name in backends:
        if name == reference:
            continue
        reason = unavailable_reason(name)
        if reason:
            out["backends"].append({"backend": name, "skipped": reason})
            say(f"{name}: skipped: {reason}")
            continue
        say(f"backend {name}")
        try:
            arrays, metrics, _, _ = collect(name)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run is a skipped row
            out["backends"].append({"backend": name, "skipped": f"{type(exc).__name__}: {exc}"})
            continue
        arrays["o_auroc"] = np.array([metrics["o_auroc"]])
        arrays["p_auroc"] = np.array([metrics["p_auroc"]])
        precision = precision_of(name)
        tols = tolerances(precision, ref_arrays, object_alpha=cfg.scoring.object_alpha,
                          global_temperature=cfg.scoring.global_temperature,
                          object_labels=np.array([s.object_label for s in samples]),
                          point_labels=np.concatenate([s.labels for s in samples]))
        checks = compare(ref_arrays, arrays, tols)
        if precision == "fp32":
            checks = _recheck_float64(ref_engine, pre, ref_arrays, arrays, checks)
        out["backends"].append({"backend": name, "precision": precision, "verdict": overall(checks),
                                "checks": [c.to_dict() for c in checks],
                                "metrics": {"o_auroc": metrics["o_auroc"], "p_auroc": metrics["p_auroc"],
                                            "o_auroc_ref": ref_metrics["o_auroc"],
                                            "p_auroc_ref": ref_metrics["p_auroc"]}})
    return out
