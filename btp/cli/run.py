"""`btp run` / `btp-run`, `btp calibrate`, `btp demo` (owned by btp.runtime).

`run` and `calibrate` are torch-free; `demo` needs torch only to export the model the first time.
Heavy imports happen inside the commands, so `btp --help` stays instant.
"""
from __future__ import annotations

import os

from pathlib import Path
from typing import List, Optional

import typer

from btp import contract
from btp.config import DEFAULT_MODEL_NAME


def _check_backend(name: str) -> str:
    if name == contract.AUTO_BACKEND:
        return name
    try:
        return contract.backend(name).name
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def backend_option():
    """--backend / -b: the engine backend, its choices and help from btp.contract.BACKENDS."""
    return typer.Option(contract.AUTO_BACKEND, "--backend", "-b", callback=_check_backend,
                        help=f"Engine backend: auto (default: the one the model's precision runs on: "
                             f"{', '.join(f'{p} {b}' for p, b in contract.PRECISIONS.items())}); "
                             f"{contract.backends_help()}.")


def _split_heatmaps(values: list[str]) -> tuple[str, ...]:
    from btp.runtime.run import HEATMAP_CHOICES

    chosen = tuple(v.strip() for item in values for v in item.split(",") if v.strip())
    bad = [v for v in chosen if v not in HEATMAP_CHOICES]
    if bad:
        raise typer.BadParameter(f"{bad}: choose from {', '.join(HEATMAP_CHOICES)}", param_hint="--heatmap")
    return chosen


def _check_threads(threads: int | None, force: bool) -> int | None:
    """--threads: >= 1, and at most this machine's cores unless --force-threads (a huge pool can
    leave the machine unable to start processes)."""
    if threads is None:
        return None
    cores = os.cpu_count() or 1
    if threads < 1:
        raise typer.BadParameter(f"{threads}: expected at least 1", param_hint="--threads")
    if threads > cores and not force:
        raise typer.BadParameter(f"{threads} threads on a machine with {cores} cores; use at most {cores}, or "
                                 "--force-threads", param_hint="--threads")
    return threads


def _model_and_inputs(paths: list[str]) -> tuple[Path, list[str]]:
    """``[MODEL.onnx] INPUTS...``: a first argument ending in .onnx is the model (no scan format does);
    without one, the default model the package carries (btp/assets/models)."""
    from btp.io.locations import packaged_model

    if paths and paths[0].lower().endswith(".onnx"):
        model, inputs = Path(paths[0]), paths[1:]
    else:
        model, inputs = packaged_model(DEFAULT_MODEL_NAME), paths
        if model is None:
            raise typer.BadParameter(f"this install of btp carries no {DEFAULT_MODEL_NAME}.onnx: pass a model.onnx "
                                     "from btp-export as the first argument", param_hint="MODEL.onnx")
    if not inputs:
        raise typer.BadParameter("no inputs: give point-cloud files, directories or globs after the model",
                                 param_hint="INPUTS")
    return model, inputs


def _check_run_options(fmt: str, threads: int | None, force_threads: bool, threshold: float | None,
                       heatmap: list[str], report: str) -> tuple[int | None, float | None, tuple[str, ...]]:
    """btp-run's choices checked before anything is opened: (the threads, the threshold, the heat-map kinds
    to write)."""
    from btp.runtime.calibration import CalibrationError, check_score_threshold
    from btp.runtime.run import FORMAT_CHOICES

    if fmt not in FORMAT_CHOICES:
        raise typer.BadParameter(f"{fmt!r}: choose json or csv", param_hint="--format")
    threads = _check_threads(threads, force_threads)
    if threshold is not None:
        try:
            threshold = check_score_threshold(threshold, "--threshold")
        except CalibrationError as exc:
            raise typer.BadParameter(str(exc), param_hint="--threshold") from None
    heatmaps = _split_heatmaps(heatmap)
    if report not in ("none", "html"):
        raise typer.BadParameter(f"{report!r}: choose html or none", param_hint="--report")
    if report == "html" and "png" not in heatmaps:
        heatmaps = tuple(h for h in heatmaps if h != "none") + ("png",)
    return threads, threshold, heatmaps


