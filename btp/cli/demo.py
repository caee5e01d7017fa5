"""`btp demo`: the README's main job, offline, on samples the package makes itself.

1. model.onnx: the default model's weights (btp/assets/models/<DEFAULT_MODEL_NAME>.safetensors) exported once with
   btp-export's code into a cache (``$BTP_CACHE`` or ./.btp-cache), keyed by the weights' sha256;
   without committed weights a freshly initialised model of its preset is exported and labelled UNTRAINED.
2. sample scans: the MIT meshes shipped in btp/data, sampled area-weighted, one good scan and
   two with synthetic defects (btp.train.synth: bulge, dent, hole, crack, groove, broken) each,
   written as .pcd files like a scanner would.
3. the btp-run code path (btp.runtime.run.run_files) -> <stem>.json/.npy/.ply/.png per scan.
4. a rich table: file, true defect, object score, anomalous region size, latency.
"""
from __future__ import annotations

import os
from pathlib import Path

from btp.errors import BTPError
from btp.config import DEFAULT_MODEL_NAME


class DemoError(BTPError, RuntimeError):
    """The demo cannot run here; the message says what is missing and the fix."""


DEMO_POINTS = 8192  # raw points per sample scan (the model samples its N of them: 4096 for the default)
DEMO_DEFECTS = (("dent", "hole"), ("bulge", "groove"), ("crack", "broken"))


def cache_dir() -> Path:
    return Path(os.environ.get("BTP_CACHE", ".btp-cache"))


def cached_onnx(model: str, console) -> Path:
    """Export ``model`` once per weights hash into the cache; reuse it afterwards (no torch then)."""
    from btp.io.locations import model_search_paths
    from btp.io.files import file_sha256
    from btp.runtime.metadata import ModelMetadataError, read_model_meta

    if model.endswith(".onnx"):  # an exported model: nothing to export
        read_model_meta(model)
        console.print(f"model: {model}")
        return Path(model)
    ckpt = Path(model) if Path(model).is_file() else next((p for p in model_search_paths(model) if p.is_file()), None)
    key = file_sha256(ckpt)[:12] if ckpt is not None else "fresh-init-seed0"
    name = ckpt.stem if ckpt is not None else model
    path = cache_dir() / "onnx" / f"{name}-{key}.onnx"
    if path.is_file():
        try:
            read_model_meta(path)
            console.print(f"model: {path} (cached export)")
            return path
        except ModelMetadataError:
            path.unlink()
    try:
        import torch  # noqa: F401  (only the first export needs it)
    except ImportError as exc:
        raise DemoError(f"exporting {model} to ONNX needs torch ({exc}): install the [train] extra "
                        "(`make demo` does), or pass an exported model: btp demo --model model.onnx") from None
    from btp.export.onnx import export_onnx, load_model

    loaded = load_model(str(ckpt) if ckpt is not None else model)
    console.print(f"exporting {loaded.info['name']} ({loaded.info['source']}) to {path} ...")
    result = export_onnx(loaded, path, log=lambda msg: console.print(f"  {msg}"))
    console.print(f"  parity vs PyTorch {result.verdict}, {result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s")
    return path


def make_samples(folder: Path, num_points: int = DEMO_POINTS) -> dict[Path, dict]:
    """One good + two defective scans per shipped mesh -> {scan path: {"defect", "true_fraction", "truth"}}
    (truth: the points the synthetic defect changed, bool per point of the scan file)."""
    import numpy as np

    from btp.export.samples import shipped_meshes
    from btp.io import write_point_cloud
    from btp.train.synth import SynthConfig, load_shape, make_anomalous, make_normal

    cfg = SynthConfig(num_points=num_points)
    samples: dict[Path, dict] = {}
    for i, mesh in enumerate(shipped_meshes()):
        shape = load_shape(mesh, mesh.stem)
        made = [("good", make_normal(shape, seed=100 * i, cfg=cfg))]
        for j, kind in enumerate(DEMO_DEFECTS[i % len(DEMO_DEFECTS)]):
            made.append((kind, make_anomalous(shape, seed=100 * i + j + 1, cfg=cfg, defect=kind)))
        for label, sample in made:
            path = folder / f"{mesh.stem}_{label}.pcd"
            if not path.is_file():
                write_point_cloud(path, sample.points)
            samples[path] = {"defect": sample.defect or "-", "true_fraction": sample.anomalous_fraction,
                             "truth": np.asarray(sample.labels, dtype=bool)}
    return samples


