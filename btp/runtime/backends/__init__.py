"""Engine backends behind one contract (docs/design.md): an object with ``name: str`` and
``run(neighborhood float32 [B,G,K,C], center float32 [B,G,3]) -> dict[str, np.ndarray]`` keyed by
the ONNX output names. ``make_backend`` picks one by name; heavy imports happen on demand.

| name     | what                                          | module                      |
|----------|-----------------------------------------------|-----------------------------|
| ort-cpu  | ONNX Runtime, CPUExecutionProvider            | backends/ort.py             |
| ort-cuda | ONNX Runtime, CUDAExecutionProvider           | backends/ort.py             |
| ort-trt  | ONNX Runtime, TensorrtExecutionProvider       | backends/ort.py             |
| trt      | TensorRT engine (+ CUDA pre/post kernels)     | backends/trt.py (GPU work)  |
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from btp.errors import BTPError

BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt", "trt")


class BackendError(BTPError, RuntimeError):
    """A backend cannot be created on this machine (missing provider / GPU / package)."""


class Backend(Protocol):
    name: str

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]: ...


def make_backend(name: str, model_path: str | Path, meta, *, threads: int | None = None) -> Backend:
    """The backend called ``name`` for ``model_path`` (``meta``: its ``ModelMeta``)."""
    if name in ("ort-cpu", "ort-cuda", "ort-trt"):
        from btp.runtime.backends.ort import OrtBackend

        return OrtBackend(model_path, meta, provider=name, threads=threads)
    if name == "trt":
        try:
            from btp.runtime.backends import trt
        except ImportError as exc:
            raise BackendError(f"backend 'trt' is not available here ({exc}); use --backend ort-cpu, "
                               "or install the [gpu] extra on a machine with an NVIDIA GPU") from exc
        if not hasattr(trt, "TrtBackend"):
            raise BackendError("btp.runtime.backends.trt defines no TrtBackend(model_path, meta) yet")
        return trt.TrtBackend(model_path, meta)
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
