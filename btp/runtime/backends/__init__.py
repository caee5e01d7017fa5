"""Engine backends behind one contract (docs/design.md): an object with ``name: str`` and
``run(neighborhood float32 [B,G,K,C], center float32 [B,G,3]) -> dict[str, np.ndarray]`` keyed by
the ONNX output names. ``make_backend`` picks one by name; heavy imports happen on demand.

The backends, whether each needs a GPU, its pip extra and options are the rows of
``btp.contract.BACKENDS`` (``module`` names the file here that implements it).

A backend that also has ``device``, ``input_buffers()`` and ``enqueue(batch)`` (trt, and ort-cuda
made with ``device_resident=True``) takes its inputs from device buffers our kernels write and
leaves its outputs on the device (``btp.runtime.device.DeviceChain``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from btp import contract
from btp.runtime.backends.errors import BackendError

BACKENDS = contract.backend_names()


class Backend(Protocol):
    name: str

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]: ...


def make_backend(name: str, model_path: str | Path, meta, *, threads: int | None = None,
                 device_resident: bool = False, **options) -> Backend:
    """The backend called ``name`` for ``model_path`` (``meta``: its ``ModelMeta``).

    ``device_resident``: ort-cuda binds its inputs/outputs to device buffers (trt always does);
    ``options`` go to the backend's constructor (e.g. ``precision="fp16"`` for trt).
    ``auto``: the backend of the model's precision (``auto_backend``)."""
    if name == contract.AUTO_BACKEND:
        name = auto_backend(meta)
    try:
        row = contract.backend(name)
    except ValueError as exc:
        raise BackendError(str(exc)) from None
    if row.module == "ort":
        from btp.runtime.backends.ort import OrtBackend

        return OrtBackend(model_path, meta, provider=name, threads=threads,
                          device_resident=device_resident and "device_resident" in row.options, **options)
    if row.module == "trt":
        try:
            from btp.runtime.backends import trt
        except ImportError as exc:  # TensorRT / pycuda themselves are imported in the constructor
            raise BackendError(f"backend 'trt' is not available here ({exc}); use --backend ort-cpu, "
                               "or install the [gpu] extra on a machine with an NVIDIA GPU") from exc
        return trt.TensorRTBackend(model_path, meta, **options)
    from btp.runtime.backends.openvino import OpenVinoBackend

    return OpenVinoBackend(model_path, meta, name=name, threads=threads, **options)


def auto_backend(meta) -> str:
    """The backend a model runs on by default: its precision's (btp.contract.PRECISIONS); a bf16
    model where OpenVINO's bf16 cannot run falls back to ort-cpu (float32 inside, a warning)."""
    import warnings

    precision = meta.precision if meta is not None else "fp32"
    name = contract.precision_backend(precision)
    if name == "openvino-bf16":
        from btp.runtime.backends.openvino import bf16_unavailable

        reason = bf16_unavailable()
        if reason:
            warnings.warn(f"a bf16 model runs in float32 on ort-cpu here: {reason}", RuntimeWarning, stacklevel=3)
            return contract.DEFAULT_BACKEND
    return name
