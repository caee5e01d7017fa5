"""`btp build` (owned by the GPU/TensorRT work: btp.export.tensorrt)."""
from __future__ import annotations

from btp._placeholder import not_available


def build() -> None:
    """Build a TensorRT engine from model.onnx (engine cache keyed by GPU + TensorRT + model hash)."""
    not_available("build", "TensorRT engines land with the GPU issue")
