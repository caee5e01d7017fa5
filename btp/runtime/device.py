"""The scan's stages on a CUDA device: ``DeviceChain``, what ``Pipeline(preprocess="cuda" |
"cuda-emu")`` runs instead of the CPU chain.

    raw [M, 3] --upload--> our kernels: downsample (exact FPS), normalize, FPS, kNN, gather
      --> neighborhood / center in the engine's input buffers
      --> engine (TensorRT or ORT CUDA on the same device: no host round trip; otherwise the
          inputs are downloaded, the backend runs on the host and its patch scores uploaded)
      --> our kernels: propagate (patch -> N points), interpolate (N -> M raw points)
      --download--> raw scores [M], sampled scores [N], sample_idx [N], the engine's small outputs

``preprocess`` choices (``resolve_preprocess``): ``cpu`` the CPU chain; ``cuda`` the kernels on a
GPU through pycuda or cuda-python (``btp.kernels.devices``); ``cuda-emu`` the very same kernel
source under the CPU emulation (slow: seconds per scan; for proving the wiring in CI);
``auto`` = cuda where a GPU, a binding and the kernels are usable for this model, else cpu.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from btp.config import BTPConfig
from btp.errors import BTPError, NotAvailableError
from btp.kernels.launch import BlockSizes

PREPROCESS = ("auto", "cpu", "cuda", "cuda-emu")
# the emulation runs one OS thread per CUDA thread: small blocks keep it to seconds per scan
EMU_BLOCKS = BlockSizes(fps=64, knn=64, elementwise=64)


class PreprocessError(BTPError, ValueError):
    """The preprocessing asked for cannot run this model here (the message says why)."""


def cuda_unsupported(cfg: BTPConfig) -> str | None:
    """Why the kernels cannot run this model's preprocessing (None when they can)."""
    from btp.kernels.preprocess import GpuPreprocessor

    try:
        GpuPreprocessor.check_config(cfg)
    except NotAvailableError as exc:
        return str(exc)
    return None


def resolve_preprocess(preprocess: str, cfg: BTPConfig, downsample: str) -> tuple[str, str]:
    """-> (cpu | cuda | cuda-emu, the reason for that choice). ``downsample`` other than auto/exact
    needs the CPU (the kernels run the exact rule only)."""
    if preprocess not in PREPROCESS:
        raise PreprocessError(f"preprocess={preprocess!r}; choose one of {', '.join(PREPROCESS)}")
    if preprocess == "cpu":
        return "cpu", "asked for"
    unsupported = cuda_unsupported(cfg)
    if preprocess == "auto":
        from btp.kernels.devices import gpu_unavailable_reason

        why = unsupported or (f"--downsample {downsample}: the kernels run the exact rule"
                              if downsample not in ("auto", "exact") else None) or gpu_unavailable_reason()
        return ("cpu", why) if why else ("cuda", "a GPU and a CUDA binding are usable")
    if unsupported:
        raise PreprocessError(f"--preprocess {preprocess}: {unsupported}")
    if downsample not in ("auto", "exact"):
        raise PreprocessError(f"--preprocess {preprocess} runs the exact downsampling rule on the device; "
                              f"--downsample {downsample} needs --preprocess cpu")
    return preprocess, "asked for"


@dataclass(frozen=True, kw_only=True)
class DeviceScores:
    """What comes back from the device for one scan (numpy)."""

    outputs: dict[str, np.ndarray]  # the engine's outputs, batch 1 (patch_probs [1, G], object_score [1], ...)
    sample_idx: np.ndarray          # int64 [N]
    sampled_scores: np.ndarray      # float32 [N]
    point_scores: np.ndarray        # float32 [M]


class DeviceChain:
    """Our kernels around one backend on one device (see the module docstring)."""

    def __init__(self, cfg: BTPConfig, backend, preprocess: str) -> None:
        from btp.kernels.devices import open_device
        from btp.kernels.preprocess import GpuPreprocessor

        device = getattr(backend, "device", None)  # TensorRT / ORT CUDA bring their own device
        if preprocess == "cuda-emu":
            device, blocks = open_device("emu"), EMU_BLOCKS
        else:
            device, blocks = device or open_device("auto"), BlockSizes()
        self.kernels = GpuPreprocessor.from_config(cfg, device=device, blocks=blocks)
        self.device, self.backend = device, backend
        # device-resident: the backend's own input/output buffers live on this very device
        self.resident = getattr(backend, "device", None) is device and hasattr(backend, "input_buffers")

    def run(self, raw: np.ndarray, timer) -> DeviceScores:
        """raw float32 [M, 3] (checked) -> DeviceScores; ``timer(stage)`` times preprocess,
        engine and postprocess (each ends with the device idle: a download or a sync)."""
        dev, kernels = self.device, self.kernels
        with timer("preprocess"):
            if self.resident:
                inputs = self.backend.input_buffers()
                out = kernels.groups_buffers()._replace(neighborhood=inputs["neighborhood"], center=inputs["center"])
                scan = kernels.prepare(raw, out=out)
            else:
                scan = kernels.prepare(raw)
            kernels.origin_scale(scan)  # DegenerateCloudError for a scan whose points coincide (syncs)
            if not self.resident:
                neighborhood = dev.download(scan.groups.neighborhood)  # [1, G, K, C]
                center = dev.download(scan.groups.center)  # [1, G, 3]
        with timer("engine"):
            if self.resident:
                device_out = self.backend.enqueue(1)
                patch, per_point = device_out["patch_probs"], device_out.get("patch_point_probs")
                outputs = {name: dev.download(buf)[:1] for name, buf in device_out.items() if name != "patch_embed"}
            else:
                outputs = self.backend.run(neighborhood, center)
                patch = dev.upload(np.ascontiguousarray(outputs["patch_probs"][:1], dtype=np.float32))
                per_point = (dev.upload(np.ascontiguousarray(outputs["patch_point_probs"][:1], dtype=np.float32))
                             if "patch_point_probs" in outputs else None)
        with timer("postprocess"):
            sampled = kernels.point_scores(patch, scan, per_point)  # [1, N] on the device
            raw_scores = kernels.raw_scores(sampled, scan)  # [M] on the device
            n = scan.n_points
            result = DeviceScores(outputs=outputs,
                                  sample_idx=dev.download(scan.sample_idx)[0, :n].astype(np.int64),
                                  sampled_scores=dev.download(sampled)[0, :n],
                                  point_scores=dev.download(raw_scores)[:scan.n_raw])
        return result
