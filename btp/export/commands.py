"""`btp export` / `btp-export` and `btp build` (owned by btp.export)."""
from __future__ import annotations

from btp._placeholder import not_available


def export() -> None:
    """Export a BTP checkpoint to one self-describing model.onnx."""
    not_available("export", "ONNX export lands with the export/runtime issue")


def build() -> None:
    """Build a TensorRT engine from model.onnx."""
    not_available("build", "TensorRT engines land with the GPU issue")
