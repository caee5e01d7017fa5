"""The kernels' signatures and launch geometry: one table shared by the emulation and pycuda.

Torch-free, pycuda-free. ``KERNELS`` maps each ``extern "C" __global__`` function in
``btp/kernels/*.cu`` to its parameter kinds ("P" pointer, may be null; "i" int32; "f" float32),
which is also pycuda's ``prepare`` format. tests/test_kernels_compile.py checks the table
against the .cu sources, so a changed signature cannot go unnoticed.
"""
from __future__ import annotations

from dataclasses import dataclass

KERNEL_FILES = ("fps.cu", "group.cu", "normalize.cu", "scores.cu")

KERNELS: dict[str, tuple[str, str]] = {
    # name: (source file, parameter kinds)
    "btp_fps": ("fps.cu", "PiiPPP"),
    "btp_fps_wide_init": ("fps.cu", "iiiPPPP"),
    "btp_fps_wide_step": ("fps.cu", "PiiiPPPPP"),
    "btp_gather_rows": ("fps.cu", "PPiiiP"),
    "btp_knn_group": ("group.cu", "PPPiiiifPPPP"),
    "btp_normalize": ("normalize.cu", "PiPP"),
    "btp_scatter_patch_scores": ("scores.cu", "PiPiiiPP"),
    "btp_finish_point_scores": ("scores.cu", "PPPPPiiP"),
    "btp_interpolate_nearest": ("scores.cu", "PPiPiP"),
}

# the hot kernels: the resource check forbids register spills in them
HOT_KERNELS = ("btp_fps", "btp_fps_wide_step", "btp_knn_group", "btp_interpolate_nearest")

MAX_K = 64  # BTP_KNN_MAX_K in group.cu
MAX_BLOCK = 1024
WARP = 32


@dataclass(frozen=True)
class Launch:
    """grid (x, y) and block x of one kernel launch."""

    grid: tuple[int, int]
    block: int


@dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Threads per block for each kernel family (multiples of 32).

    Defaults are for real GPUs; the emulation tests pass small ones (64) to stay fast. FPS runs
    one block per cloud, so its block is the only parallelism inside a cloud: as large as
    allowed. kNN runs one thread per center: small blocks spread G centers over more SMs.
    Clouds of ``fps_wide_from`` points or more use the wide FPS instead (``fps_wide_blocks``
    blocks of ``elementwise`` threads per cloud, one launch per step). None of these numbers
    has been measured on a GPU yet (docs/gpu.md).
    """

    fps: int = 1024
    knn: int = 64
    elementwise: int = 256
    fps_wide_from: int = 65536
    fps_wide_blocks: int = 128

    def __post_init__(self) -> None:
        if self.fps_wide_blocks < 1:
            raise ValueError(f"BlockSizes.fps_wide_blocks={self.fps_wide_blocks}: must be >= 1")
        for name in ("fps", "knn", "elementwise"):
            value = getattr(self, name)
            if value <= 0 or value % WARP or value > MAX_BLOCK:
                raise ValueError(f"BlockSizes.{name}={value}: must be a multiple of {WARP} in 32..{MAX_BLOCK}")


def _blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def fps_launch(batch: int, block: int) -> Launch:
    """btp_fps: one block per cloud."""
    return Launch((batch, 1), block)


def normalize_launch(batch: int, block: int) -> Launch:
    """btp_normalize: one block per cloud."""
    return Launch((batch, 1), block)


def fps_wide_init_launch(batch: int, n_points: int, block: int) -> Launch:
    """btp_fps_wide_init: grid-stride over B * N (at most 1024 blocks)."""
    return Launch((min(1024, _blocks(batch * n_points, block)), 1), block)


def fps_wide_step_launch(batch: int, n_points: int, block: int, max_blocks: int) -> Launch:
    """btp_fps_wide_step: up to max_blocks blocks per cloud (grid y = cloud)."""
    return Launch((min(max_blocks, _blocks(n_points, block)), batch), block)


def gather_launch(batch: int, n_idx: int, n_channels: int, block: int) -> Launch:
    """btp_gather_rows: one thread per (row, channel)."""
    return Launch((_blocks(n_idx * n_channels, block), batch), block)


def knn_launch(batch: int, n_groups: int, block: int) -> Launch:
    """btp_knn_group: one thread per center."""
    return Launch((_blocks(n_groups, block), batch), block)


def scatter_launch(batch: int, n_groups: int, k: int, block: int) -> Launch:
    """btp_scatter_patch_scores: one thread per (center, neighbour)."""
    return Launch((_blocks(n_groups * k, block), batch), block)


def points_launch(batch: int, n_points: int, block: int) -> Launch:
    """btp_finish_point_scores / btp_interpolate_nearest: one thread per point."""
    return Launch((_blocks(n_points, block), batch), block)


def check_sizes(n_points: int, n_samples: int | None = None, k: int | None = None,
                n_channels: int | None = None) -> None:
    """Refuse sizes the kernels cannot take (int32 indices, K <= 64, C in (3, 6))."""
    if not 1 <= n_points < 2**31 // 3:
        raise ValueError(f"n_points={n_points}: the kernels index with int32 (1 <= N < {2**31 // 3})")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples={n_samples}: must be >= 1")
    if k is not None and not 1 <= k <= min(MAX_K, n_points):
        raise ValueError(f"k={k}: the kNN kernel takes 1 <= K <= min({MAX_K}, N={n_points})")
    if n_channels is not None and n_channels not in (3, 6):
        raise ValueError(f"n_channels={n_channels}: expected 3 (xyz) or 6 (xyz + rgb)")
