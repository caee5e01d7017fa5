"""pycuda side of the kernels: ``CudaDevice`` (the ``btp.kernels.ops.Device`` of a real GPU).

- Kernels load from a fatbin built once by nvcc for FATBIN_ARCHS (+ PTX) and cached by source
  hash (btp.kernels.build); where the GPU's arch is not in that fatbin (e.g. Xavier sm_72 with
  JetPack's nvcc) they are compiled for it with pycuda's SourceModule instead.
- One CUDA stream (``device.stream``) carries every copy and launch; pass it to TensorRT
  (``execute_async_v3(device.stream.handle)``) so preprocessing, engine and postprocessing are
  ordered without host synchronisation. The context is the device's primary context, the one
  the CUDA runtime (and so TensorRT) uses.
- Host <-> device copies go through pinned (page-locked) staging buffers, reused; an event per
  staging buffer keeps a reuse from overwriting data an earlier async copy still reads.

pycuda is imported lazily (the ``[gpu]`` extra); this module imports without it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from btp.errors import NotAvailableError
from btp.kernels import build
from btp.kernels.launch import KERNEL_FILES, KERNELS, Launch
from btp.kernels.ops import upload_target


def gpu_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here (None when they can): no pycuda / driver / GPU."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return f"pycuda is not installed ({exc}); pip install 'btp-edge[gpu]' on a machine with the CUDA driver"
    except OSError as exc:  # pragma: no cover - pycuda present but libcuda missing
        return f"no CUDA driver: {exc}"
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda raises its own LogicError/RuntimeError subclasses
        return f"no CUDA driver or GPU usable: {exc}"
    if count == 0:
        return "no NVIDIA GPU visible (cuda.Device.count() == 0)"
    return None


def _import_pycuda():
    reason = gpu_unavailable_reason()
    if reason:
        raise NotAvailableError(reason)
    import pycuda.driver as cuda
    import pycuda.gpuarray as gpuarray

    return cuda, gpuarray


class CudaDevice:
    """Buffers are pycuda GPUArrays; everything is enqueued on ``self.stream``."""

    binding = "pycuda"

    def __init__(self, device_id: int = 0, *, stream: Any = None, nvcc: str | None = None) -> None:
        cuda, gpuarray = _import_pycuda()
        self._cuda, self._gpuarray = cuda, gpuarray
        self.device = cuda.Device(device_id)
        self.context = self.device.retain_primary_context()
        self.context.push()
        self.stream = stream if stream is not None else cuda.Stream()
        self.stream_handle = int(self.stream.handle)
        major, minor = self.device.compute_capability()
        self.arch = major * 10 + minor
        self.name = f"cuda:{device_id} {self.device.name()} (sm_{self.arch})"
        self._nvcc = nvcc or build.find_nvcc()
        self._functions: dict[str, Any] = {}
        self._staging: dict[int, tuple[np.ndarray, Any]] = {}  # nbytes -> (pinned buffer, event)
        self.how_loaded = ""
        self._load_modules()

    # ---- modules -------------------------------------------------------------------------------

    def _load_modules(self) -> None:
        cuda = self._cuda
        in_fatbin = self._nvcc is not None and self.arch in build.FATBIN_ARCHS and \
            self.arch in build.nvcc_archs(self._nvcc)
        modules = {}
        for file in KERNEL_FILES:
            if in_fatbin:
                modules[file] = cuda.module_from_file(str(build.compile_fatbin(file, self._nvcc)))
                self.how_loaded = "fatbin"
            else:
                modules[file] = self._source_module(file)
                self.how_loaded = f"SourceModule sm_{self.arch}"
        for name, (file, kinds) in KERNELS.items():
            self._functions[name] = modules[file].get_function(name).prepare(kinds)

    def _source_module(self, file: str):
        if self._nvcc is None:
            raise NotAvailableError(
                f"sm_{self.arch}: no nvcc to build the kernels (this GPU's arch is not in the prebuilt "
                f"list {build.FATBIN_ARCHS}, or there is no nvcc for the fatbin); install the CUDA toolkit "
                f"(JetPack ships it) or set CUDACXX")
        from pycuda.compiler import SourceModule

        source = (build.KERNEL_DIR / file).read_text()
        return SourceModule(source, nvcc=self._nvcc, no_extern_c=True, arch=f"sm_{self.arch}",
                            include_dirs=[str(build.KERNEL_DIR)], options=["-std=c++14", "-O3"])

    # ---- Device protocol -------------------------------------------------------------------------

    def empty(self, shape, dtype):
        return self._gpuarray.empty(tuple(shape), dtype=np.dtype(dtype))

    def pointer(self, buf) -> int:
        return int(buf.gpudata)

    def _stage(self, nbytes: int) -> np.ndarray:
        """A pinned host buffer of nbytes whose previous async copy has finished."""
        entry = self._staging.get(nbytes)
        if entry is None:
            entry = (self._cuda.pagelocked_empty(nbytes, np.uint8), self._cuda.Event())
            entry[1].record(self.stream)
            self._staging[nbytes] = entry
        entry[1].synchronize()
        return entry[0]

    def _staged(self, nbytes: int):
        return self._staging[nbytes][1]

    def upload(self, array: np.ndarray, out=None):
        host, out = upload_target(self, array, out)
        if host.nbytes == 0:
            return out
        stage = self._stage(host.nbytes)
        stage[:] = host.reshape(-1).view(np.uint8)
        self._cuda.memcpy_htod_async(out.gpudata, stage, self.stream)
        self._staged(host.nbytes).record(self.stream)
        return out

    def download(self, buf) -> np.ndarray:
        stage = self._stage(buf.nbytes)
        self._cuda.memcpy_dtoh_async(stage, buf.gpudata, self.stream)
        self._staged(buf.nbytes).record(self.stream)
        self.stream.synchronize()
        return stage.view(buf.dtype).reshape(buf.shape).copy()

    def zero(self, buf) -> None:
        if buf.dtype.itemsize != 4:
            raise TypeError("zero: the kernels' buffers are 4-byte types")
        self._cuda.memset_d32_async(buf.gpudata, 0, buf.size, self.stream)

    def launch(self, kernel: str, launch: Launch, *args) -> None:
        kinds = KERNELS[kernel][1]
        if len(args) != len(kinds):
            raise TypeError(f"{kernel}: {len(args)} arguments for {len(kinds)} parameters")
        values = []
        for kind, arg in zip(kinds, args):
            if kind == "P":
                values.append(np.intp(0) if arg is None else np.intp(int(arg.gpudata)))
            elif kind == "i":
                values.append(np.int32(arg))
            else:
                values.append(np.float32(arg))
        self._functions[kernel].prepared_async_call((launch.grid[0], launch.grid[1]), (launch.block, 1, 1),
                                                    self.stream, *values)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def elapsed_ms(self, fn) -> float:
        """CUDA-event milliseconds of the work fn() enqueues on the stream."""
        start, end = self._cuda.Event(), self._cuda.Event()
        start.record(self.stream)
        fn()
        end.record(self.stream)
        end.synchronize()
        return start.time_till(end)

    def close(self) -> None:
        """Pop the primary context this object pushed."""
        self.stream.synchronize()
        self.context.pop()
