"""cuda-python side of the kernels: ``CudaPythonDevice``, the ``btp.kernels.ops.Device`` of a GPU
reached through NVIDIA's ``cuda.bindings`` (driver API + NVRTC), for machines without pycuda.

- The kernels are compiled by NVRTC for this GPU's arch (``btp.kernels.build.compile_nvrtc``:
  cubin cached by source hash, arch and NVRTC version); no nvcc needed.
- One stream carries every copy and launch (``stream_handle`` for TensorRT / ORT); the context
  is the device's primary context, the one the CUDA runtime uses.
- Host <-> device copies go through pinned staging buffers (``cuMemHostAlloc``), reused, with an
  event per buffer, as in ``btp.kernels.cuda``.

Imported lazily; ``cuda.bindings`` (or the older ``cuda.cuda`` / ``cuda.nvrtc``) is only needed
when a device is opened, and NVRTC only in the child process that compiles. Same contract as ``btp.kernels.cuda.CudaDevice``.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from btp.errors import NotAvailableError
from btp.kernels import build
from btp.kernels.cuda_bindings import check, driver_api
from btp.kernels.launch import KERNEL_FILES, KERNELS, Launch
from btp.kernels.ops import upload_target


def unavailable_reason() -> str | None:
    """Why cuda-python cannot run the kernels here (None when it can)."""
    try:
        driver = driver_api()
        check(driver.cuInit(0), "cuInit")
        count = check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    except NotAvailableError as exc:
        return str(exc)
    except Exception as exc:  # no libcuda: cuda.pathfinder's DynamicLibNotFoundError, RuntimeError, ...
        return f"no CUDA driver or GPU usable ({type(exc).__name__}: {exc})"
    return None if count else "no NVIDIA GPU visible (cuDeviceGetCount() == 0)"


class DeviceArray:
    """A device allocation with numpy-like ``shape``, ``dtype``, ``size``, ``nbytes``; ``ptr`` is
    the device address (int)."""

    def __init__(self, device: "CudaPythonDevice", shape, dtype) -> None:
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize
        self._device = device
        self.ptr = int(check(device.driver.cuMemAlloc(max(self.nbytes, 1)), "cuMemAlloc"))

    def __del__(self) -> None:
        try:
            self._device.driver.cuMemFree(self.ptr)
        except Exception:  # interpreter shutdown: the context may already be gone
            pass


class CudaPythonDevice:
    """Buffers are ``DeviceArray``; everything is enqueued on ``self.stream``."""

    binding = "cuda-python"

    def __init__(self, device_id: int = 0) -> None:
        reason = unavailable_reason()
        if reason:
            raise NotAvailableError(reason)
        self.driver = driver_api()
        drv = self.driver
        self.device = check(drv.cuDeviceGet(device_id), "cuDeviceGet")
        self.context = check(drv.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        check(drv.cuCtxPushCurrent(self.context), "cuCtxPushCurrent")
        attr = drv.CUdevice_attribute
        major = check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "arch")
        minor = check(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "arch")
        self.arch = int(major) * 10 + int(minor)
        name = bytes(check(drv.cuDeviceGetName(256, self.device), "cuDeviceGetName")).split(b"\0")[0].decode()
        self.name = f"cuda:{device_id} {name} (sm_{self.arch}, cuda-python)"
        self.stream = check(drv.cuStreamCreate(0), "cuStreamCreate")
        self.stream_handle = int(self.stream)
        self._staging: dict[int, tuple[np.ndarray, Any, Any]] = {}  # nbytes -> (pinned view, host ptr, event)
        self._functions: dict[str, Any] = {}
        for file in KERNEL_FILES:
            module = check(drv.cuModuleLoadData(build.compile_nvrtc(file, self.arch)), "cuModuleLoadData")
            for kernel, (source, _) in KERNELS.items():
                if source == file:
                    self._functions[kernel] = check(drv.cuModuleGetFunction(module, kernel.encode()),
                                                    f"cuModuleGetFunction({kernel})")
        self.how_loaded = f"NVRTC sm_{self.arch}"

    # ---- Device protocol -------------------------------------------------------------------------

    def empty(self, shape, dtype) -> DeviceArray:
        return DeviceArray(self, shape, dtype)

    def pointer(self, buf: DeviceArray) -> int:
        return buf.ptr

    def _stage(self, nbytes: int):
        """A pinned host buffer of nbytes whose previous async copy has finished."""
        entry = self._staging.get(nbytes)
        if entry is None:
            host = int(check(self.driver.cuMemHostAlloc(nbytes, 0), "cuMemHostAlloc"))
            view = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(host))
            event = check(self.driver.cuEventCreate(0), "cuEventCreate")
            check(self.driver.cuEventRecord(event, self.stream), "cuEventRecord")
            entry = self._staging[nbytes] = (view, host, event)
        check(self.driver.cuEventSynchronize(entry[2]), "cuEventSynchronize")
        return entry

    def upload(self, array: np.ndarray, out: DeviceArray | None = None) -> DeviceArray:
        host, out = upload_target(self, array, out)
        if host.nbytes == 0:
            return out
        view, ptr, event = self._stage(host.nbytes)
        view[:] = host.reshape(-1).view(np.uint8)
        check(self.driver.cuMemcpyHtoDAsync(out.ptr, ptr, host.nbytes, self.stream), "cuMemcpyHtoDAsync")
        check(self.driver.cuEventRecord(event, self.stream), "cuEventRecord")
        return out

    def download(self, buf: DeviceArray) -> np.ndarray:
        view, ptr, event = self._stage(buf.nbytes)
        check(self.driver.cuMemcpyDtoHAsync(ptr, buf.ptr, buf.nbytes, self.stream), "cuMemcpyDtoHAsync")
        check(self.driver.cuEventRecord(event, self.stream), "cuEventRecord")
        self.synchronize()
        return view.view(buf.dtype).reshape(buf.shape).copy()

    def zero(self, buf: DeviceArray) -> None:
        if buf.dtype.itemsize != 4:
            raise TypeError("zero: the kernels' buffers are 4-byte types")
        check(self.driver.cuMemsetD32Async(buf.ptr, 0, buf.size, self.stream), "cuMemsetD32Async")

    def launch(self, kernel: str, launch: Launch, *args) -> None:
        kinds = KERNELS[kernel][1]
        if len(args) != len(kinds):
            raise TypeError(f"{kernel}: {len(args)} arguments for {len(kinds)} parameters")
        # kernelParams = an array of pointers, one per argument, each to that argument's value
        values = [np.array([0 if a is None else a.ptr], np.uint64) if k == "P" else
                  np.array([a], np.int32 if k == "i" else np.float32) for k, a in zip(kinds, args)]
        params = np.array([v.ctypes.data for v in values], dtype=np.uint64)
        check(self.driver.cuLaunchKernel(self._functions[kernel], launch.grid[0], launch.grid[1], 1, launch.block,
                                         1, 1, 0, self.stream, params.ctypes.data, 0), f"cuLaunchKernel({kernel})")

    def synchronize(self) -> None:
        check(self.driver.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def elapsed_ms(self, fn) -> float:
        """CUDA-event milliseconds of the work fn() enqueues on the stream."""
        drv = self.driver
        start, end = check(drv.cuEventCreate(0), "cuEventCreate"), check(drv.cuEventCreate(0), "cuEventCreate")
        check(drv.cuEventRecord(start, self.stream), "cuEventRecord")
        fn()
        check(drv.cuEventRecord(end, self.stream), "cuEventRecord")
        check(drv.cuEventSynchronize(end), "cuEventSynchronize")
        ms = float(check(drv.cuEventElapsedTime(start, end), "cuEventElapsedTime"))
        drv.cuEventDestroy(start)
        drv.cuEventDestroy(end)
        return ms

    def close(self) -> None:
        """Pop the primary context this object pushed."""
        self.synchronize()
        check(self.driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
