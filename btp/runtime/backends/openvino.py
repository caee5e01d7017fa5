"""OpenVINO backend: ``openvino`` (float32) and ``openvino-bf16`` (bfloat16 inside the graph on
CPUs with native bf16: AVX512-BF16 / AMX), the same model.onnx compiled by OpenVINO's CPU plugin.

OpenVINO is not a btp-edge dependency (``pip install 'btp-edge[openvino]'``). Compile options:
latency hint, ``INFERENCE_PRECISION_HINT`` f32 or bf16 (OpenVINO's own default on bf16 CPUs is
bf16, so float32 is asked for explicitly), ``INFERENCE_NUM_THREADS`` from ``threads``. Outputs are
copied out of the request's buffers (the next call reuses them).
Measured against ONNX Runtime on one model in one run: ``btp-bench engines``
(benchmarks/results/engines-*).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from btp.runtime.backends.errors import BackendError

PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16"}


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), and which of the two
    flags it has (or why that is unknown). Without them OpenVINO would emulate bf16: slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "the CPU's flags cannot be read here (no /proc/cpuinfo)"
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")),
                 set())
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return bool(native), ", ".join(native) or "neither avx512_bf16 nor amx_bf16"


def bf16_unavailable() -> str:
    """Why ``openvino-bf16`` cannot run here ("" when it can)."""
    native, flags = cpu_bf16()
    if not native:
        return f"this CPU has no native bfloat16 ({flags})"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "OpenVINO is not installed (pip install 'btp-edge[openvino]')"
    return ""


class OpenVinoBackend:
    """``run(neighborhood [B,G,K,C], center [B,G,3]) -> {output name: array}`` with OpenVINO (CPU)."""

    def __init__(self, model_path: str | Path, meta=None, *, name: str = "openvino", threads: int | None = None):
        if name not in PRECISIONS:
            raise BackendError(f"unknown OpenVINO backend {name!r}; choose one of {', '.join(PRECISIONS)}")
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendError(f"backend {name!r} needs OpenVINO ({exc}); pip install 'btp-edge[openvino]', "
                               "or use --backend ort-cpu") from None
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": PRECISIONS[name]}
        if threads is not None:
            if threads < 1:
                raise BackendError(f"threads={threads}: expected a positive number of threads")
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(model_path), "CPU", config)
        except Exception as exc:  # OpenVINO's own read / compile errors
            raise BackendError(f"{model_path}: OpenVINO cannot compile this model ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        self.name = name
        self.meta = meta
        self.request = self.compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.device = None

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
        result = self.request.infer({"neighborhood": np.ascontiguousarray(neighborhood, np.float32),
                                     "center": np.ascontiguousarray(center, np.float32)})
        return {name: np.array(result[self.compiled.output(name)]) for name in self.output_names}
