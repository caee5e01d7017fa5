"""`btp export` / `btp-export` (`btp build` is in btp/cli/build.py).

torch / onnx are imported inside the command, so `btp --help` stays instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from btp import contract
from btp.config import DEFAULT_MODEL_NAME

_TRITON = contract.export_format("triton")


def _choices(flag: str) -> str:
    return " | ".join(_TRITON.choices[flag])


def _given_flags(ctx: typer.Context) -> list[str]:
    """The long flags of the options set on the command line (not left at their defaults)."""
    return [next(o for o in p.opts if o.startswith("--")) for p in ctx.command.params
            if p.opts and getattr(ctx.get_parameter_source(p.name), "name", "") == "COMMANDLINE"]


def export(
    ctx: typer.Context,
    model: str = typer.Option(DEFAULT_MODEL_NAME, "--model", "-m",
                              help=f"Checkpoint (.safetensors) or preset name: {DEFAULT_MODEL_NAME} (default: the "
                                   "weights the package carries), btp-mini, tiny, ulip2. A preset name loads "
                                   "$BTP_MODELS/NAME.safetensors or the package's own weights, else a fresh, "
                                   "untrained init."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model.onnx (--format triton: the repository folder)."),
    fmt: str = typer.Option("onnx", "--format", help=" | ".join(contract.format_names("btp export")) + " (see the "
                            "formats below; each takes only its own options)."),
    layout: str = typer.Option("python", "--layout", help=f"--format triton: {_choices('--layout')} (python: one "
                               "Python-backend model running btp.runtime.Pipeline; ensemble: pre -> ORT/TensorRT "
                               "engine -> post)."),
    engine: str = typer.Option("onnx", "--engine", help=f"--format triton --layout ensemble: {_choices('--engine')}."),
    plan: Path = typer.Option(None, "--plan", help="--engine plan: the TensorRT engine from `btp build`."),
    reference: Path = typer.Option(None, "--reference", help="--format triton: PART.btpref from `btp reference "
                                   "build` with this --model MODEL.onnx; the served pipeline also scores every scan "
                                   "against it, as `btp-run --reference` does (one part per repository)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset, 17..20 (>= 17 keeps LayerNormalization one op)."),
    batch: str = typer.Option("dynamic", "--batch", help="'dynamic' (symbolic B) or a fixed batch size N."),
    fp16_safe: bool = typer.Option(False, "--fp16-safe",
                                   help="Check the graph for FP16 engines (LayerNormalization kept, weights in "
                                        "FP16 range) and list the nodes TensorRT should keep FP32 in the metadata."),
    simplify: bool = typer.Option(True, "--simplify/--no-simplify", help="Simplify with onnxslim."),
    optional_output: List[str] = typer.Option([], "--optional-output", help="Also give this optional output "
                                              "(repeat for several): " + "; ".join(
                                                  f"{t.name} [{','.join(map(str, t.shape))}]: {t.meaning}"
                                                  for t in contract.optional_outputs()) + "."),
    patch_embed: bool = typer.Option(False, "--patch-embed", help="Short for --optional-output patch_embed."),
    seed: int = typer.Option(0, "--seed", help="Torch seed of a fresh init (when no committed weights exist)."),
    selfsim: bool = typer.Option(True, "--selfsim/--no-selfsim",
                                 help="--no-selfsim: leave the self-similarity terms out of the object score and "
                                      "the point map (scoring.selfsim_weight = selfsim_point_weight = 0 in the "
                                      "file): about 115 ms a scan faster on a 2-core CPU, about 5 points lower "
                                      "held-out O-AUROC and 3 lower P-AUROC (models/btp-geo-4k.md, \"The part against "
                                      "itself\" and \"... point by point\")."),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | int8 | bf16. int8: static INT8 (QDQ) "
                                  "calibrated on normal scans of --calibration-shapes, the most sensitive layer "
                                  "groups kept in FP32 until the accuracy gate holds; bf16: OpenVINO's bfloat16 "
                                  "CPU plugin (CPUs with AVX512-BF16 or AMX). Both need --gate-data; --model may "
                                  "be an exported FP32 model.onnx (no PyTorch needed then)."),
    gate_data: List[Path] = typer.Option([], "--gate-data", help="--precision int8|bf16: held-out evaluation sets "
                                         "(`btp data eval-sets` output, or set folders; repeat for several): the "
                                         "variant must keep O-AUROC and P-AUROC within 0.5 point of FP32 on each "
                                         "and agree with FP32's OK/NG decisions on >= 99 % of the scans."),
    calibration_shapes: Path = typer.Option(None, "--calibration-shapes", help="--precision int8: the shapes "
                                            "folder whose training-split meshes give the normal calibration scans "
                                            "(default $BTP_SHAPES)."),
    keep_fp32: str = typer.Option("auto", "--keep-fp32", help="--precision int8: layer groups kept in FP32, "
                                  "comma-separated (e.g. gfcm,gfcm/convs); 'search': find them (each group's "
                                  "sensitivity, then the gate); 'auto': the committed recipe for the model's "
                                  "weights, else search."),
    force: bool = typer.Option(False, "--force", help="--precision int8|bf16: write a variant that fails the gate "
                               "anyway (its metadata says forced)."),
) -> None:
    """Export a BTP model to one self-describing model.onnx (parity-checked against PyTorch).

    Everything after grouping goes into the graph, with the text embeddings frozen as initializers;
    G, K, N, channels, scoring constants, prompts, weights hash and provenance go into
    metadata_props["btp"]. Exit codes: 0 exported; 1 the model cannot be exported; 2 --out cannot be
    written (checked before any work). Formats: """
    from rich.console import Console
    from rich.markup import escape

    from btp.errors import BTPError
    from btp.export.onnx import ExportError, export_onnx, load_model, unsupported_trt_ops
    from btp.io.locations import model_search_paths

    console = Console(stderr=True)
    prefix = "[bold]btp-export[/bold]"
    if fmt not in contract.format_names("btp export"):
        raise typer.BadParameter(f"{fmt!r}: choose one of {', '.join(contract.format_names('btp export'))}"
                                 + (" (`btp build` makes engines)" if fmt == "engine" else ""), param_hint="--format")
    try:
        contract.check_arguments(fmt, _given_flags(ctx))
        if fmt == "onnx":
            contract.check_choice(fmt, "--precision", precision)
        if fmt == "triton":
            contract.check_choice(fmt, "--layout", layout)
            contract.check_choice(fmt, "--engine", engine)
        optional = contract.check_optional(list(optional_output) + (["patch_embed"] if patch_embed else []))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        _check_out(out, fmt)
    except (BTPError, OSError) as exc:
        console.print(f"{prefix} [red]failed:[/red] {escape(str(exc))}")
        raise typer.Exit(code=2) from None
    if fmt == "triton":
        _export_triton(model, out, layout, engine, plan, opset, reference, console, prefix)
        return
    if precision != "fp32":
        _export_variant(model, out, precision, gate_data=gate_data, shapes=calibration_shapes, keep=keep_fp32,
                        force=force, seed=seed, console=console, prefix=prefix)
        return
    if Path(model).suffix == ".onnx":
        raise typer.BadParameter(f"{model}: already an ONNX model; --model takes a checkpoint or preset name "
                                 "(an exported model.onnx only with --precision int8|bf16)", param_hint="--model")
    try:
        loaded = load_model(model, seed=seed)
        if loaded.info.get("fresh_init"):
            looked = ", ".join(str(p) for p in model_search_paths(model))
            console.print(f"{prefix} [yellow]warning: no trained weights for {model!r} "
                          f"(looked for {escape(looked)}; pass --model FILE.safetensors or set BTP_MODELS=DIR): "
                          f"exporting a FRESHLY INITIALISED, untrained model (torch seed {seed}); its scores carry "
                          "no meaning. The metadata says so.")
        if not selfsim:
            loaded.model.cfg.scoring.selfsim_weight = loaded.model.cfg.scoring.selfsim_point_weight = 0.0
        result = export_onnx(loaded, out, opset=opset, batch=batch, fp16_safe=fp16_safe, simplify=simplify,
                             optional_outputs=optional, log=lambda msg: console.print(f"{prefix} {msg}"))
    except (ExportError, BTPError, ValueError) as exc:
        console.print(f"{prefix} [red]failed:[/red] {exc}")
        raise typer.Exit(code=1) from None
    except OSError as exc:  # the output place failed while writing (disk full, removed folder)
        console.print(f"{prefix} [red]failed:[/red] could not write --out {escape(str(out))} ({escape(str(exc))})")
        raise typer.Exit(code=2) from None
    io = result.metadata["io"]
    def shapes(spec: dict) -> str:
        return escape(", ".join(f"{k} [{','.join(str(d) for d in v['shape'])}]" for k, v in spec.items()))

    console.print(f"{prefix} inputs {shapes(io['inputs'])} -> outputs {shapes(io['outputs'])}")
    for check in result.parity:
        what = {"abs": "max abs diff", "cosine": "min cosine", "index": "agreement"}.get(check.kind, check.kind)
        rel = ">=" if check.kind in ("cosine", "index") else "<="
        value = f"{check.value:.6f}" if check.kind in ("cosine", "index") else f"{check.value:.2e}"
        note = f" ({escape(check.note)})" if check.note else ""
        console.print(f"{prefix} parity {check.output}: {what} {value} (limit {rel} {check.limit:.3g}){note} "
                      f"{check.verdict}")
    import onnx

    missing = unsupported_trt_ops(onnx.load(str(result.path), load_external_data=False))
    if missing:
        console.print(f"{prefix} [yellow]note: ops TensorRT's ONNX parser does not list: {', '.join(missing)}")
    console.print(f"{prefix} success ✅ {result.seconds:.1f}s, saved as '{result.path}' "
                  f"({result.size_bytes / 1e6:.1f} MB), {len(result.op_types)} op types, "
                  f"parity vs PyTorch {result.verdict}")


def _export_variant(model: str, out: Path, precision: str, *, gate_data, shapes, keep: str, force: bool, seed: int,
                    console, prefix: str) -> None:
    """--precision int8|bf16: the FP32 model.onnx (--model, or exported from the checkpoint first)
    -> its gated variant at --out."""
    import tempfile

    from rich.markup import escape

    from btp.errors import BTPError
    from btp.export.precision import PrecisionError, make_variant

    if not gate_data:
        raise typer.BadParameter(f"--precision {precision} needs --gate-data SETS: held-out evaluation sets "
                                 "(make them with `btp data eval-sets --out SETS`)", param_hint="--gate-data")
    word = keep.strip()
    kept = "auto" if word == "auto" else None if word == "search" else [g.strip() for g in word.split(",") if g.strip()]
    try:
        with tempfile.TemporaryDirectory(prefix="btp-export-") as tmp:
            source = Path(model)
            if source.suffix != ".onnx":
                from btp.export.onnx import export_onnx, load_model

                console.print(f"{prefix} exporting the FP32 model first")
                source = export_onnx(load_model(model, seed=seed), Path(tmp) / "model.onnx").path
            variant = make_variant(source, out, precision, gate_data=gate_data, shapes=shapes, keep_fp32=kept,
                                   force=force, progress=lambda msg: console.print(f"{prefix} {escape(msg)}"))
    except PrecisionError as exc:
        console.print(f"{prefix} [red]refused:[/red] {escape(str(exc))}")
        raise typer.Exit(code=1) from None
    except (BTPError, ValueError, OSError) as exc:
        console.print(f"{prefix} [red]failed:[/red] {escape(str(exc))}")
        raise typer.Exit(code=1) from None
    for line in variant.gate.lines():
        console.print(f"{prefix} gate {escape(line)}")
    check = variant.info["parity"]
    console.print(f"{prefix} parity on {check['scans']} sample scans: object score {check['max_abs_object_score']:.2e} "
                  f"(limit {check['object_score_tolerance']:.2e}, twice its largest move on the gate's scans), "
                  f"patch probabilities {check['max_abs_patch_probs']:.2e}")
    kept_text = ", ".join(variant.kept_fp32) or "none"
    state = "passed" if variant.passed else "[yellow]FAILED, kept because of --force[/yellow]"
    console.print(f"{prefix} {precision} model saved as '{variant.path}' ({variant.path.stat().st_size / 1e6:.1f} MB; "
                  f"layer groups in FP32: {escape(kept_text)}); accuracy gate {state}")


def _check_out(out: Path, fmt: str) -> None:
    """--out must be a place the export can be written, before any work: the repository folder
    (--format triton), or a model file name in a writable folder."""
    from btp.runtime.outputs import OutputPlaceError, check_output_dir

    if fmt == "triton":
        check_output_dir(out)
        return
    if out.is_dir():
        raise OutputPlaceError(f"--out {out} is a folder; give the model's file name, e.g. {out / 'model.onnx'}")
    if out.exists() and not out.is_file():
        raise OutputPlaceError(f"--out {out} is not a regular file (a device or FIFO); give a file name such as "
                               "model.onnx in a writable folder")
    check_output_dir(out.parent, flag="--out (the folder of the model file)")


def _export_triton(model: str, out: Path, layout: str, engine: str, plan, opset: int, reference: Path | None,
                   console, prefix: str) -> None:
    import tempfile

    from rich.markup import escape

    from btp.errors import BTPError
    from btp.export.triton import export_repository

    source = Path(model)
    if reference is not None and source.suffix != ".onnx":
        console.print(f"{prefix} [red]failed:[/red] --reference needs --model MODEL.onnx, the model file the "
                      f"reference was built with (`btp reference build --model MODEL.onnx`), not {escape(model)}")
        raise typer.Exit(code=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if source.suffix != ".onnx":  # a checkpoint or preset: export it first
                from btp.export.onnx import export_onnx, load_model

                source = export_onnx(load_model(model), Path(tmp) / "model.onnx", opset=opset).path
            repo = export_repository(source, out, layout=layout, engine=engine, plan=plan, reference=reference)
    except (BTPError, ValueError, OSError) as exc:
        console.print(f"{prefix} [red]failed:[/red] {escape(str(exc))}")
        raise typer.Exit(code=1) from None
    scored = f", scoring with the reference {reference.name}" if reference is not None else ""
    console.print(f"{prefix} Triton model repository ({layout}{escape(scored)}) written to {escape(str(repo))}; "
                  f"serve it with `btp serve {escape(str(repo))}`")


def serve(
    repo: Path = typer.Argument(..., exists=True, file_okay=False, help="A repository from `btp export --format triton`."),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default loopback only)."),
) -> None:
    """Run NVIDIA Triton Inference Server on a btp model repository (KServe v2 HTTP and gRPC) until
    Ctrl-C / SIGTERM, then stop it cleanly."""
    import signal

    from btp.errors import BTPError
    from btp.export.triton import start_server, stop_server, wait_ready

    try:
        proc = start_server(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host,
                            log_path=repo / "tritonserver.log")
    except BTPError as exc:
        typer.echo(f"btp serve: {exc}", err=True)
        raise typer.Exit(code=2) from None
    def on_sigterm(*_):
        raise KeyboardInterrupt  # the same clean stop as Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        wait_ready(proc, http_port, host)
        typer.echo(f"btp serve: ready - http://{host}:{http_port}/v2/models/btp/infer, gRPC {host}:{grpc_port} "
                   f"(log: {repo / 'tritonserver.log'}); Ctrl-C to stop")
        proc.wait()
        typer.echo(f"btp serve: tritonserver exited with code {proc.returncode}", err=True)
        raise typer.Exit(code=1)
    except KeyboardInterrupt:
        typer.echo("btp serve: stopping ...", err=True)
    except BTPError as exc:
        typer.echo(f"btp serve: {exc}", err=True)
        raise typer.Exit(code=2) from None
    finally:
        stop_server(proc)


export.__doc__ = (export.__doc__ or "") + contract.formats_help() + "."
