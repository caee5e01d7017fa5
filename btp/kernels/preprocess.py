"""``GpuPreprocessor``: raw scan -> engine inputs -> scores back to points, all on one device.

Data flow of one scan (every arrow is a kernel on the device's stream; the only transfers are
the raw upload and whatever the caller downloads at the end):

    raw [M, 3] --FPS(N, fps_start)--> sample_idx [N] --gather--> sampled [N, 3] (raw frame)
      --normalize--> normed [N, 3] (+ origin, scale) --FPS(G)+kNN(K)+gather--> neighborhood
      [1, G, K, C], center [1, G, 3]  (written straight into the engine's input buffers)
    engine patch scores [1, G] --scatter/mean--> point scores [1, N] --nearest--> raw scores [M]

It is the CPU chain ``btp.geometry.prepare`` with ``method="exact"`` (the FPS rule; a scan of
M <= N points keeps all of them in input order) and ``scores_to_raw(exact=True)``;
tests/test_kernels_preprocess.py checks it with the kernels under the CPU emulation, and
``btp.runtime.Pipeline(preprocess="cuda-emu")`` runs it in the product's own path (for a model
in the canonical sampling order it hands the kernels the rows in ``anchored_order``, so FPS starts
at the point farthest from the centroid, as the CPU chain's exact rule does).
The CPU chain's default ``method="auto"`` (the voxel rule, or the anchored bucket FPS for scans of up
to 8N points in the canonical order) picks other indices than the exact rule: CPU/GPU parity needs
``exact`` on the CPU.

Torch-free. The device is any ``btp.kernels.ops.Device`` (``btp.kernels.devices.open_device``:
pycuda, cuda-python, or the emulation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from btp.errors import NotAvailableError
from btp.geometry.errors import DegenerateCloudError
from btp.geometry.prepare import Prepared
from btp.kernels import ops
from btp.kernels.launch import BlockSizes, check_sizes


@dataclass(frozen=True, kw_only=True)
class DeviceScan:
    """Device buffers of one scan after ``GpuPreprocessor.prepare`` (B = 1)."""

    n_raw: int
    n_points: int          # min(N, M): a scan of M <= N points keeps all of them
    raw_xyz: Any           # float32 [1, M, 3], raw frame
    sample_idx: Any        # int32 [1, N] into the raw scan
    sampled_xyz: Any       # float32 [1, N, 3], raw frame
    normed_xyz: Any        # float32 [1, N, 3], model frame
    origin_scale: Any      # float32 [1, 4]
    groups: ops.DeviceGroups


class GpuPreprocessor:
    """The runtime's preprocess/postprocess stages on a GPU (or the emulation).

    Sizes come from the config: N = preprocess.num_points, G = encoder.num_group,
    K = encoder.group_size (<= 64), C = encoder.in_channels, rgb_fill, fps_start.
    """

    def __init__(self, num_points: int, num_group: int, group_size: int, in_channels: int = 6,
                 rgb_fill: float = 0.5, fps_start: int = 0, *, device: ops.Device | None = None,
                 blocks: BlockSizes = BlockSizes()) -> None:
        check_sizes(num_points, num_group, group_size, in_channels)
        if num_group > num_points:
            raise ValueError(f"num_group={num_group} > num_points={num_points}")
        if device is None:
            from btp.kernels.devices import open_device

            device = open_device("auto")
        self.device = device
        self.num_points, self.num_group, self.group_size = num_points, num_group, group_size
        self.in_channels, self.rgb_fill, self.fps_start = in_channels, float(rgb_fill), int(fps_start)
        self.blocks = blocks
        dev = device
        n, g, k, c = num_points, num_group, group_size, in_channels
        # fixed-size buffers, allocated once (the raw-size ones grow on demand)
        self._start = dev.upload(np.full(1, self.fps_start, np.int32))
        self._sample_idx = dev.empty((1, n), np.int32)
        self._sampled = dev.empty((1, n, 3), np.float32)
        self._sampled_colors = dev.empty((1, n, 3), np.float32)
        self._normed = dev.empty((1, n, 3), np.float32)
        self._origin_scale = dev.empty((1, 4), np.float32)
        self._fps_ws_n = dev.empty((1, n), np.float32)
        self._groups = ops.DeviceGroups(dev.empty((1, g), np.int32), dev.empty((1, g, k), np.int32),
                                        dev.empty((1, g, k), np.float32), dev.empty((1, g, k, c), np.float32),
                                        dev.empty((1, g, 3), np.float32))
        self._point_scores = dev.empty((1, n), np.float32)
        self._sums = dev.empty((1, n), np.float32)
        self._counts = dev.empty((1, n), np.int32)
        self._raw_capacity = 0
        self._wide_scratch: dict = {}  # the wide FPS's small buffers (raw scans >= fps_wide_from)
        self._last: DeviceScan | None = None

    @staticmethod
    def check_config(cfg) -> None:
        """NotAvailableError when the kernels cannot run this BTPConfig's rules: they implement
        btp's own preprocessing (normalise after sampling, fixed FPS start, uncovered points ->
        nearest center, nearest-point interpolation)."""
        p = cfg.preprocess
        unsupported = [f"{name}={value!r}" for name, value, ours in (
            ("preprocess.normalize", p.normalize, "unit_sphere"),
            ("preprocess.downsample_start", p.downsample_start, "fixed"),
            ("scoring.uncovered_points", cfg.scoring.uncovered_points, "nearest_center"),
            ("scoring.raw_interpolation", cfg.scoring.raw_interpolation, "nearest")) if value != ours]
        if unsupported:
            raise NotAvailableError(f"the CUDA preprocessing does not implement {', '.join(unsupported)} "
                                    f"(model {cfg.name}); preprocess on the CPU")

    @classmethod
    def from_config(cls, cfg, **kwargs) -> "GpuPreprocessor":
        """From a BTPConfig (btp/config.py); ``check_config`` says which ones it takes."""
        cls.check_config(cfg)
        e, p = cfg.encoder, cfg.preprocess
        return cls(p.num_points, e.num_group, e.group_size, e.in_channels, p.rgb_fill, p.fps_start, **kwargs)

    # ---- stages ------------------------------------------------------------------------------

    def _raw_buffers(self, n_raw: int) -> None:
        if n_raw > self._raw_capacity:  # grow (by 1.5x) so similar scans reuse the buffers
            cap = max(n_raw, int(self._raw_capacity * 1.5))
            self._raw = self.device.empty((1, cap, 3), np.float32)
            self._raw_colors = self.device.empty((1, cap, 3), np.float32)
            self._fps_ws_raw = self.device.empty((1, cap), np.float32)
            self._raw_scores = self.device.empty((cap,), np.float32)
            self._raw_capacity = cap

    def prepare(self, raw_points: np.ndarray, colors: np.ndarray | None = None,
                out: ops.DeviceGroups | None = None) -> DeviceScan:
        """raw_points [M, 3] (M >= max(G, K)), colors [M, 3] in [0, 1] or None -> DeviceScan.

        N' = min(N, M) points are sampled (all M, in input order, for a scan of M <= N points:
        the rule of btp.geometry.prepare.sample_indices).

        ``out``: DeviceGroups whose ``neighborhood`` / ``center`` are the engine's input buffers
        (other fields may be this object's own: pass ``self.groups_buffers()._replace(...)``).
        Everything is enqueued; nothing is downloaded.
        """
        dev, blocks = self.device, self.blocks
        raw = np.ascontiguousarray(np.asarray(raw_points, dtype=np.float32))
        if raw.ndim != 2 or raw.shape[1] != 3:
            raise ValueError(f"raw_points: expected [M, 3], got shape {raw.shape}")
        n_raw = raw.shape[0]
        need = max(self.num_group, self.group_size)
        if n_raw < need:
            raise ValueError(f"raw scan has {n_raw} points, fewer than the model's max(G, K) = {need}")
        if not np.isfinite(raw).all():
            raise ValueError("raw_points: contains NaN or inf; drop those rows first (btp.io does)")
        if not 0 <= self.fps_start < n_raw:
            raise ValueError(f"fps_start={self.fps_start} outside the raw scan's {n_raw} points")
        self._raw_buffers(n_raw)
        raw_dev = dev.upload(raw[None], out=self._raw)  # [1, M, 3] into the reused [1, cap, 3]
        n, c = min(self.num_points, n_raw), self.in_channels
        if n_raw <= self.num_points:  # the one rule for small scans: all points, in input order
            dev.upload(np.arange(n_raw, dtype=np.int32)[None], out=self._sample_idx)
        else:
            ops.enqueue_fps(dev, raw_dev, 1, n_raw, n, self._start, out_idx=self._sample_idx,
                            workspace=self._fps_ws_raw, blocks=blocks, scratch=self._wide_scratch)
        ops.enqueue_gather(dev, raw_dev, self._sample_idx, 1, n_raw, n, 3, out=self._sampled, blocks=blocks)
        sampled_colors = None
        if colors is not None and c == 6:
            col = np.ascontiguousarray(np.asarray(colors, dtype=np.float32))
            if col.shape != raw.shape:
                raise ValueError(f"colors: shape {col.shape} does not match raw_points {raw.shape}")
            ops.enqueue_gather(dev, dev.upload(col[None], out=self._raw_colors), self._sample_idx, 1, n_raw, n, 3,
                               out=self._sampled_colors, blocks=blocks)
            sampled_colors = self._sampled_colors
        ops.enqueue_normalize(dev, self._sampled, 1, n, out=self._normed, origin_scale=self._origin_scale,
                              blocks=blocks)
        groups = self._groups if out is None else out
        groups = ops.enqueue_group(dev, self._normed, sampled_colors, 1, n, self.num_group, self.group_size, c,
                                   self.rgb_fill, self._start, out=groups._replace(center_idx=self._groups.center_idx),
                                   fps_workspace=self._fps_ws_n, blocks=blocks)
        self._last = DeviceScan(n_raw=n_raw, n_points=n, raw_xyz=raw_dev, sample_idx=self._sample_idx,
                                sampled_xyz=self._sampled, normed_xyz=self._normed, origin_scale=self._origin_scale,
                                groups=groups)
        return self._last

    def groups_buffers(self) -> ops.DeviceGroups:
        """This object's own device buffers for the groups (to swap in engine inputs)."""
        return self._groups

    def point_scores(self, patch_scores, prepared: DeviceScan | None = None, point_probs=None):
        """patch scores (device buffer [1, G]; with a per-point model also its ``point_probs``
        [1, G, K]) -> point scores device buffer [1, N] (model frame)."""
        prep = prepared or self._require()
        return ops.enqueue_propagate(self.device, patch_scores, prep.groups.patch_idx, prep.groups.center,
                                     prep.normed_xyz, 1, prep.n_points, self.num_group, self.group_size,
                                     out=self._point_scores, sums=self._sums, counts=self._counts,
                                     blocks=self.blocks, point_scores=point_probs)

    def raw_scores(self, point_scores, prepared: DeviceScan | None = None):
        """point scores [1, N] (device) -> raw-scan scores device buffer [M] (nearest sampled point)."""
        prep = prepared or self._require()
        return ops.enqueue_interpolate_nearest(self.device, prep.sampled_xyz, point_scores, prep.n_points,
                                               prep.raw_xyz, prep.n_raw, out=self._raw_scores,
                                               blocks=self.blocks)

    def _require(self) -> DeviceScan:
        if self._last is None:
            raise RuntimeError("GpuPreprocessor: call prepare() first")
        return self._last

    # ---- numpy conveniences ------------------------------------------------------------------

    def origin_scale(self, scan: DeviceScan | None = None) -> tuple[np.ndarray, float]:
        """(origin float32 [3], scale) of a prepared scan; DegenerateCloudError when scale is 0."""
        scan = scan or self._require()
        origin_scale = self.device.download(scan.origin_scale)[0]
        if not origin_scale[3] > 0:
            raise DegenerateCloudError(f"normalize: all {scan.n_points} sampled points coincide (max radius 0); "
                                       "check the scan")
        return origin_scale[:3].copy(), float(origin_scale[3])

    def download_prepared(self, scan: DeviceScan | None = None) -> Prepared:
        """The device buffers of a prepared scan as the CPU chain's ``Prepared`` (numpy)."""
        scan = scan or self._require()
        dev, n = self.device, scan.n_points
        origin, scale = self.origin_scale(scan)
        return Prepared(
            raw_points=dev.download(scan.raw_xyz)[0, :scan.n_raw],
            sample_idx=dev.download(scan.sample_idx)[0, :n].astype(np.int64),
            points=dev.download(scan.normed_xyz)[0, :n], origin=origin, scale=scale,
            center_idx=dev.download(scan.groups.center_idx)[0].astype(np.int64),
            patch_idx=dev.download(scan.groups.patch_idx)[0].astype(np.int64),
            neighborhood=dev.download(scan.groups.neighborhood)[0], center=dev.download(scan.groups.center)[0])

    def run(self, raw_points: np.ndarray, colors: np.ndarray | None = None) -> Prepared:
        """prepare() and download: the CPU chain's ``btp.geometry.prepare.prepare`` on the device."""
        return self.download_prepared(self.prepare(raw_points, colors))

    def scores(self, patch_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """patch scores [G] of the last prepared cloud -> (point scores [N], raw scores [M])."""
        dev = self.device
        scores = np.ascontiguousarray(np.asarray(patch_scores, dtype=np.float32).reshape(1, self.num_group))
        points = self.point_scores(dev.upload(scores))
        raw = self.raw_scores(points)
        prep = self._require()
        return dev.download(points)[0, :prep.n_points], dev.download(raw)[:prep.n_raw]
