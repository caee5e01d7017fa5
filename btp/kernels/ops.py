"""The kernel pipeline written once over a small ``Device`` protocol.

The same functions drive the real GPU (``btp.kernels.cuda.CudaDevice``, pycuda) and the CPU
emulation of the kernel source (``btp.kernels.emu.EmuDevice``), so the emulation tests exercise
the launch geometry, buffer sizes and stage order that run on the GPU, not a copy of them.

Two layers:
- ``enqueue_*``: device buffers in, device buffers out, nothing leaves the device (on a GPU they
  only enqueue work on the device's stream).
- ``fps`` / ``knn_group`` / ``group`` / ``propagate_patch_scores`` / ``interpolate_nearest``:
  numpy in, numpy out, shapes as in btp.geometry (plus an optional leading batch dimension).

Indices are int32 on the device, int64 in the numpy results (as btp.geometry returns them).
Torch-free; imports neither pycuda nor the emulation.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np

from btp.kernels.launch import (
    BlockSizes, Launch, check_sizes, fps_launch, fps_wide_init_launch, fps_wide_step_launch, gather_launch, knn_launch, normalize_launch, points_launch,
    scatter_launch,
)


class Device(Protocol):
    """Where buffers live and kernels run (a GPU stream, or the CPU emulation).

    ``upload(array, out=None)`` copies a host array to a new buffer, or into the first
    ``array.size`` elements of ``out`` (a larger buffer reused across calls) and returns it.
    """

    name: str

    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def upload(self, array: np.ndarray, out: Any = None) -> Any: ...
    def download(self, buf: Any) -> np.ndarray: ...
    def zero(self, buf: Any) -> None: ...
    def launch(self, kernel: str, launch: Launch, *args: Any) -> None: ...
    def pointer(self, buf: Any) -> int: ...  # the buffer's device address (engine bindings)
    def synchronize(self) -> None: ...


def upload_target(dev: Device, array: np.ndarray, out: Any = None) -> tuple[np.ndarray, Any]:
    """(contiguous host array, the buffer it goes into) for a GPU device's ``upload``: ``out`` or a
    new buffer of the array's shape; refuses a buffer that is too small or of another dtype."""
    host = np.ascontiguousarray(array)
    if out is None:
        return host, dev.empty(host.shape, host.dtype)
    if host.nbytes > out.nbytes or host.dtype != out.dtype:
        raise ValueError(f"upload: {host.dtype} x {host.size} into a {out.dtype} buffer of {out.size}")
    return host, out


class DeviceGroups(NamedTuple):
    """Device buffers of one batch after ``enqueue_group`` (shapes with the leading B)."""

    center_idx: Any    # int32 [B, G]
    patch_idx: Any     # int32 [B, G, K]
    patch_d2: Any      # float32 [B, G, K]
    neighborhood: Any  # float32 [B, G, K, C]  (the engine's first input)
    center: Any        # float32 [B, G, 3]     (the engine's second input)


# ---- device layer --------------------------------------------------------------------------

def enqueue_fps(dev: Device, points, batch: int, n_points: int, n_samples: int, start_idx,
                out_idx=None, workspace=None, blocks: BlockSizes = BlockSizes(), scratch: dict | None = None):
    """points float32 [B, N, 3], start_idx int32 [B] -> out_idx int32 [B, S] (device).

    N < blocks.fps_wide_from: ``btp_fps``, one block per cloud, one launch. Otherwise the wide
    FPS: ``btp_fps_wide_init`` then S - 1 launches of ``btp_fps_wide_step`` (many blocks per
    cloud). Both follow the same rule and give the same indices. ``scratch``: a dict kept by the
    caller in which the wide FPS's small buffers are allocated once and reused.
    """
    check_sizes(n_points, n_samples)
    out_idx = dev.empty((batch, n_samples), np.int32) if out_idx is None else out_idx
    workspace = dev.empty((batch, n_points), np.float32) if workspace is None else workspace
    if n_points < blocks.fps_wide_from:
        dev.launch("btp_fps", fps_launch(batch, blocks.fps), points, n_points, n_samples, start_idx,
                   workspace, out_idx)
        return out_idx
    step = fps_wide_step_launch(batch, n_points, blocks.elementwise, blocks.fps_wide_blocks)
    scratch = {} if scratch is None else scratch
    shapes = {"part_d": ((batch, step.grid[0]), np.float32), "part_i": ((batch, step.grid[0]), np.int32),
              "done": ((batch,), np.uint32)}
    for name, (shape, dtype) in shapes.items():
        if name not in scratch or tuple(scratch[name].shape) != shape:
            scratch[name] = dev.empty(shape, dtype)
    part_d, part_i, done = scratch["part_d"], scratch["part_i"], scratch["done"]
    dev.launch("btp_fps_wide_init", fps_wide_init_launch(batch, n_points, blocks.elementwise), n_points,
               n_samples, batch, start_idx, workspace, done, out_idx)
    for i in range(1, n_samples):
        dev.launch("btp_fps_wide_step", step, points, n_points, n_samples, i, workspace, part_d, part_i, done,
                   out_idx)
    return out_idx


