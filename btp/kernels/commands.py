"""`btp doctor` (owned by btp.kernels)."""
from __future__ import annotations

from btp._placeholder import not_available


def doctor() -> None:
    """Check this machine: GPU, CUDA kernels, TensorRT, ONNX Runtime providers."""
    not_available("doctor", "lands with the GPU issue")