def _open_pipeline(console, model: Path, *, backend: str, threads: int | None, preprocess: str, downsample: str,
                   reference: Path | None, threshold: float | None):
    """(the pipeline, the threshold, where it came from): --threshold, else the model's sidecar, else None.
    An unusable model exits 2 with the reason."""
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.runtime.calibration import CalibrationError, find_threshold
    from btp.runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline(model, backend=backend, threads=threads, preprocess=preprocess, downsample=downsample,
                            reference=reference)
        source = "--threshold"
        if threshold is None:
            sidecar = find_threshold(model)
            if sidecar is not None:
                threshold, source = sidecar.value, f"sidecar (q={sidecar.quantile}, margin={sidecar.margin}, " \
                                                   f"{sidecar.n_scans} good scans)"
    except (BTPError, CalibrationError, ValueError, OSError) as exc:
        console.print(f"[red]btp run: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    if pipeline.preprocess != "cpu":
        console.print(f"btp run: preprocessing on {pipeline.preprocess} ({escape(pipeline.preprocess_reason)})")
    if pipeline.meta.model.get("fresh_init"):
        console.print("[yellow]btp run: this model.onnx holds a freshly initialised, UNTRAINED model: "
                      "its scores carry no meaning")
    return pipeline, threshold, source


def _prepare_output_dir(console, out: Path) -> None:
    """Exit 2 when OUT cannot take the outputs; remove the temporary files an interrupted run left there."""
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.io.files import remove_stale_temps
    from btp.runtime import outputs

    try:
        outputs.check_output_dir(out)
    except BTPError as exc:
        console.print(f"[red]btp run: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    stale = remove_stale_temps(out)
    if stale:
        console.print(f"btp run: removed {len(stale)} temporary file(s) an interrupted run left in {out}")


def _ledger_recorder(console, ledger: str | None, model: Path):
    """A function that records one outcome in --ledger (None without one); a ledger that cannot be opened
    exits 2."""
    if ledger is None:
        return None
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.io.files import file_sha256
    from btp.runtime.ledger import Ledger, file_version, record_from_outcome

    try:
        book, model_sha256 = Ledger(ledger), file_sha256(model)
    except (BTPError, OSError) as exc:
        console.print(f"[red]btp run: {escape(str(exc))}")
        raise typer.Exit(code=2) from None

    def record(oc) -> None:
        try:
            version = file_version(oc.file)
        except OSError:
            version = None
        book.record(record_from_outcome(oc, version=version, model=str(model), model_sha256=model_sha256,
                                        path=oc.file.resolve() if oc.file.exists() else oc.file), replace=True)

    return record


def _print_outcome(console, oc, *, debug: bool) -> None:
    """One line per scan as it finishes: its score and decision, or why it failed."""
    from rich.markup import escape

    from btp.runtime.outcome import FRESH_INIT_WARNING

    if oc.ok:
        decision = f" -> {oc.decision}" if oc.decision else ""
        if oc.reference is not None:
            ref = oc.reference
            decision += f" (part {ref.part}, {ref.route}" + (
                f", fitness {ref.fitness:.2f})" if ref.fitness is not None else ")")
        console.print(f"[green]ok[/green] {escape(str(oc.file))}: object score {oc.object_score:.4f}{decision} "
                      f"({oc.points} points, {oc.total_ms:.0f} ms)")
        for note in oc.warnings:
            if note != FRESH_INIT_WARNING:  # said once for the whole run above
                note = note.removeprefix(f"{oc.file}: ")  # the readers' warnings name the file already
                console.print(f"[yellow]  warning[/yellow] {escape(str(oc.file))}: {escape(note)}")
    else:
        console.print(f"[red]FAILED[/red] {escape(str(oc.file))}: {escape(oc.error)}")
        if debug and oc.traceback:
            console.print(oc.traceback, markup=False, highlight=False)



def run(
    paths: List[str] = typer.Argument(..., metavar="[MODEL.onnx] INPUT",
                                      help=f"An exported model.onnx from btp-export (everything else comes from its "
                                           f"metadata; optional: without it, the default model the package carries, "
                                           f"{DEFAULT_MODEL_NAME}), then point-cloud files, directories or globs "
                                           "(.pcd .ply .xyz .txt .csv .npy .npz)."),
    out: Path = typer.Option(Path("btp-out"), "--out", "-o", help="Output folder."),
    backend: str = backend_option(),
    batch: int = typer.Option(1, "--batch", min=1, help="Scans per engine call, at most as many as --max-memory "
                              "allows: the scans in flight are bounded by it whatever --batch says."),
    max_memory: int = typer.Option(1024, "--max-memory", min=64, help="MiB the scans in flight may hold (read "
                                   "ahead, in the engine, being written; estimated from the model's G, K and widths "
                                   "and each scan's points): a third per stage, so a larger --batch or a folder of "
                                   "thousands of scans cannot exhaust memory."),
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t",
                                              help="Object-score threshold in [0, 1] for the decision (default: "
                                                   "the model's sidecar MODEL.threshold.json from "
                                                   "`btp calibrate`, if any)."),
    fmt: str = typer.Option("json", "--format", "-f", help="json (one <stem>.json per scan) | csv (one results.csv)."),
    heatmap: List[str] = typer.Option(["ply"], "--heatmap",
                                      help="ply | png | none; repeat or comma-separate for several (ply,png)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: ORT's)."),
    report: str = typer.Option("none", "--report", help="html: also write OUT/report.html (sortable table, "
                               "three-view heat maps, 3D views; implies --heatmap png) | none."),
    preprocess: str = typer.Option("auto", "--preprocess", help="auto | cpu | cuda | cuda-emu: where downsampling, "
                                   "FPS, kNN and the scores' way back run (auto: our CUDA kernels where a GPU and a "
                                   "CUDA binding are usable, else the CPU; `btp doctor` says which; cuda-emu: the "
                                   "kernels' source emulated on the CPU, slow, for checks)."),
    downsample: str = typer.Option("auto", "--downsample", help="auto | exact | bucket | voxel: how a scan of more "
                                   "than N points is reduced to N on the CPU (exact: the reference FPS and tie "
                                   "rules, as the CUDA kernels run them; auto: the voxel rule, one pass, and scores "
                                   "go back to the raw points by a gather; for scans of up to 8N points in a "
                                   "model's canonical order, FPS over all points from the point farthest from the "
                                   "centroid, whose samples turn with the part)."),
    force_threads: bool = typer.Option(False, "--force-threads", help="Allow --threads above this machine's cores."),
    prefetch: int = typer.Option(2, "--prefetch", min=0, max=64, help="Files read and preprocessed ahead on a "
                                 "reader thread while the engine runs, outputs written on a writer thread (0: all "
                                 "one after the other; same outputs, same order)."),
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an internal error (the run goes on)."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help="Also record every scan in this ledger: an SQLite "
                                         "file or a PostgreSQL URL (btp watch's format; a re-run of the same file "
                                         "replaces its row)."),
    reference: Optional[Path] = typer.Option(None, "--reference", "-r", help="PART.btpref from `btp reference build`, "
                                             "or a folder of them (one per part: a scan goes to the part named by "
                                             "one of its folders, else by its file name's start, PART_*); the "
                                             "part's fused score and threshold decide."),
) -> None:
    """Score point clouds: per scan an object score (+ decision), <stem>.npy with one score per input
    point (file order), a heat-mapped <stem>.ply and optionally a <stem>.png (three views).

    Bad files are reported and skipped. Exit codes: 0 every scan scored; 1 some inputs failed (listed,
    with the reason, in OUT/summary.json); 2 unusable model, arguments or output folder; 130 interrupted."""
    from rich.console import Console

    from btp.runtime import outputs
    from btp.runtime.run import expand_inputs, run_files

    console = Console(stderr=True)
    model, inputs = _model_and_inputs(paths)
    threads, threshold, heatmaps = _check_run_options(fmt, threads, force_threads, threshold, heatmap, report)
    pipeline, threshold, source = _open_pipeline(console, model, backend=backend, threads=threads,
                                                 preprocess=preprocess, downsample=downsample, reference=reference,
                                                 threshold=threshold)
    _prepare_output_dir(console, out)
    files = expand_inputs(inputs, exclude=out)
    if not files:
        console.print("[red]btp run: no input files found")
        raise typer.Exit(code=1)
    record = _ledger_recorder(console, ledger, model)

    def say(oc) -> None:
        if record is not None:
            record(oc)
        _print_outcome(console, oc, debug=debug)

    try:
        outcomes = run_files(pipeline, files, out, batch=batch, memory_budget=max_memory << 20, threshold=threshold,
                             threshold_source=source if threshold is not None else None, fmt=fmt,
                             heatmaps=heatmaps, backend=backend, prefetch=prefetch, on_outcome=say)
    except KeyboardInterrupt:
        console.print("[red]btp run: interrupted; every output written so far is complete")
        raise typer.Exit(code=130) from None
    try:
        outputs.write_summary(out, outcomes, pipeline.model_path)
    except OSError as exc:
        console.print(f"[red]btp run: could not write {out / 'summary.json'} ({exc}); the per-scan outputs are complete")
        raise typer.Exit(code=2) from None
    if report == "html":
        page = outputs.write_report(out, outcomes, model=f"{pipeline.meta.name} ({model})")
        console.print(f"btp run: report {page}")
    failed = sum(not oc.ok for oc in outcomes)
    console.print(f"btp run: {len(outcomes) - failed} of {len(outcomes)} scans scored, {failed} failed; "
                  f"outputs in {out}")
    if failed:
        raise typer.Exit(code=1)


