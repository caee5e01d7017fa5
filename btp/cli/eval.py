"""`btp eval` (owned by btp.eval). Heavy imports happen inside the command."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from btp.cli.run import backend_option
from btp.config import DEFAULT_MODEL_NAME


def evaluate(
    data: Path = typer.Option(..., "--data", help="Data-set root (Anomaly-ShapeNet or Real3D-AD layout)."),
    layout: str = typer.Option("", "--layout", help="anomaly-shapenet | real3d (auto-detected when omitted)."),
    model: Path = typer.Option(None, "--model", help="Checkpoint (.safetensors) or exported MODEL.onnx; "
                                                     f"default: the package's own {DEFAULT_MODEL_NAME} weights."),
    no_model: bool = typer.Option(False, "--no-model", help="Report the baselines only."),
    json_out: Path = typer.Option(None, "--json", help="Write the full report as JSON here."),
    classes: str = typer.Option("", "--classes", help="Comma-separated classes (default: all)."),
    baseline_model: Path = typer.Option(None, "--baseline-model",
                                        help="Learned-baseline LightGBM text model (default: "
                                             "the package's own learned-baseline.txt)."),
    fit_baseline: Path = typer.Option(None, "--fit-baseline",
                                      help="Fit the learned baseline on this labelled data set's test split "
                                           "(e.g. synthetic training classes) and save it to --baseline-model."),
    backend: str = backend_option(),
    downsample: str = typer.Option("exact", "--downsample", help="exact | auto | bucket | voxel: how scans of more "
                                   "than N points are reduced to N, for the model and the baselines (exact: the "
                                   "reference rule every committed table uses; auto: btp-run's default)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also score the surface-variation "
                                   "and learned baselines (off: the model only, e.g. a second model on the same set)."),
    trust_gt: bool = typer.Option(False, "--trust-gt", help="Take each ground-truth file's points and labels as "
                                  "they are, without checking them against their scan (as the reference loaders do)."),
    references: str = typer.Option("", "--references", help="train: each class's good train/ scans are its "
                                   "reference (btp reference build); reports the fused model in mean/classes, "
                                   "with zero-shot, reference-only, an ICP and an FPFH-bank baseline beside it."),
    shots: int = typer.Option(4, "--shots", min=2, help="With --references: the first K good train/ scans."),
    random_pose: int = typer.Option(None, "--random-pose", help="With --references: turn every test scan (and its "
                                    "ground truth) by a random rotation (any angle) drawn from this seed."),
    cad_shapes: Path = typer.Option(None, "--cad-shapes", help="With --references: each class's template is its "
                                    "mesh in this shapes folder (index.json; class names are mesh names), as `btp "
                                    "reference build --cad` makes it; the train/ scans give the bank and statistics."),
    embeddings: bool = typer.Option(False, "--embeddings", help="With --references: the references also bank the "
                                    "model's patch embeddings (btp reference build --embeddings; the model must "
                                    "give patch_embed); the fusion rules with the embedding map are reported too."),
) -> None:
    """Zero-shot evaluation: O-AUROC, P-AUROC, AU-PRO, O-AP, P-AP, O-F1max per class and mean."""
    from rich.console import Console

    from btp.errors import BTPError
    from btp.eval.baselines import LearnedBaseline, fit_learned_baseline
    from btp.eval.evaluate import DEFAULT_LEARNED_BASELINE, evaluate as run_eval, load_scorer
    from btp.io import LAYOUTS, iter_samples, list_classes
    from btp.train.progress import Progress

    console = Console(stderr=True)
    if layout and layout not in LAYOUTS:
        raise typer.BadParameter(f"{layout!r}: choose one of {', '.join(LAYOUTS)}", param_hint="--layout")
    chosen = [c.strip() for c in classes.split(",") if c.strip()] or None
    try:
        from btp.geometry.sampling import DOWNSAMPLE_METHODS

        if downsample not in DOWNSAMPLE_METHODS:
            raise typer.BadParameter(f"{downsample!r}: choose one of {', '.join(DOWNSAMPLE_METHODS)}",
                                     param_hint="--downsample")
        scorer = None if no_model else load_scorer(model, backend, downsample)
        learned = None
        if fit_baseline is not None:
            overlap = set(list_classes(fit_baseline)) & set(chosen or list_classes(data))
            if overlap:
                console.print(f"[yellow]warning: the learned baseline is fitted on classes that are also "
                              f"evaluated ({', '.join(sorted(overlap))}): not zero-shot")
            console.print(f"fitting the learned baseline on {fit_baseline} ...")
            pre = scorer.cfg.preprocess if scorer is not None and getattr(scorer, "cfg", None) else None
            learned = fit_learned_baseline(iter_samples(fit_baseline, split="test"),
                                           num_points=pre.num_points if pre else None)
            if baseline_model is not None:
                learned.save(baseline_model)
                console.print(f"saved the learned baseline to {baseline_model}")
        elif baseline_model is not None:
            learned = LearnedBaseline.load(baseline_model)
        elif DEFAULT_LEARNED_BASELINE.is_file():
            learned = LearnedBaseline.load(DEFAULT_LEARNED_BASELINE)
        with Progress("eval", None, unit="scans") as bar:  # a bar on a terminal, else a line with the ETA every 30 s
            def progress(done: int, total: int) -> None:
                bar.update(done, total=total)

            if references:
                from btp.eval.references import evaluate_references

                if references != "train":
                    raise typer.BadParameter(f"{references!r}: the one source of references is train",
                                             param_hint="--references")
                if scorer is None:
                    raise typer.BadParameter("--references needs the model (its zero-shot map is fused)",
                                             param_hint="--no-model")
                from btp.runtime.guided import EMBEDDING_SETTINGS, Settings
                from btp.train.split import read_index

                if embeddings and getattr(scorer, "embed", None) is None:
                    raise typer.BadParameter(f"{model}: this model gives no patch embeddings (export it with "
                                             "`btp-export --patch-embed`)", param_hint="--embeddings")

                report = evaluate_references(data, scorer, layout=layout or None, classes=chosen, shots=shots,
                                             random_pose=random_pose, progress=progress,
                                             settings=EMBEDDING_SETTINGS if embeddings else Settings(),
                                             cad=None if cad_shapes is None else
                                             {s.name: s.path for s in read_index(cad_shapes)})
            else:
                report = run_eval(data, layout=layout or None, classes=chosen, scorer=scorer, learned=learned,
                                  baselines=baselines, downsample=downsample, verify_gt=not trust_gt,
                                  progress=progress)
    except (BTPError, FileNotFoundError) as err:
        typer.echo(f"btp eval: {err}", err=True)
        raise typer.Exit(code=2) from None
    print_report(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=1, default=str))
        typer.echo(f"wrote {json_out}")
    for cls, why in (report["data"].get("empty_classes") or {}).items():
        typer.echo(f"btp eval: class {cls} left out: {why}", err=True)
    failed = report["data"].get("failed") or []
    for f in failed:
        typer.echo(f"btp eval: left out {f['file']}: {f['error']}", err=True)
    if failed:
        typer.echo(f"btp eval: {len(failed)} test samples could not be scored and are not in the metrics", err=True)
        raise typer.Exit(code=1)




def print_report(report: dict) -> None:
    """One rich table per method: rows = classes + mean, columns = metrics (x100)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from btp.eval.evaluate import SHOWN_KEYS, table_rows

    console = Console()
    if not console.is_terminal:  # files and pipes: do not squeeze the metric columns to 80 characters
        console = Console(width=max(console.width, 150))
    data = report["data"]
    fused = " fused with the references" if data.get("references") else ""
    # (title, section, its key in data.notes)
    sections = ([("model: " + (report["model"] or {}).get("name", "-") + fused, report, "model")]
                if report.get("classes") else [])
    for key, title in (("baseline", "baseline: surface variation (training-free)"),
                       ("zero_shot", "zero-shot (the model alone)"), ("reference_only", "reference only"),
                       ("icp_baseline", "baseline: coarse-to-fine ICP + 16-NN distance"),
                       ("fpfh_baseline", "baseline: FPFH memory bank"),
                       ("learned_baseline", "learned baseline: covariance features + LightGBM")):
        if report.get(key):
            sections.append((title, report[key], key))
    for title, section, method in sections:
        table = Table(title=f"{title} - {data['layout']} {data['root']}", title_justify="left")
        table.add_column("class")
        for key in SHOWN_KEYS:
            table.add_column(key, justify="right")
        for name, metrics in table_rows(section):
            cells = [("-" if metrics.get(k) is None else f"{100 * metrics[k]:.1f}") for k in SHOWN_KEYS]
            table.add_row(f"[bold]{name}" if name == "mean" else name, *cells)
        console.print(table)
        for cls, reasons in (data.get("notes") or {}).get(method, {}).items():
            first = next(iter(reasons.values()))
            more = len(set(reasons.values())) - 1
            console.print(f"  {cls}: {', '.join(reasons)} shown as - ({escape(first)}"
                          + (f"; {more} similar reason(s) in --json data.notes" if more else "") + ")")
    console.print(f"point metrics: {data['point_metrics']}")
    if data.get("ms_per_scan"):
        console.print("scoring time per scan (ms, whole path incl. preprocessing): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in data["ms_per_scan"].items()))


def eval_sets(
    out: Path = typer.Option(..., "--out", help="Output root: <maker>-<layout>/ per set + sets.json."),
    shapes: Path = typer.Option(..., "--shapes", help="Meshes + index.json: shared/data/shapes or the `btp data corpus` folder."),
    good: int = typer.Option(4, "--good", min=1, help="Normal test scans per held-out mesh."),
    bad: int = typer.Option(8, "--bad", min=1, help="Anomalous test scans per held-out mesh."),
    train: int = typer.Option(4, "--train", min=0, help="Good train/ scans per mesh (other poses and samplings "
                              "than the test scans): the references of `btp eval --references train`."),
    makers: str = typer.Option("synth,mesh", "--makers", help="synth (the training maker) and/or mesh (eval only)."),
    layouts: str = typer.Option("anomaly-shapenet,real3d", "--layouts", help="anomaly-shapenet and/or real3d."),
    split: str = typer.Option("heldout", "--split", help="heldout (test sets) | train (data to fit a learned "
                              "baseline on; training maker only) | validation (the validation families "
                              "of `btp train --validate`, to compare its models on raw scans)."),
    points: int = typer.Option(8192, "--points", min=64, help="Points per scan (8192 as the training data; "
                               "e.g. 100000 for scanner density)."),
    partial: bool = typer.Option(False, "--partial", help="Single-view partial scans: what one camera sees "
                                 "(open borders, at most --points points; defective scans seen from the "
                                 "defect's side); sets named <maker>-<layout>-partial."),
    classes: str = typer.Option("", "--classes", help="Comma-separated meshes of the split (default: all)."),
) -> None:
    """Held-out test sets of the zero-shot split from both defect makers (the training one and the
    evaluation-only mesh editor, btp.eval.meshdefects), in both public layouts."""
    from btp.eval.sets import LAYOUT_SEEDS, MAKERS, SPLIT_SEED_OFFSETS, write_eval_sets

    chosen_makers = [m.strip() for m in makers.split(",") if m.strip()]
    chosen_layouts = [x.strip() for x in layouts.split(",") if x.strip()]
    bad_args = [m for m in chosen_makers if m not in MAKERS] + [x for x in chosen_layouts if x not in LAYOUT_SEEDS]
    if bad_args or not chosen_makers or not chosen_layouts:
        raise typer.BadParameter(f"unknown or missing makers/layouts {bad_args}: makers {MAKERS}, layouts "
                                 f"{tuple(LAYOUT_SEEDS)}")
    if split not in SPLIT_SEED_OFFSETS:
        raise typer.BadParameter(f"{split!r}: choose one of {tuple(SPLIT_SEED_OFFSETS)}", param_hint="--split")
    try:
        write_eval_sets(shapes, out, good=good, bad=bad, train=train, makers=chosen_makers, layouts=chosen_layouts,
                        split=split, points=points, partial=partial,
                        classes=[c.strip() for c in classes.split(",") if c.strip()] or None, log=typer.echo)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--makers") from None
