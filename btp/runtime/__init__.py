"""The torch-free runtime: ``Pipeline(model.onnx)`` -> ``Result`` (docs/design.md "btp.runtime").

    from btp.runtime import Pipeline
    result = Pipeline("model.onnx", backend="ort-cpu")(points)

Imports are lazy so that ``btp --help`` stays instant.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Pipeline": "btp.runtime.pipeline",
    "Result": "btp.runtime.pipeline",
    "ScanOutcome": "btp.runtime.outcome",
    "ModelMeta": "btp.runtime.metadata",
    "ModelMetadataError": "btp.runtime.metadata",
    "read_model_meta": "btp.runtime.metadata",
    "make_backend": "btp.runtime.backends",
    "BackendError": "btp.runtime.backends",
    "Threshold": "btp.runtime.calibration",
    "calibrate_threshold": "btp.runtime.calibration",
    "read_threshold": "btp.runtime.calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'btp.runtime' has no attribute {name!r}")