def calibrate(
    model: Path = typer.Argument(..., help="model.onnx from btp-export."),
    good_scans: List[str] = typer.Argument(..., help="Known-good scans: files, directories or globs."),
    quantile: float = typer.Option(1.0, "--quantile", "-q", min=0.0, max=1.0,
                                   help="Quantile of the good scans' object scores (1.0 = their max)."),
    margin: float = typer.Option(0.0, "--margin", "-m", help="Added to the quantile."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Sidecar JSON (default: MODEL.threshold.json next to the model, "
                                            "which btp-run picks up automatically)."),
    backend: str = backend_option(),
) -> None:
    """Pick an object-score threshold from known-good scans: quantile + margin -> sidecar JSON."""
    from rich.console import Console
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.runtime.calibration import (CalibrationError, check_margin, check_threshold, make_threshold, mixed_parts,
                                         part_signature, sidecar_path, write_threshold)
    from btp.runtime.pipeline import Pipeline
    from btp.runtime.run import expand_inputs, run_files

    console = Console(stderr=True)
    try:
        check_margin(margin, "--margin")
        check_threshold(quantile, "--quantile")
        target = out or sidecar_path(model)
        if target.is_dir():
            raise CalibrationError(f"--out {target} is a directory; give the sidecar's file name "
                                   f"(e.g. {target / sidecar_path(model).name})")
        pipeline = Pipeline(model, backend=backend)
    except (BTPError, ValueError, OSError) as exc:
        console.print(f"[red]btp calibrate: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    files = expand_inputs(good_scans)
    outcomes = run_files(pipeline, files, Path("."), write=False, backend=backend)
    for oc in outcomes:
        if not oc.ok:
            console.print(f"[red]FAILED[/red] {escape(str(oc.file))}: {escape(oc.error)}")
    scores = [oc.object_score for oc in outcomes if oc.ok]
    if not scores:
        console.print("[red]btp calibrate: no good scan could be scored")
        raise typer.Exit(code=1)
    try:
        threshold = make_threshold(model, scores, quantile, margin, pipeline.meta.name)
        path = write_threshold(target, threshold)
    except (CalibrationError, OSError) as exc:
        console.print(f"[red]btp calibrate: {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    console.print(f"btp calibrate: threshold {threshold.value:.6f} = quantile {quantile} of {len(scores)} good "
                  f"object scores (min {min(scores):.4f}, max {max(scores):.4f}) + margin {margin:.6g}; wrote {path}")
    scored = [oc for oc in outcomes if oc.ok]
    mixed = mixed_parts([part_signature(oc.result.points) for oc in scored], [oc.file.name for oc in scored])
    if mixed:
        console.print(f"[yellow]btp calibrate: warning: {escape(mixed)}")
    if len(scores) < len(outcomes):
        raise typer.Exit(code=1)


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output folder for scans, scores and heat maps."),
    model: str = typer.Option(DEFAULT_MODEL_NAME, "--model", "-m",
                              help=f"Checkpoint, preset (default: the committed {DEFAULT_MODEL_NAME}) or an exported "
                                   "model.onnx."),
    backend: str = backend_option(),
    png: bool = typer.Option(True, "--png/--no-png", help="Also render <stem>.png heat maps."),
) -> None:
    """The main job on shipped samples: export the default model to ONNX (cached), make sample scans
    with synthetic defects from the meshes in btp/data, score them with the btp-run code path,
    print a table and write heat maps."""
    from btp.cli.demo import run_demo

    raise typer.Exit(code=run_demo(out, model=model, backend=backend, png=png))


def report(
    results: Path = typer.Argument(..., exists=True, file_okay=False, help="A btp-run or btp watch output folder."),
    since: Optional[str] = typer.Option(None, "--since", help="With a ledger (btp watch): only scans scored at or "
                                        "after this ISO date or time (UTC unless it says otherwise), e.g. a shift."),
    ledger: Optional[str] = typer.Option(None, "--ledger", help="The ledger to read (default: RESULTS/ledger.sqlite "
                                         "if there is one): an SQLite file or a PostgreSQL URL."),
    station: Optional[str] = typer.Option(None, "--station", help="Only this station's scans (a PostgreSQL ledger: "
                                          "default this host's name)."),
) -> None:
    """Write RESULTS/report.html: from the ledger of a btp watch folder, or from a finished btp-run
    folder (every scored scan's <stem>.json, <stem>.png, a 3D view from <stem>.ply or the source file,
    and every failure in summary.json).
    Exit codes: 0 written; 1 no results in RESULTS; 2 RESULTS cannot be written or the ledger not read."""
    from btp.errors import BTPError
    from btp.runtime.ledger import LedgerError
    from btp.runtime.outputs import check_output_dir
    from btp.runtime.report import entries_from_results, write_report

    try:
        entries, model = entries_from_results(results, since, ledger=ledger, station=station)
    except LedgerError as exc:
        typer.echo(f"btp report: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if not entries:
        typer.echo(f"btp report: {results} holds no results (a ledger, <stem>.json or summary.json)"
                   + (f" scored since {since}" if since else ""), err=True)
        raise typer.Exit(code=1)
    try:
        check_output_dir(results, flag="RESULTS")
        page = write_report(results, entries, model=model)
    except (BTPError, OSError) as exc:
        typer.echo(f"btp report: {exc}", err=True)
        typer.echo(f"btp report: the page is written into RESULTS; copy {results} to a writable folder and run "
                   "`btp report` on the copy", err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {page} ({len(entries)} scans)")