def enqueue_normalize(dev: Device, points, batch: int, n_points: int, out=None, origin_scale=None,
                      blocks: BlockSizes = BlockSizes()):
    """points float32 [B, N, 3] -> (normed float32 [B, N, 3], origin_scale float32 [B, 4])."""
    check_sizes(n_points)
    out = dev.empty((batch, n_points, 3), np.float32) if out is None else out
    origin_scale = dev.empty((batch, 4), np.float32) if origin_scale is None else origin_scale
    dev.launch("btp_normalize", normalize_launch(batch, blocks.fps), points, n_points, out, origin_scale)
    return out, origin_scale


def enqueue_gather(dev: Device, src, idx, batch: int, n_src: int, n_idx: int, n_channels: int,
                   out=None, blocks: BlockSizes = BlockSizes()):
    """src float32 [B, M, C], idx int32 [B, S] -> out float32 [B, S, C] = src[b, idx[b]]."""
    out = dev.empty((batch, n_idx, n_channels), np.float32) if out is None else out
    dev.launch("btp_gather_rows", gather_launch(batch, n_idx, n_channels, blocks.elementwise),
               src, idx, n_src, n_idx, n_channels, out)
    return out


def enqueue_knn_group(dev: Device, points, colors, center_idx, batch: int, n_points: int,
                      n_groups: int, k: int, n_channels: int, rgb_fill: float,
                      out: DeviceGroups | None = None, blocks: BlockSizes = BlockSizes()) -> DeviceGroups:
    """points [B, N, 3] (+ colors [B, N, 3] or None), center_idx int32 [B, G] -> DeviceGroups.

    Pass ``out`` to write neighborhood/center straight into existing buffers (an engine's
    input bindings); its center_idx field is ignored (the given ``center_idx`` is used).
    """
    check_sizes(n_points, n_groups, k, n_channels)
    if out is None:
        out = DeviceGroups(center_idx, dev.empty((batch, n_groups, k), np.int32),
                           dev.empty((batch, n_groups, k), np.float32),
                           dev.empty((batch, n_groups, k, n_channels), np.float32),
                           dev.empty((batch, n_groups, 3), np.float32))
    else:
        out = out._replace(center_idx=center_idx)
    dev.launch("btp_knn_group", knn_launch(batch, n_groups, blocks.knn), points, colors, center_idx,
               n_points, n_groups, k, n_channels, float(rgb_fill), out.neighborhood, out.center,
               out.patch_idx, out.patch_d2)
    return out


def enqueue_group(dev: Device, points, colors, batch: int, n_points: int, n_groups: int, k: int,
                  n_channels: int, rgb_fill: float, start_idx, out: DeviceGroups | None = None,
                  fps_workspace=None, blocks: BlockSizes = BlockSizes()) -> DeviceGroups:
    """FPS centers then kNN grouping, both on the device: the PointBERT `Group` of a batch."""
    center_idx = enqueue_fps(dev, points, batch, n_points, n_groups, start_idx,
                             out_idx=None if out is None else out.center_idx, workspace=fps_workspace,
                             blocks=blocks)
    return enqueue_knn_group(dev, points, colors, center_idx, batch, n_points, n_groups, k, n_channels,
                             rgb_fill, out=out, blocks=blocks)


