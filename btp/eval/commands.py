"""`btp eval` (owned by btp.eval)."""
from __future__ import annotations

from btp._placeholder import not_available


def evaluate() -> None:
    """Zero-shot evaluation on Anomaly-ShapeNet / Real3D-AD layouts."""
    not_available("eval", "evaluation lands with the training issue")
