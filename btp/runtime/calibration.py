"""Threshold calibration: an operating point for zero-shot object scores from known-good scans.

    threshold = quantile_q(object scores of the good scans) + margin      (q = 1.0: their max)

Stored in a sidecar next to the model, ``model.onnx`` -> ``model.threshold.json``, which btp-run
reads automatically (``--threshold`` overrides it). The sidecar names the model's sha256; a
sidecar calibrated for another model is refused with a message rather than used. Torch-free.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from btp.errors import BTPError
from btp.io.files import file_sha256

SIDECAR_SUFFIX = ".threshold.json"


class CalibrationError(BTPError, ValueError):
    """Calibration inputs or a sidecar that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Threshold:
    value: float
    quantile: float
    margin: float
    n_scans: int
    scores: tuple[float, ...]
    model_sha256: str
    model_name: str = ""
    created_at: str = ""
    source: str = "btp calibrate"


def sidecar_path(model_path: str | Path) -> Path:
    """``dir/model.onnx`` -> ``dir/model.threshold.json``."""
    p = Path(model_path)
    return p.with_name(p.stem + SIDECAR_SUFFIX)


def check_threshold(value, what: str = "threshold") -> float:
    """A finite float, or CalibrationError: a NaN threshold would call every part normal."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise CalibrationError(f"{what}={value!r}: expected a number") from None
    if not np.isfinite(value):
        raise CalibrationError(f"{what}={value}: expected a finite number (NaN or inf would decide every part the same)")
    return value


def calibrate_threshold(scores, quantile: float = 1.0, margin: float = 0.0) -> float:
    """quantile_q(scores) + margin (numpy's linear quantile; q = 1.0 is the max)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise CalibrationError("no good scans could be scored; nothing to calibrate on")
    if not np.isfinite(s).all():
        raise CalibrationError("some object scores are not finite; nothing to calibrate on")
    if not 0.0 <= check_threshold(quantile, "quantile") <= 1.0:
        raise CalibrationError(f"quantile={quantile}: expected a value in [0, 1]")
    return check_threshold(np.quantile(s, quantile) + check_threshold(margin, "margin"))


def make_threshold(model_path: str | Path, scores, quantile: float, margin: float, model_name: str = "") -> Threshold:
    value = calibrate_threshold(scores, quantile, margin)
    return Threshold(value, quantile, margin, len(scores), tuple(float(s) for s in scores), file_sha256(model_path),
                     model_name, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def write_threshold(path: str | Path, threshold: Threshold) -> Path:
    from btp.runtime.outputs import write_json

    return write_json(path, asdict(threshold))


def read_threshold(path: str | Path, model_path: str | Path | None = None) -> Threshold:
    """Read a sidecar; with ``model_path``, refuse one made for a different model (sha256)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        doc["scores"] = tuple(doc.get("scores", ()))
        threshold = Threshold(**doc)
        check_threshold(threshold.value, "value")
    except (OSError, ValueError, TypeError) as exc:
        raise CalibrationError(f"{path}: not a btp threshold sidecar ({exc}); "
                               "re-create it with `btp calibrate`") from exc
    if model_path is not None and threshold.model_sha256 != file_sha256(model_path):
        raise CalibrationError(f"{path}: calibrated for another model (sha256 {threshold.model_sha256[:12]}...) than "
                               f"{model_path}; re-run `btp calibrate {model_path} GOOD_SCANS...` or pass --threshold")
    return threshold


def find_threshold(model_path: str | Path) -> Threshold | None:
    """The sidecar next to ``model_path`` if there is one (checked against the model's sha256)."""
    path = sidecar_path(model_path)
    return read_threshold(path, model_path) if path.is_file() else None
