"""`btp doctor [--gpu]`: what this machine can run, and why not (GPU, CUDA bindings, kernels,
TensorRT, ONNX Runtime, and which preprocessing `btp-run --preprocess auto` takes)."""
from __future__ import annotations

import platform
from dataclasses import dataclass

import typer


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: informational
    detail: str


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return getattr(mod, "__version__", "?")


def collect_checks(gpu: bool = False) -> list[Check]:
    """The doctor's findings, in order. gpu=True also runs the kernels on the GPU against btp.geometry."""
    from btp.kernels import build
    from btp.kernels.devices import gpu_identity, gpu_unavailable_reason, unavailable_reasons

    checks = [Check("python", None, f"{platform.python_version()} on {platform.machine()} ({platform.system()})")]
    import numpy

    checks.append(Check("numpy", True, numpy.__version__))
    ort = _version("onnxruntime")
    if ort is None:
        checks.append(Check("onnxruntime", False, "not importable (pip install onnxruntime)"))
    else:
        import onnxruntime

        checks.append(Check("onnxruntime", True, f"{ort}; providers {', '.join(onnxruntime.get_available_providers())}"))
    nvcc = build.find_nvcc()
    if nvcc:
        archs = build.nvcc_archs(nvcc)
        wanted = [a for a in build.FATBIN_ARCHS if a in archs]
        checks.append(Check("nvcc", True, f"{nvcc} (CUDA {build.nvcc_version(nvcc)}); fatbin archs sm_{', sm_'.join(map(str, wanted))}"))
    else:
        checks.append(Check("nvcc", False, "not found: the kernels need it once to build their fatbin (or set CUDACXX)"))
    try:
        checks.append(Check("kernel emulation (g++)", True, f"built {build.emu_library().name}"))
    except Exception as exc:  # noqa: BLE001
        checks.append(Check("kernel emulation (g++)", False, str(exc).splitlines()[0]))
    for binding, why in unavailable_reasons().items():
        checks.append(Check(f"CUDA binding {binding}", why is None, why or "usable"))
    reason = gpu_unavailable_reason()
    if reason:
        checks.append(Check("CUDA GPU", False, reason))
    else:
        name, arch = gpu_identity(0)
        checks.append(Check("CUDA GPU", True, f"{name} sm_{arch.replace('.', '')}"))
    checks.append(Check("preprocess auto", None, "cuda (our kernels on the GPU) for models btp's kernels implement"
                        if reason is None else f"cpu: {reason}"))
    from btp.runtime.tensorrt import tensorrt_unavailable_reason

    trt_reason = tensorrt_unavailable_reason()
    checks.append(Check("TensorRT", trt_reason is None, trt_reason or f"tensorrt {_version('tensorrt')}"))
    torch_version = _version("torch")
    if torch_version is None:
        checks.append(Check("torch", None, "not installed (only training needs it)"))
    else:
        import torch

        cuda_ok = torch.cuda.is_available()
        checks.append(Check("torch", None, f"{torch_version}; CUDA {'available: ' + torch.cuda.get_device_name(0) if cuda_ok else 'not available'}"))
    if gpu and reason is None:
        checks.append(_gpu_smoke())
    return checks


def _gpu_smoke() -> Check:
    """FPS + kNN grouping of a real-size cloud on the GPU vs btp.geometry (exact equality)."""
    import numpy as np

    from btp import geometry
    from btp.kernels import ops
    from btp.kernels.devices import open_device

    try:
        dev = open_device("auto")
        points = np.random.default_rng(0).normal(size=(2048, 3)).astype(np.float32)
        got = ops.group(dev, points, 512, 32, start_idx=0)
        ref = geometry.group(points, 512, 32, start_idx=0)
        equal = all(np.array_equal(a, b) for a, b in zip(got, ref))
        dev.close()
        detail = f"{dev.name} ({dev.how_loaded}): FPS 2048->512 + kNN 32 " + ("equal to btp.geometry" if equal else "DIFFER from btp.geometry")
        return Check("kernels on the GPU", equal, detail)
    except Exception as exc:  # noqa: BLE001 - report, do not crash the doctor
        return Check("kernels on the GPU", False, f"{type(exc).__name__}: {exc}")


def doctor(gpu: bool = typer.Option(False, "--gpu", help="also run the CUDA kernels here and compare them with the CPU "
                                                         "(exit 2 when there is no usable GPU)")) -> None:
    """Check this machine: GPU, CUDA kernels, TensorRT, ONNX Runtime providers."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    checks = collect_checks(gpu)
    table = Table(title="btp doctor" + (" --gpu" if gpu else ""))
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for c in checks:
        status = {True: "[green]ok[/]", False: "[red]missing[/]", None: "-"}[c.ok]
        table.add_row(c.name, status, escape(c.detail))
    Console().print(table)
    if gpu:
        gpu_check = next(c for c in checks if c.name == "CUDA GPU")
        if not gpu_check.ok:
            typer.echo(f"btp doctor --gpu: no usable GPU: {gpu_check.detail}", err=True)
            raise typer.Exit(code=2)
        if not all(c.ok for c in checks if c.name == "kernels on the GPU"):
            raise typer.Exit(code=1)
