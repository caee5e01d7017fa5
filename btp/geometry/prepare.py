"""Raw scan -> the model's N normalised points: the one rule of btp eval and training; btp.runtime.Pipeline
runs the same two calls as its timed downsample / normalize stages (btp.runtime.stages).

``sample_points(raw [M,3], pre, method) -> SampledPoints`` (indices into the raw scan, the N
normalised points, and the normalisation that maps them back), by ``PreprocessConfig``:

- ``normalize = "unit_sphere"``: downsample the raw scan to N, then centre the N points at their
  centroid and divide by their max radius (btp's own models are trained this way);
- ``normalize = "unit_sphere_raw"``: centre and scale the whole raw scan first, then downsample
  (the official BTP-3DAD preprocessing);
- ``downsample_start = "fixed"``: the downsampling FPS starts at ``fps_start``;
  ``"seeded-random"``: at ``seeded_start(M, downsample_seed)``, the index the official code's
  ``torch.manual_seed(seed); torch.randint(0, M, (1,))`` draws on the CPU.
- A scan of M <= N points is used as it is (``arange(M)``): FPS of all its points would only
  permute them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from btp.config import PreprocessConfig
from btp.geometry.normalize import normalize
from btp.geometry.sampling import downsample


@dataclass(frozen=True, kw_only=True)
class SampledPoints:
    """sample_idx int64 [N] into the raw scan; points float32 [N, 3] normalised; centre float32 [3]
    and scale with raw[sample_idx] ~= points * scale + centre."""

    sample_idx: np.ndarray
    points: np.ndarray
    centre: np.ndarray
    scale: float


def seeded_start(n_points: int, seed: int = 0) -> int:
    """First draw of ``torch.randint(0, n_points, (1,))`` after ``torch.manual_seed(seed)`` on the
    CPU: torch's generator is MT19937 (seeded by init_genrand) and takes ``next32 % n`` for
    ranges below 2**32. Computed here without torch (the edge runtime has none)."""
    if not 0 < n_points < 2 ** 32:
        raise ValueError(f"seeded_start: n_points={n_points} outside 1..2**32-1")
    mt = [0] * 624
    mt[0] = seed & 0xFFFFFFFF
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
    y = (mt[0] & 0x80000000) | (mt[1] & 0x7FFFFFFF)  # the first twist, element 0 only
    y = mt[397] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    y ^= y >> 18
    return y % n_points


def downsample_start(n_points: int, pre: PreprocessConfig) -> int:
    return seeded_start(n_points, pre.downsample_seed) if pre.downsample_start == "seeded-random" else pre.fps_start


def sample_indices(points: np.ndarray, pre: PreprocessConfig, method: str = "auto") -> np.ndarray:
    """int64 [min(N, M)]: the downsampled rows of ``points`` [M, 3] (all of them when M <= N)."""
    m, n = points.shape[0], pre.num_points
    return np.arange(m, dtype=np.int64) if m <= n else downsample(points, n, downsample_start(m, pre), method)


def sample_points(raw: np.ndarray, pre: PreprocessConfig, method: str = "auto") -> SampledPoints:
    """raw float32 [M, 3] -> SampledPoints (see the module docstring)."""
    raw = np.ascontiguousarray(raw, dtype=np.float32)
    if pre.normalize == "unit_sphere_raw":
        normed, centre, scale = normalize(raw)  # [M, 3]
        idx = sample_indices(normed, pre, method)
        return SampledPoints(sample_idx=idx, points=np.ascontiguousarray(normed[idx]), centre=centre,
                             scale=float(scale))
    idx = sample_indices(raw, pre, method)
    points, centre, scale = normalize(raw[idx])
    return SampledPoints(sample_idx=idx, points=points, centre=centre, scale=float(scale))
