"""`btp run` / `btp-run`, `btp calibrate`, `btp demo` (owned by btp.runtime). Torch-free."""
from __future__ import annotations

from btp._placeholder import not_available


def run() -> None:
    """Score point-cloud files with model.onnx."""
    not_available("run", "the runtime lands with the export/runtime issue")


def calibrate() -> None:
    """Pick an object-score threshold from known-good scans."""
    not_available("calibrate", "calibration lands with the export/runtime issue")


def demo() -> None:
    """The main job: export the default model, score sample scans, print a table, write heat maps."""
    not_available("demo", "the demo lands with the export/runtime issue")
