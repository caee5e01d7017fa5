"""Engine backends behind one contract (docs/design.md): an object with ``name: str`` and
``run(neighborhood float32 [B,G,K,C], center float32 [B,G,3]) -> dict[str, np.ndarray]`` keyed by
the ONNX output names. ``make_backend`` picks one by name; heavy imports happen on demand.

| name     | what                                          | module                      |
|----------|-----------------------------------------------|-----------------------------|
| ort-cpu  | ONNX Runtime, CPUExecutionProvider            | backends/ort.py             |
| ort-cuda | ONNX Runtime, CUDAExecutionProvider           | backends/ort.py             |
| ort-trt  | ONNX Runtime, TensorrtExecutionProvider       | backends/ort.py             |
| trt      | TensorRT engine                               | backends/trt.py             |
| openvino | OpenVINO CPU plugin, float32 (optional extra) | backends/openvino.py        |
| openvino-bf16 | OpenVINO CPU plugin, bfloat16 inside     | backends/openvino.py        |

A backend that also has ``device``, ``input_buffers()`` and ``enqueue(batch)`` (trt, and ort-cuda
made with ``device_resident=True``) takes its inputs from device buffers our kernels write and
leaves its outputs on the device (``btp.runtime.device.DeviceChain``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from btp.errors import BTPError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt", "openvino", "openvino-bf16")


class BackendError(BTPError, RuntimeError):
    """A backend cannot be created on this machine (missing provider / GPU / package)."""


class Backend(Protocol):
    name: str

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]: ...


def make_backend(name: str, model_path: str | Path, meta, *, threads: int | None = None,
                 device_resident: bool = False, **options) -> Backend:
    """The backend called ``name`` for ``model_path`` (``meta``: its ``ModelMeta``).

    ``device_resident``: ort-cuda binds its inputs/outputs to device buffers (trt always does);
    ``options`` go to the backend's constructor (e.g. ``precision="fp16"`` for trt)."""
    if name in ("ort-cpu", "ort-cuda", "ort-trt"):
        from btp.runtime.backends.ort import OrtBackend

        return OrtBackend(model_path, meta, provider=name, threads=threads,
                          device_resident=device_resident and name == "ort-cuda", **options)
    if name == "trt":
        try:
            from btp.runtime.backends import trt
        except ImportError as exc:  # TensorRT / pycuda themselves are imported in the constructor
            raise BackendError(f"backend 'trt' is not available here ({exc}); use --backend ort-cpu, "
                               "or install the [gpu] extra on a machine with an NVIDIA GPU") from exc
        return trt.TensorRTBackend(model_path, meta, **options)
    if name in ("openvino", "openvino-bf16"):
        from btp.runtime.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(model_path, meta, name=name, threads=threads, **options)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
