"""Who measured: the machine header of every report (CPU model, cores, GPU, library versions).

Torch-free: torch's version is read from its package metadata, never by importing it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shutil
import subprocess
from importlib import metadata

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
LIBRARIES = ("btp-edge", "numpy", "scipy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch",
             "fpsample", "pykdtree", "open3d", "tensorrt", "pycuda", "psutil")


def package_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, or None."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """CPU brand string (py-cpuinfo, then /proc/cpuinfo, then platform)."""
    try:
        import cpuinfo

        brand = cpuinfo.get_cpu_info().get("brand_raw")
        if brand:
            return str(brand)
    except Exception:  # noqa: BLE001 - py-cpuinfo probes the CPU in a subprocess; never fatal
        pass
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide FP32/INT8 speed (AVX2, AVX-512, VNNI, AMX), as present."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return [f for f in wanted if f in flags]


def gpus() -> list[dict[str, str]]:
    """NVIDIA GPUs via nvidia-smi (name, memory, driver); empty where there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            rows.append({"name": parts[0], "memory": parts[1], "driver": parts[2],
                         "compute_capability": parts[3] if len(parts) > 3 else ""})
    return rows


def describe_machine() -> dict:
    """The header every report carries."""
    import psutil

    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "gpus": gpus(),
        "libraries": {name: v for name in LIBRARIES if (v := package_version(name)) is not None},
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def machine_slug(machine: dict) -> str:
    """A short file-name-safe machine name: 'cpu-intel-xeon-2c' or 'gpu-nvidia-h100-...'."""
    if machine.get("gpus"):
        base = "gpu-" + machine["gpus"][0]["name"]
    else:
        base = "cpu-" + machine.get("cpu_model", "unknown") + f"-{machine.get('usable_cores', '?')}c"
    base = re.sub(r"\((r|tm)\)|processor|cpu @.*|@.*", "", base.lower())
    base = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    return re.sub(r"-+", "-", base)


def machine_line(machine: dict) -> str:
    """One human line: CPU, cores, memory, GPU, key library versions."""
    libs = machine.get("libraries", {})
    keys = ("onnxruntime", "onnxruntime-gpu", "torch", "numpy", "fpsample", "pykdtree", "open3d", "scipy",
            "tensorrt")
    lib_text = ", ".join(f"{k} {libs[k]}" for k in keys if k in libs)
    gpu = "; ".join(g["name"] for g in machine.get("gpus", [])) or "no GPU"
    env = ", ".join(f"{k}={v}" for k, v in machine.get("thread_env", {}).items()) or "no thread env vars set"
    return (f"{machine.get('cpu_model')} ({machine.get('usable_cores')} usable cores, "
            f"{', '.join(machine.get('cpu_flags', [])) or 'no SIMD flags read'}), "
            f"{machine.get('memory_gb')} GB RAM, {gpu}; Python {machine.get('python')}; {lib_text}; {env}")


def date_tag(machine: dict) -> str:
    return str(machine.get("date_utc", ""))[:10] or _dt.date.today().isoformat()
