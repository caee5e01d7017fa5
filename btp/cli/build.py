"""`btp build` (owned by the GPU/TensorRT work: btp.runtime.tensorrt)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def build(
    model: Path = typer.Argument(..., help="model.onnx from `btp export`"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="FP16 (LayerNorm/Softmax, the MGFEM head and scoring kept FP32) or all FP32"),
    int8: bool = typer.Option(False, "--int8", help="INT8 with calibration (TensorRT 10 only); needs --calib. An "
                              "INT8 model.onnx from `btp-export --precision int8` builds INT8 from its own Q/DQ "
                              "scales without it (TensorRT 10 and 11)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="directory of .npz batches (neighborhood, center)"),
    workspace: int = typer.Option(2048, "--workspace", help="builder workspace limit in MB"),
    min_batch: int = typer.Option(1, "--min-batch", help="optimization profile: smallest batch"),
    opt_batch: int = typer.Option(1, "--opt-batch", help="optimization profile: batch to tune for"),
    max_batch: int = typer.Option(4, "--max-batch", help="optimization profile: largest batch"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="engine cache (default ~/.cache/btp/trt)"),
    force: bool = typer.Option(False, "--force", help="rebuild even if a matching engine is cached"),
) -> None:
    """Build a TensorRT engine from model.onnx (engine cache keyed by GPU + TensorRT + model hash)."""
    from btp.errors import NotAvailableError
    from btp.runtime import tensorrt as trt_export

    def fail(message: str) -> None:
        typer.echo(f"btp build: {message}", err=True)
        raise typer.Exit(code=2)

    if not model.is_file():
        fail(f"{model}: no such file (export the model first: btp export ... -o model.onnx)")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        fail(f"batch profile {min_batch}/{opt_batch}/{max_batch}: need 1 <= --min-batch <= --opt-batch <= --max-batch")
    try:  # the model's inputs and metadata are checked before anything needs TensorRT
        trt_export.profile_shapes(trt_export.read_onnx_io(model), (min_batch, opt_batch, max_batch))
    except (ValueError, FileNotFoundError) as exc:
        fail(f"{model}: {exc}")
    qdq = trt_export.model_precision(model) == "int8"  # btp-export --precision int8: scales inside
    if int8 and calib is None and not qdq:
        fail("--int8 needs --calib DIR (.npz batches with neighborhood and center arrays), or an INT8 model.onnx "
             "from `btp-export --precision int8`")
    if calib is not None and not calib.is_dir():
        fail(f"--calib {calib}: not a directory")
    reason = trt_export.tensorrt_unavailable_reason()
    if reason:
        fail(f"TensorRT is not available here: {reason}. `btp doctor --gpu` checks this machine; "
             f"ONNX Runtime runs the same model.onnx without it (btp run --backend ort-cpu).")
    precision = "int8" if int8 or qdq else ("fp16" if fp16 else "fp32")
    try:
        result = trt_export.cached_engine(model, precision=precision, batch=(min_batch, opt_batch, max_batch),
                                          workspace_mb=workspace, cache_dir=cache_dir, calib_dir=calib, force=force,
                                          log=lambda line: typer.echo(line, err=True))
    except NotAvailableError as exc:
        fail(str(exc))
    size_mb = result.plan_path.stat().st_size / 1e6
    verb = f"built in {result.seconds:.1f} s" if result.built else "reused from the cache"
    typer.echo(f"{result.plan_path} ({size_mb:.1f} MB, {precision}, {verb}); manifest {result.manifest_path}")
