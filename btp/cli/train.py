"""`btp train` and `btp data ...` (owned by btp.train)."""
from __future__ import annotations

from pathlib import Path

import typer


data_app = typer.Typer(help="Make datasets: synthetic defects on real shapes, in the public layouts.",
                       no_args_is_help=True)


def _shapes(shapes: Path | None) -> Path:
    """--shapes (typer reads $BTP_SHAPES into it when the flag is absent); neither: a usage error."""
    from btp.io.locations import LocationError, shapes_dir

    try:
        return shapes_dir(shapes)
    except LocationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shapes") from None


def train(
    recipe: str = typer.Option("", "--recipe", help="Run a whole recipe end to end (split, pretrain, BTP): btp-mini | tiny."),
    stage: str = typer.Option("", "--stage", help="Run one stage: pretrain | btp (ignored with --recipe)."),
    config: str = typer.Option("", "--config", help="Config preset (btp-mini, ulip2, tiny) or a config JSON file "
                               "(default: the recipe's own config; btp-mini for --stage)."),
    shapes: Path = typer.Option(None, "--shapes", envvar="BTP_SHAPES",
                                help="Meshes + index.json: the shared shapes or a `btp data corpus` folder."),
    out: Path = typer.Option(None, "--out", help="Output folder (default runs/<recipe|stage>-seed<S>)."),
    seed: int = typer.Option(0, "--seed", help="One seed for everything random (the config's train.seed)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in --out."),
    encoder: Path = typer.Option(None, "--encoder", help="--stage btp: stage-1 encoder.safetensors (default <out>/../pretrain or none)."),
    init_from: Path = typer.Option(None, "--from", help="--stage btp: start from a btp checkpoint (e.g. `btp convert "
                                   "ulip2` / `btp convert btp-3dad` output): its encoder, heads, text side and config."),
    steps: int = typer.Option(0, "--steps", help="--stage pretrain: iterations (0 = recipe default)."),
    epochs: int = typer.Option(0, "--epochs", help="BTP stage epochs (0 = the config's train.epochs)."),
    max_steps: int = typer.Option(0, "--max-steps", help="--stage btp: cap on iterations (0 = none)."),
    batch_size: int = typer.Option(0, "--batch-size", help="Batch size of both stages (0 = the config's "
                                   "train.batch_size and the recipe's pre-training batch)."),
    per_shape: int = typer.Option(0, "--per-shape", help="Synthetic BTP samples per training mesh (0 = recipe default)."),
    ckpt_every: int = typer.Option(-1, "--ckpt-every", help="Checkpoint every N steps (-1 = recipe default, 0 = only at the end)."),
    no_pretrain: bool = typer.Option(False, "--no-pretrain", help="Ablation: frozen random encoder (recipe)."),
    no_gfcm: bool = typer.Option(False, "--no-gfcm", help="Ablation: GFCM descriptor = 0, no geometric loss."),
    no_prompt_learning: bool = typer.Option(False, "--no-prompt-learning", help="Ablation: prompt context not trained."),
    feature_layers: str = typer.Option("", "--feature-layers", help="Ablation: MGFEM layers, e.g. '6' or '2,3,4,6'."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Rich progress bars."),
    validate: bool = typer.Option(False, "--validate", help="--recipe: train the BTP stage on a validation split "
                                  "inside the training families (every 5th family held out) and write "
                                  "<out>/validation/validation.json, for design choices; no model is shipped."),
) -> None:
    """Train a BTP model: `--recipe btp-mini` end to end, or one `--stage pretrain|btp`.

    CPU works; torchrun works (`torchrun --nproc_per_node P $(which btp) train ...`: WORLD_SIZE > 1
    -> DDP with DistributedSampler, gloo on CPU / NCCL on CUDA).
    """
    from btp.model.checkpoint import CheckpointError
    from btp.train import recipes

    if not recipe and stage not in recipes.STAGES:
        raise typer.BadParameter("give --recipe NAME or --stage pretrain|btp", param_hint="--stage")
    if validate and not recipe:
        raise typer.BadParameter("--validate runs a whole recipe: give --recipe NAME", param_hint="--validate")
    try:
        rec = recipes.choose_recipe(recipe, config)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--recipe") from None
    try:
        cfg = recipes.choose_config(rec, config, init_from if stage == "btp" and not recipe else None)
    except CheckpointError as err:
        raise typer.BadParameter(str(err), param_hint="--from") from None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--config") from None
    overrides = recipes.Overrides(
        steps=steps or None, epochs=epochs or None, batch_size=batch_size or None, max_steps=max_steps or None,
        per_shape=per_shape or None, ckpt_every=None if ckpt_every < 0 else ckpt_every, pretrain=not no_pretrain,
        gfcm=not no_gfcm, prompt_learning=not no_prompt_learning,
        feature_layers=tuple(int(x) for x in feature_layers.split(",")) if feature_layers else None)
    try:
        rec, cfg = recipes.configure(rec, cfg, seed, overrides)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--feature-layers" if feature_layers else "--config") from None
    shapes = _shapes(shapes)
    out = out or Path("runs") / f"{recipe or stage}-seed{seed}"
    if recipe:
        recipes.run_recipe(rec, shapes, out, seed=seed, resume=resume, progress=progress, cfg=cfg, validate=validate)
    else:
        recipes.run_stage(stage, rec, cfg, shapes, out, resume=resume, progress=progress, encoder=encoder,
                          init_from=init_from, warn=lambda msg: typer.echo(msg, err=True))


@data_app.command("synth")
def synth(
    shapes: Path = typer.Option(..., "--shapes", help="Folder of meshes (e.g. the shared shapes)."),
    out: Path = typer.Option(..., "--out", help="Output data-set root."),
    classes: str = typer.Option("", "--classes", help="Comma-separated class (mesh) names; default all."),
    split: str = typer.Option("", "--split", help="Only the meshes of the zero-shot split: train | heldout "
                                                  "(btp.train.split); combines with --classes."),
    per_class_train: int = typer.Option(None, "--per-class-train",
                                        help="Normal train samples per class [default: SynthPlan's]."),
    per_class_test_good: int = typer.Option(None, "--per-class-test-good",
                                            help="Normal test samples per class [default: SynthPlan's]."),
    per_class_test_bad: int = typer.Option(None, "--per-class-test-bad",
                                           help="Anomalous test samples per class [default: SynthPlan's]."),
    points: int = typer.Option(None, "--points", help="Points per written scan [default: SynthConfig.num_points]."),
    seed: int = typer.Option(0, "--seed", help="Root seed: same seed, same files."),
    layout: str = typer.Option("anomaly-shapenet", "--layout", help="anomaly-shapenet | real3d"),
    noise: float = typer.Option(None, "--noise", help="Gaussian noise sigma, fraction of the object size "
                                                      "[default: SynthConfig.noise]."),
    partial: float = typer.Option(None, "--partial", help="Share of single-view partial scans, 0..1 "
                                                          "[default: SynthConfig.partial_prob]."),
) -> None:
    """Write synthetic defects on real shapes in the Anomaly-ShapeNet (or Real3D-AD) layout."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from btp.train.synth import LAYOUTS, SynthConfig, SynthError, SynthPlan, list_shapes, write_dataset

    if layout not in LAYOUTS:
        raise typer.BadParameter(f"{layout!r}: choose one of {', '.join(LAYOUTS)}", param_hint="--layout")
    chosen = [c.strip() for c in classes.split(",") if c.strip()] or None
    if split:
        from btp.train.split import zero_shot_split

        if split not in ("train", "heldout"):
            raise typer.BadParameter(f"{split!r}: choose train or heldout", param_hint="--split")
        in_split = zero_shot_split(shapes).names(split)
        chosen = [c for c in chosen if c in in_split] if chosen else in_split
        if not chosen:
            typer.echo(f"btp data synth: none of the --classes is in the {split} split", err=True)
            raise typer.Exit(code=2)
    given = {"per_class_train": per_class_train, "per_class_test_good": per_class_test_good,
             "per_class_test_bad": per_class_test_bad}
    plan = SynthPlan(seed=seed, layout=layout, **{k: v for k, v in given.items() if v is not None})
    options = {"num_points": points, "noise": noise, "partial_prob": partial}
    cfg = SynthConfig(**{k: v for k, v in options.items() if v is not None})
    try:
        n_classes = len(chosen) if chosen else len(list_shapes(shapes))
        total = n_classes * (plan.per_class_train + plan.per_class_test_good + plan.per_class_test_bad)
        with Progress(TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()) as bar:
            task = bar.add_task("synth", total=total)
            summary = write_dataset(shapes, out, chosen, plan, cfg, progress=lambda n: bar.advance(task, n))
    except SynthError as err:
        typer.echo(f"btp data synth: {err}", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {total} scans of {len(summary['classes'])} classes ({layout}) to {out}")


@data_app.command("corpus")
def corpus(
    out: Path = typer.Option(..., "--out", help="Output folder (index.json + meshes/ + corpus.json)."),
    shapes: Path = typer.Option(None, "--shapes", envvar="BTP_SHAPES", help="The shared shapes folder "
                                "(meshes + index.json)."),
    kicad_root: Path = typer.Option(None, "--kicad-root", help="kicad-packages3d's 3dmodels folder "
                                    "[default: /usr/share/kicad/3dmodels]."),
    per_family: int = typer.Option(4, "--per-family", min=1, help="KiCad parts per family."),
    max_faces: int = typer.Option(20000, "--max-faces", min=100, help="Decimate each part to at most this many triangles."),
) -> None:
    """Build the training corpus: the shared shapes + Debian's kicad-packages3d parts (decimated,
    deduplicated), with a manifest of source, licence and sha256 per mesh. The ten kicad folders
    reserved for independent evaluation are never read."""
    from btp.train.corpus import KICAD_ROOT, CorpusError, CorpusOptions, build_corpus

    opts = CorpusOptions(per_family=per_family, max_faces=max_faces, shapes=str(_shapes(shapes)),
                         kicad_root=str(kicad_root or KICAD_ROOT))
    try:
        build_corpus(out, opts, log=typer.echo)
    except CorpusError as err:
        typer.echo(f"btp data corpus: {err}", err=True)
        raise typer.Exit(code=2) from None
