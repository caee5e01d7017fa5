"""TensorRT backend: ``TensorRTBackend(model_path, meta)`` with ``run(neighborhood, center)``.

The backend contract (docs/design.md): ``name`` and ``run(neighborhood float32 [B,G,K,C],
center float32 [B,G,3]) -> dict[str, np.ndarray]`` keyed by the ONNX output names. The engine
comes from btp.runtime.tensorrt.cached_engine: reused when its manifest matches this GPU,
TensorRT version, model hash and options, built otherwise (never loaded blindly).

Device-resident use (``btp.runtime.device.DeviceChain``, ``Pipeline(preprocess="cuda")``):
``backend.device`` is the kernels' device (pycuda or cuda-python, ``btp.kernels.devices``) whose
stream carries preprocessing, engine and postprocessing; ``input_buffers()`` gives the device
buffers our kernels write the engine inputs into, and ``enqueue(batch)`` runs the engine on them
and returns the device output buffers - no host round trip in between.

TensorRT is imported lazily (``[gpu]`` extra); without it, or without a CUDA binding, the
constructor raises NotAvailableError naming what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from btp.errors import NotAvailableError


class TensorRTBackend:
    name = "trt"

    def __init__(self, model_path: str | Path, meta: Any = None, *, precision: str = "fp16",
                 batch: tuple[int, int, int] = (1, 1, 4), workspace_mb: int = 2048,
                 cache_dir: str | Path | None = None, device: Any = None, log=None) -> None:
        from btp.kernels.devices import open_device
        from btp.runtime import tensorrt as trt_export

        trt = trt_export.import_tensorrt()  # NotAvailableError with the reason when absent
        self._trt = trt
        self.model_path = Path(model_path)
        self.device = device if device is not None else open_device("auto")
        log = log or (lambda line: None)
        result = trt_export.cached_engine(self.model_path, precision=precision, batch=batch,
                                          workspace_mb=workspace_mb, cache_dir=cache_dir, log=log)
        self.engine = self._deserialize(result.plan_path.read_bytes(), log)
        if self.engine is None:  # manifest matched but the plan does not load here: rebuild once
            result = trt_export.cached_engine(self.model_path, precision=precision, batch=batch,
                                              workspace_mb=workspace_mb, cache_dir=cache_dir, force=True, log=log)
            self.engine = self._deserialize(result.plan_path.read_bytes(), log)
            if self.engine is None:
                raise trt_export.EngineBuildError(f"{result.plan_path}: TensorRT cannot deserialize the engine it built")
        self.plan_path, self.built = result.plan_path, result.built
        self.context = self.engine.create_execution_context()
        self.max_batch = batch[2]
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        missing = {"neighborhood", "center"} - set(self.input_names)
        if missing:
            raise NotAvailableError(f"{model_path}: engine inputs {self.input_names} lack {sorted(missing)}")
        # buffers for the largest batch of the profile, allocated once
        self._buffers: dict[str, Any] = {}
        for name in self.input_names:
            shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])  # max shape
            self.context.set_input_shape(name, shape)
            self._buffers[name] = self.device.empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            self._buffers[name] = self.device.empty(shape, trt.nptype(self.engine.get_tensor_dtype(name)))

    def _deserialize(self, plan: bytes, log):
        from btp.runtime.tensorrt import TrtLogger

        self._runtime = self._trt.Runtime(TrtLogger(self._trt, log))
        return self._runtime.deserialize_cuda_engine(plan)

    # ---- device-resident path -------------------------------------------------------------------

    def input_buffers(self) -> dict[str, Any]:
        """Device buffers of the inputs (max batch): GpuPreprocessor writes neighborhood/center here."""
        return {name: self._buffers[name] for name in self.input_names}

    def enqueue(self, batch: int) -> dict[str, Any]:
        """Run the engine on the input buffers' first ``batch`` rows, on the device's stream.
        Returns the output device buffers (max-batch sized; rows past ``batch`` are stale)."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} outside the engine's profile 1..{self.max_batch} (btp build --max-batch)")
        for name in self.input_names:
            full = self._buffers[name].shape
            self.context.set_input_shape(name, (batch, *full[1:]))
        for name, buf in self._buffers.items():
            self.context.set_tensor_address(name, self.device.pointer(buf))
        if not self.context.execute_async_v3(self.device.stream_handle):
            raise RuntimeError(f"{self.plan_path}: TensorRT execute_async_v3 failed")
        return {name: self._buffers[name] for name in self.output_names}

    # ---- backend contract -----------------------------------------------------------------------

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
        """neighborhood float32 [B,G,K,C], center float32 [B,G,3] -> {output name: array [B, ...]}."""
        inputs = {"neighborhood": np.asarray(neighborhood, np.float32), "center": np.asarray(center, np.float32)}
        batch = inputs["neighborhood"].shape[0]
        for name, arr in inputs.items():
            want = self._buffers[name].shape[1:]
            if arr.shape[1:] != want or arr.shape[0] != batch:
                raise ValueError(f"{name}: shape {arr.shape}, the engine takes [B<= {self.max_batch}, {', '.join(map(str, want))}]")
            self.device.upload(arr, out=self._buffers[name])
        outputs = self.enqueue(batch)
        return {name: self.device.download(buf)[:batch] for name, buf in outputs.items()}