def run_demo(out: Path, *, model: str = DEFAULT_MODEL_NAME, backend: str = "ort-cpu", png: bool = True) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from btp.runtime import outputs
    from btp.runtime.report import TRUTH_DIR
    from btp.runtime.pipeline import Pipeline
    from btp.runtime.run import run_files

    console = Console()
    if console.width < 120:  # the table has 7 columns; don't squeeze it on a narrow or non-tty console
        console = Console(width=120)
    try:
        for folder in (out, out / "scans", out / "results"):
            outputs.check_output_dir(folder)
        onnx_path = cached_onnx(model, console)
        pipeline = Pipeline(onnx_path, backend=backend)
    except (BTPError, ValueError, OSError) as exc:
        console.print(f"[red]btp demo: {escape(str(exc))}")
        return 2
    fresh = bool(pipeline.meta.model.get("fresh_init"))
    if fresh:
        console.print(f"[bold yellow]No trained weights found for {model} ($BTP_MODELS or the package's own): "
                      f"this demo runs a FRESHLY INITIALISED, UNTRAINED {pipeline.meta.name}. The pipeline is real; "
                      "the scores carry no meaning.")
    samples = make_samples(out / "scans")
    outcomes = run_files(pipeline, list(samples), out / "results", heatmaps=("ply", "png") if png else ("ply",),
                         backend=backend)
    outputs.write_summary(out / "results", outcomes, pipeline.model_path)
    truths = {oc.stem: samples[oc.file]["truth"] for oc in outcomes}  # the demo knows the true defects
    for oc in outcomes:
        if oc.ok:
            outputs.write_npy(out / "results" / TRUTH_DIR / f"{oc.stem}.npy", truths[oc.stem])
    page = outputs.write_report(out / "results", outcomes, title="btp demo: inspection report",
                                model=pipeline.meta.name, truths=truths)
    title = escape(f"btp demo: {pipeline.meta.name}" + (" [UNTRAINED fresh init]" if fresh else "") + f" on {backend}")
    table = Table(title=title)
    table.add_column("file", no_wrap=True)
    for col, just in (("true defect", "left"), ("object score", "right"), ("anomalous region", "right"),
                      ("true region", "right"), ("latency ms", "right"), ("engine ms", "right")):
        table.add_column(col, justify=just)
    for oc in outcomes:
        info = samples[oc.file]
        if not oc.ok:
            table.add_row(oc.file.name, info["defect"], "[red]failed", escape(oc.error or ""), "", "", "")
            continue
        ps = oc.point_scores
        table.add_row(oc.file.name, info["defect"], f"{oc.object_score:.4f}",
                      f"{ps.anomalous_points} pts ({100 * ps.anomalous_fraction:.1f}%)",
                      f"{100 * info['true_fraction']:.1f}%", f"{oc.total_ms:.0f}", f"{oc.timings_ms['engine']:.0f}")
    console.print(table)
    scoring = pipeline.meta.config.scoring
    score = ("mean probability of the patches containing them" if scoring.selfsim_point_weight <= 0 else
             f"mean probability of the patches containing them, + {scoring.selfsim_point_weight:g} x (how unlike "
             f"the rest of the part the point is - {scoring.selfsim_point_center:g}), in [0, 1]")
    console.print(f"anomalous region = raw points whose score ({score}) is >= {scoring.point_threshold:.3g}, the "
                  "model's point threshold (point-F1-max on its training samples; 0.5 if uncalibrated); true "
                  "region = points the synthetic defect changed.")
    console.print(f"heat maps and per-point scores: {out / 'results'} (<stem>.ply / .png / .npy / .json); "
                  f"scans: {out / 'scans'}")
    console.print(f"[bold]inspection report: {page}[/bold] (open it in a browser: table, heat maps, 3D views)")
    if not fresh:
        console.print(f"[yellow]How far to trust these scores: read the model card (models/{pipeline.meta.name}.md) - "
                      "its held-out results (synthetic defects on unseen meshes) say what this model can and "
                      "cannot detect; the demo shows the pipeline, not a quality claim.")
    return 0 if all(oc.ok for oc in outcomes) else 1


