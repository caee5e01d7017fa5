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


@dataclass(frozen=True, kw_only=True)
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


def check_score_threshold(value, what: str = "threshold") -> float:
    """A finite float in [0, 1], or CalibrationError: object scores lie in [0, 1], so a threshold
    outside it would decide every part the same."""
    value = check_threshold(value, what)
    if not 0.0 <= value <= 1.0:
        raise CalibrationError(f"{what} {value:.6g}: object scores lie in [0, 1], so this would decide every part "
                               "the same; give a value in [0, 1] (`btp calibrate` picks one from good scans)")
    return value


def check_margin(value, what: str = "--margin") -> float:
    """A finite margin in [-1, 1] (a larger one puts any threshold outside the scores' [0, 1])."""
    value = check_threshold(value, what)
    if not -1.0 <= value <= 1.0:
        raise CalibrationError(f"{what} {value:.6g}: object scores lie in [0, 1], so a margin beyond +-1 puts the "
                               "threshold outside them; give a small margin such as 0.02")
    return value


def calibrate_threshold(scores, quantile: float = 1.0, margin: float = 0.0) -> float:
    """quantile_q(scores) + margin (numpy's linear quantile; q = 1.0 is the max); CalibrationError
    when the sum leaves [0, 1], where object scores lie."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise CalibrationError("no good scans could be scored; nothing to calibrate on")
    if not np.isfinite(s).all():
        raise CalibrationError("some object scores are not finite; nothing to calibrate on")
    if not 0.0 <= check_threshold(quantile, "quantile") <= 1.0:
        raise CalibrationError(f"quantile={quantile}: expected a value in [0, 1]")
    base = float(np.quantile(s, quantile))
    value = check_threshold(base + check_margin(margin))
    if not 0.0 <= value <= 1.0:
        raise CalibrationError(f"quantile {quantile} of the good scores ({base:.4f}) + --margin {margin:.6g} = "
                               f"{value:.4f}, outside [0, 1] where object scores lie: every part would be decided "
                               f"the same; give a --margin between {-base:.4f} and {1 - base:.4f}")
    return value


def make_threshold(model_path: str | Path, scores, quantile: float, margin: float, model_name: str = "") -> Threshold:
    value = calibrate_threshold(scores, quantile, margin)
    return Threshold(value=value, quantile=quantile, margin=margin, n_scans=len(scores),
                     scores=tuple(float(s) for s in scores), model_sha256=file_sha256(model_path),
                     model_name=model_name, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


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
        check_score_threshold(threshold.value, "value")
    except (OSError, ValueError, TypeError) as exc:
        raise CalibrationError(f"{path}: not a usable btp threshold sidecar ({exc}); "
                               "re-create it with `btp calibrate`") from exc
    if model_path is not None and threshold.model_sha256 != file_sha256(model_path):
        raise CalibrationError(f"{path}: calibrated for another model (sha256 {threshold.model_sha256[:12]}...) than "
                               f"{model_path}; re-run `btp calibrate {model_path} GOOD_SCANS...` or pass --threshold")
    return threshold


def find_threshold(model_path: str | Path) -> Threshold | None:
    """The sidecar next to ``model_path`` if there is one (checked against the model's sha256)."""
    path = sidecar_path(model_path)
    return read_threshold(path, model_path) if path.is_file() else None


# Good scans of one part type have about the same size and shape; a spread beyond these says the
# scans are of different parts (one threshold over them fits the part that scores highest).
PART_SIZE_RATIO = 1.5
PART_SHAPE_GAP = 0.25


def part_signature(points: np.ndarray, subset: int = 20000) -> np.ndarray:
    """float64 [3]: a scan's global shape - its spread along its principal axes (standard
    deviations, largest first), on a strided subset of at most ``subset`` points."""
    pts = np.asarray(points)[::max(1, len(points) // subset)].astype(np.float64)
    return np.sqrt(np.maximum(np.linalg.eigvalsh(np.cov(pts, rowvar=False))[::-1], 0.0))


def mixed_parts(signatures: list[np.ndarray], names: list[str]) -> str | None:
    """A warning when the good scans (their ``part_signature``) are clearly of different parts -
    sizes more than PART_SIZE_RATIO apart, or principal-axis proportions more than PART_SHAPE_GAP
    apart - naming the two scans furthest apart; None when they look like one part."""
    if len(signatures) < 2:
        return None
    sig = np.asarray(signatures, dtype=np.float64)  # [S, 3]
    size = sig[:, 0]
    shape = sig[:, 1:] / np.maximum(size[:, None], 1e-300)  # [S, 2] proportions of the largest spread
    small, large = int(np.argmin(size)), int(np.argmax(size))
    if size[large] > PART_SIZE_RATIO * size[small]:
        a, b, why = small, large, f"sizes {size[small]:.3g} and {size[large]:.3g} (spread along the main axis)"
    else:
        gap = np.abs(shape[:, None, :] - shape[None, :, :]).max(axis=2)  # [S, S]
        a, b = np.unravel_index(int(np.argmax(gap)), gap.shape)
        if gap[a, b] <= PART_SHAPE_GAP:
            return None
        why = f"proportions {shape[a].round(2).tolist()} and {shape[b].round(2).tolist()} of the main axis"
    return (f"the good scans look like different parts ({names[a]} and {names[b]}: {why}); one threshold over "
            "several part types misses defects on the ones that score lower: calibrate each part type "
            "separately (`btp calibrate MODEL PART_SCANS -o PART.threshold.json` per type, then btp-run each type "
            "with its --threshold)")