def enqueue_propagate(dev: Device, patch_scores, patch_idx, center, points, batch: int,
                      n_points: int, n_groups: int, k: int, out=None, sums=None, counts=None,
                      blocks: BlockSizes = BlockSizes(), point_scores=None):
    """patch_scores [B, G], patch_idx int32 [B, G, K], center [B, G, 3], points [B, N, 3]
    -> point_scores float32 [B, N]: mean over containing patches, else nearest center's score.
    ``point_scores [B, G, K]`` (a model with per-point scores): each point's mean of its own
    scores in the patches that contain it; uncovered points still take the center's patch score."""
    sums = dev.empty((batch, n_points), np.float32) if sums is None else sums
    counts = dev.empty((batch, n_points), np.int32) if counts is None else counts
    out = dev.empty((batch, n_points), np.float32) if out is None else out
    dev.zero(sums)
    dev.zero(counts)
    dev.launch("btp_scatter_patch_scores", scatter_launch(batch, n_groups, k, blocks.elementwise),
               patch_scores if point_scores is None else point_scores, int(point_scores is not None),
               patch_idx, n_groups, k, n_points, sums, counts)
    dev.launch("btp_finish_point_scores", points_launch(batch, n_points, blocks.elementwise),
               sums, counts, patch_scores, center, points, n_points, n_groups, out)
    return out


def enqueue_interpolate_nearest(dev: Device, sampled_xyz, sampled_scores, n_sampled: int, raw_xyz,
                                n_raw: int, out=None, blocks: BlockSizes = BlockSizes()):
    """sampled_xyz [N, 3], sampled_scores [N], raw_xyz [M, 3] -> raw_scores float32 [M]."""
    check_sizes(n_sampled)
    out = dev.empty((n_raw,), np.float32) if out is None else out
    dev.launch("btp_interpolate_nearest", points_launch(1, n_raw, blocks.elementwise),
               sampled_xyz, sampled_scores, n_sampled, raw_xyz, n_raw, out)
    return out


# ---- numpy layer ---------------------------------------------------------------------------

