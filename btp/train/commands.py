"""`btp train` and `btp data ...` (owned by btp.train)."""
from __future__ import annotations

from pathlib import Path

import typer

from btp._placeholder import not_available

data_app = typer.Typer(help="Make datasets: synthetic defects on real shapes, in the public layouts.",
                       no_args_is_help=True)


def train() -> None:
    """Train a BTP model (encoder pre-training, then the BTP stage)."""
    not_available("train", "training lands with the training issue")


@data_app.command("synth")
def synth(
    shapes: Path = typer.Option(..., "--shapes", help="Folder of meshes (e.g. ../shared/data/shapes)."),
    out: Path = typer.Option(..., "--out", help="Output data-set root."),
    classes: str = typer.Option("", "--classes", help="Comma-separated class (mesh) names; default all."),
    per_class_train: int = typer.Option(4, "--per-class-train", help="Normal train samples per class."),
    per_class_test_good: int = typer.Option(6, "--per-class-test-good", help="Normal test samples per class."),
    per_class_test_bad: int = typer.Option(12, "--per-class-test-bad", help="Anomalous test samples per class."),
    points: int = typer.Option(8192, "--points", help="Points per written scan."),
    seed: int = typer.Option(0, "--seed", help="Root seed: same seed, same files."),
    layout: str = typer.Option("anomaly-shapenet", "--layout", help="anomaly-shapenet | real3d"),
    noise: float = typer.Option(0.0005, "--noise", help="Gaussian noise sigma, fraction of the object size."),
    partial: float = typer.Option(0.0, "--partial", help="Share of single-view partial scans (0..1)."),
) -> None:
    """Write synthetic defects on real shapes in the Anomaly-ShapeNet (or Real3D-AD) layout."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from btp.train.synth import LAYOUTS, SynthConfig, SynthError, SynthPlan, list_shapes, write_dataset

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"{layout!r}: choose one of {', '.join(LAYOUTS)}", param_hint="--layout")
    chosen = [c.strip() for c in classes.split(",") if c.strip()] or None
    plan = SynthPlan(per_class_train, per_class_test_good, per_class_test_bad, seed, layout)
    cfg = SynthConfig(num_points=points, noise=noise, partial_prob=partial)
    try:
        n_classes = len(chosen) if chosen else len(list_shapes(shapes))
        total = n_classes * (per_class_train + per_class_test_good + per_class_test_bad)
        with Progress(TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task("synth", total=total)
            summary = write_dataset(shapes, out, chosen, plan, cfg, progress=lambda n: bar.advance(task, n))
    except SynthError as err:
        typer.echo(f"btp data synth: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {total} scans of {len(summary['classes'])} classes ({layout}) to {out}")
