"""`btp export` / `btp-export` (owned by btp.export; `btp build` is in trt_commands.py)."""
from __future__ import annotations

from btp._placeholder import not_available


def export() -> None:
    """Export a BTP checkpoint to one self-describing model.onnx."""
    not_available("export", "ONNX export lands with the export/runtime issue")