def _batched_points(points, name: str = "points") -> tuple[np.ndarray, bool]:
    arr = np.ascontiguousarray(np.asarray(points, dtype=np.float32))
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected [N, 3] or [B, N, 3] with N >= 1, got shape {np.shape(points)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains NaN or inf; drop those rows first (btp.io does)")
    return arr, single


def _start_array(start_idx, batch: int, n_points: int) -> np.ndarray:
    start = np.broadcast_to(np.asarray(start_idx, dtype=np.int64), (batch,))
    if (start < 0).any() or (start >= n_points).any():
        raise ValueError(f"start_idx={start_idx}: must be in 0..{n_points - 1}")
    return np.ascontiguousarray(start, dtype=np.int32)


def normalize(dev: Device, points, blocks: BlockSizes = BlockSizes()):
    """As btp.geometry.normalize: points [N, 3] -> (normed float32 [N, 3], center float32 [3],
    scale float); with [B, N, 3] -> ([B, N, 3], [B, 3], float32 [B])."""
    pts, single = _batched_points(points)
    normed, origin_scale = enqueue_normalize(dev, dev.upload(pts), pts.shape[0], pts.shape[1], blocks=blocks)
    normed, origin_scale = dev.download(normed), dev.download(origin_scale)
    if single:
        return normed[0], origin_scale[0, :3], float(origin_scale[0, 3])
    return normed, origin_scale[:, :3], origin_scale[:, 3]


def fps(dev: Device, points, n_samples: int, start_idx=0, blocks: BlockSizes = BlockSizes()) -> np.ndarray:
    """points [N, 3] or [B, N, 3] -> int64 [S] or [B, S] (the btp.geometry.fps rule)."""
    pts, single = _batched_points(points)
    batch, n_points = pts.shape[:2]
    idx = enqueue_fps(dev, dev.upload(pts), batch, n_points, n_samples,
                      dev.upload(_start_array(start_idx, batch, n_points)), blocks=blocks)
    out = dev.download(idx).astype(np.int64)
    return out[0] if single else out


def knn_group(dev: Device, points, center_idx, k: int, *, colors=None, in_channels: int = 6,
              rgb_fill: float = 0.5, blocks: BlockSizes = BlockSizes()) -> dict[str, np.ndarray]:
    """points [(B,) N, 3], center_idx [(B,) G] -> dict of patch_idx int64 [(B,) G, K],
    dist2 float32 [(B,) G, K], neighborhood float32 [(B,) G, K, C], center float32 [(B,) G, 3]."""
    pts, single = _batched_points(points)
    batch, n_points = pts.shape[:2]
    cidx = np.asarray(center_idx, dtype=np.int64).reshape(batch, -1)
    if (cidx < 0).any() or (cidx >= n_points).any():
        raise ValueError(f"center_idx: values must be in 0..{n_points - 1}")
    col = None
    if colors is not None:
        col, _ = _batched_points(colors, "colors")
        if col.shape != pts.shape:
            raise ValueError(f"colors: shape {np.shape(colors)} does not match points {np.shape(points)}")
    groups = enqueue_knn_group(dev, dev.upload(pts), None if col is None else dev.upload(col),
                               dev.upload(np.ascontiguousarray(cidx, dtype=np.int32)), batch, n_points,
                               cidx.shape[1], k, in_channels, rgb_fill, blocks=blocks)
    out = {"patch_idx": dev.download(groups.patch_idx).astype(np.int64),
           "dist2": dev.download(groups.patch_d2),
           "neighborhood": dev.download(groups.neighborhood),
           "center": dev.download(groups.center)}
    return {name: value[0] for name, value in out.items()} if single else out


def group(dev: Device, points, num_group: int, group_size: int, *, start_idx=0, colors=None,
          rgb_fill: float = 0.5, in_channels: int = 6, blocks: BlockSizes = BlockSizes()):
    """As btp.geometry.group, FPS and kNN chained on the device -> btp.geometry.Groups
    (with a leading B when points is [B, N, 3])."""
    from btp.geometry import Groups

    pts, single = _batched_points(points)
    batch, n_points = pts.shape[:2]
    col = None if colors is None else dev.upload(_batched_points(colors, "colors")[0])
    groups = enqueue_group(dev, dev.upload(pts), col, batch, n_points, num_group, group_size, in_channels,
                           rgb_fill, dev.upload(_start_array(start_idx, batch, n_points)), blocks=blocks)
    fields = (dev.download(groups.center_idx).astype(np.int64), dev.download(groups.patch_idx).astype(np.int64),
              dev.download(groups.neighborhood), dev.download(groups.center))
    return Groups(*(f[0] for f in fields)) if single else Groups(*fields)


def propagate_patch_scores(dev: Device, patch_scores, patch_idx, center, points,
                           blocks: BlockSizes = BlockSizes(), point_scores=None) -> np.ndarray:
    """As btp.geometry.propagate_patch_scores: patch_scores [(B,) G], patch_idx [(B,) G, K],
    center [(B,) G, 3], points [(B,) N, 3], optional point_scores [(B,) G, K] -> float32 [(B,) N]."""
    pts, single = _batched_points(points)
    batch, n_points = pts.shape[:2]
    scores = np.ascontiguousarray(np.asarray(patch_scores, dtype=np.float32).reshape(batch, -1))
    n_groups = scores.shape[1]
    pidx = np.asarray(patch_idx, dtype=np.int64).reshape(batch, n_groups, -1)
    if (pidx < 0).any() or (pidx >= n_points).any():
        raise ValueError(f"patch_idx: values must be in 0..{n_points - 1}")
    cen = np.ascontiguousarray(np.asarray(center, dtype=np.float32).reshape(batch, n_groups, 3))
    per_point = None
    if point_scores is not None:
        per_point = dev.upload(np.ascontiguousarray(np.asarray(point_scores, dtype=np.float32)
                                                    .reshape(pidx.shape)))
    out = enqueue_propagate(dev, dev.upload(scores), dev.upload(np.ascontiguousarray(pidx, dtype=np.int32)),
                            dev.upload(cen), dev.upload(pts), batch, n_points, n_groups, pidx.shape[2],
                            blocks=blocks, point_scores=per_point)
    result = dev.download(out)
    return result[0] if single else result


def interpolate_nearest(dev: Device, sampled_xyz, sampled_scores, raw_xyz,
                        blocks: BlockSizes = BlockSizes()) -> np.ndarray:
    """As btp.geometry.interpolate_to_raw(method="nearest"): -> float32 [M]."""
    sampled, _ = _batched_points(sampled_xyz, "sampled_xyz")
    raw, _ = _batched_points(raw_xyz, "raw_xyz")
    scores = np.ascontiguousarray(np.asarray(sampled_scores, dtype=np.float32).reshape(-1))
    if scores.shape[0] != sampled.shape[1]:
        raise ValueError(f"sampled_scores: {scores.shape[0]} values for {sampled.shape[1]} points")
    out = enqueue_interpolate_nearest(dev, dev.upload(sampled[0]), dev.upload(scores), sampled.shape[1],
                                      dev.upload(raw[0]), raw.shape[1], blocks=blocks)
    return dev.download(out)
