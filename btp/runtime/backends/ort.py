"""ONNX Runtime backend: ort-cpu / ort-cuda / ort-trt (execution providers of one session).

Session: graph optimisation level ALL, intra-op threads from ``threads`` (None = ORT's default,
one per physical core), sequential execution (one small graph: inter-op parallelism only costs),
no spinning of idle workers (they would take the cores from the pre/post-processing). The
pre/post-processing's own OpenMP pool (pykdtree) gets OMP_NUM_THREADS=1 unless set
(``btp.runtime.pipeline.default_openmp_threads``, called by ``Pipeline``), so the two pools do not
oversubscribe the cores.
On CUDA the inputs and outputs go through IO binding; on CPU a plain ``session.run`` is already
zero-copy for numpy inputs, so binding would only add calls. ``device_resident=True`` (ort-cuda,
``Pipeline(preprocess="cuda")``): inputs and outputs are bound to buffers on our kernels' device
(``input_buffers()`` / ``enqueue(1)``, the TensorRT backend's contract), one scan per call.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from btp.runtime.backends.errors import BackendError

PROVIDERS = {
    "ort-cpu": ["CPUExecutionProvider"],
    "ort-cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "ort-trt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        if threads < 1:
            raise BackendError(f"threads={threads}: expected a positive number of intra-op threads")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    # idle intra-op workers block instead of busy-waiting after a run, leaving the cores to the
    # CPU pre/post-processing around the engine (benchmarks/results/cpu-findings-2026-11-25.md)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    return opts


class OrtBackend:
    """``run(neighborhood [B,G,K,C], center [B,G,3]) -> {output name: array}`` with ONNX Runtime."""

    def __init__(self, model_path: str | Path, meta=None, *, provider: str = "ort-cpu", threads: int | None = None,
                 device_resident: bool = False):
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise BackendError(f"unknown ONNX Runtime backend {provider!r}; choose one of {', '.join(PROVIDERS)}")
        wanted = PROVIDERS[provider]
        available = ort.get_available_providers()
        if wanted[0] not in available:
            raise BackendError(f"backend {provider!r} needs {wanted[0]}, but this onnxruntime offers "
                               f"{', '.join(available)}; use --backend ort-cpu or install onnxruntime-gpu")
        self.name = provider
        self.meta = meta
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                                providers=[p for p in wanted if p in available])
        except Exception as exc:  # onnxruntime's own InvalidGraph / Fail / NoSuchFile ...
            raise BackendError(f"{model_path}: ONNX Runtime cannot load this model ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}); export it again with btp-export") from None
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._use_binding = provider != "ort-cpu"
        self.device = None
        if device_resident:
            self._bind_device(meta)

    # ---- device-resident path (ort-cuda) ---------------------------------------------------------

    def _bind_device(self, meta) -> None:
        from btp.kernels.devices import open_device

        if self.name != "ort-cuda" or meta is None:
            raise BackendError(f"device-resident buffers need ort-cuda and the model's metadata (got {self.name})")
        self.device = open_device("auto")
        shapes = {**meta.io.get("inputs", {}), **meta.io.get("outputs", {})}
        self._device_buffers = {name: self.device.empty([1 if d == "B" else int(d) for d in spec["shape"]], np.float32)
                                for name, spec in shapes.items() if name in (*self.input_names, *self.output_names)}

    def input_buffers(self) -> dict:
        """Device buffers (batch 1) the kernels write neighborhood / center into."""
        return {name: self._device_buffers[name] for name in self.input_names}

    def enqueue(self, batch: int) -> dict:
        """Run on the bound device buffers (batch 1); -> the output device buffers."""
        if batch != 1:
            raise ValueError("the device-resident ort-cuda path runs one scan per call")
        self.device.synchronize()  # the kernels wrote the inputs on our stream; ORT runs on its own
        binding = self.session.io_binding()
        for name, buf in self._device_buffers.items():
            bind = binding.bind_input if name in self.input_names else binding.bind_output
            bind(name, "cuda", 0, np.float32, list(buf.shape), self.device.pointer(buf))
        self.session.run_with_iobinding(binding)  # returns when the outputs are written
        return {name: self._device_buffers[name] for name in self.output_names}

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"neighborhood": np.ascontiguousarray(neighborhood, dtype=np.float32),
                 "center": np.ascontiguousarray(center, dtype=np.float32)}
        if not self._use_binding:
            return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))
