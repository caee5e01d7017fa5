"""Heat colours for per-point anomaly scores: a small turbo look-up table, no matplotlib.

Turbo (Google's rainbow-like perceptual colormap, Apache-2.0): 33 control colours sampled
evenly from the reference table, linearly interpolated to 256 entries (within 4/255 of the
full table; a test compares with matplotlib's). Blue = low score, red = high score.
Torch-free.
"""
from __future__ import annotations

import numpy as np

# turbo at t = 0, 1/32, ..., 1 (uint8 RGB)
_TURBO_CONTROL = np.array([
    [48, 18, 59], [57, 42, 115], [64, 64, 162], [68, 86, 199], [70, 107, 227], [70, 128, 246],
    [66, 148, 255], [55, 168, 250], [40, 188, 235], [28, 205, 216], [24, 221, 194], [31, 233, 175],
    [50, 242, 152], [78, 249, 125], [109, 254, 98], [139, 255, 75], [164, 252, 60], [185, 246, 53],
    [205, 236, 52], [223, 223, 55], [238, 207, 58], [248, 190, 57], [253, 172, 52], [254, 150, 43],
    [251, 126, 33], [244, 102, 23], [235, 80, 14], [223, 63, 8], [208, 47, 5], [190, 33, 2],
    [169, 22, 1], [146, 11, 1], [122, 4, 3],
], dtype=np.float64)


def _turbo_lut() -> np.ndarray:
    control_t = np.linspace(0.0, 1.0, _TURBO_CONTROL.shape[0])
    t = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.interp(t, control_t, _TURBO_CONTROL[:, c]) for c in range(3)], axis=1)  # [256, 3]
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


TURBO_LUT: np.ndarray = _turbo_lut()  # uint8 [256, 3]
NAN_COLOR = np.array([128, 128, 128], dtype=np.uint8)  # points without a finite score


def heat_colors(scores: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Per-point scores ``[N]`` -> uint8 RGB ``[N, 3]`` on the turbo colormap.

    ``vmin``/``vmax`` default to the min/max of the finite scores; values outside are clipped.
    A constant score maps to the low (blue) end; NaN/inf scores are grey.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    finite = np.isfinite(scores)
    colors = np.empty((scores.shape[0], 3), dtype=np.uint8)
    colors[:] = NAN_COLOR
    if not finite.any():
        return colors
    lo = float(np.min(scores[finite])) if vmin is None else float(vmin)
    hi = float(np.max(scores[finite])) if vmax is None else float(vmax)
    span = hi - lo
    t = (scores[finite] - lo) / span if span > 0 else np.zeros(int(finite.sum()))
    idx = np.clip(np.round(t * 255.0), 0, 255).astype(np.int64)
    colors[finite] = TURBO_LUT[idx]
    return colors
