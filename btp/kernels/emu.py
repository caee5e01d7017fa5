"""The CUDA kernels' own source, run on the CPU under btp/kernels/emu/cuda_emu.h (via ctypes).

``EmuDevice`` implements the ``btp.kernels.ops.Device`` protocol with numpy arrays as "device"
buffers, so ``btp.kernels.ops`` (the code the GPU runs) runs unchanged against it. Slow (one OS
thread per CUDA thread): for tests with small blocks, not for production.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any

import numpy as np

from btp.kernels.build import emu_library
from btp.kernels.launch import KERNELS, Launch

_CTYPES = {"P": ctypes.c_void_p, "i": ctypes.c_int, "f": ctypes.c_float}


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(emu_library()))
    lib.emu_last_error.restype = ctypes.c_char_p
    for name, (_, kinds) in KERNELS.items():
        fn = getattr(lib, "emu_" + name)
        fn.argtypes = [ctypes.c_int] * 3 + [_CTYPES[k] for k in kinds]
        fn.restype = ctypes.c_int
    return lib


class EmuDevice:
    """Buffers are C-contiguous numpy arrays; launches run the kernel source on host threads."""

    name = "cuda-emulation"
    binding = "emu"

    def __init__(self) -> None:
        self.lib = _library()
        self.launches: list[tuple[str, Launch]] = []  # for tests: what ran, with which geometry

    def empty(self, shape, dtype) -> np.ndarray:
        # filled with garbage-like values, as device memory would be: kernels must not rely on 0s
        out = np.empty(shape, dtype=dtype)
        out.fill(np.nan if np.dtype(dtype).kind == "f" else (12345 if np.dtype(dtype).kind == "u" else -12345))
        return out

    def upload(self, array: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return np.array(array, copy=True, order="C")
        flat = np.asarray(array, dtype=out.dtype).reshape(-1)
        if flat.size > out.size:
            raise ValueError(f"upload: {flat.size} values into a buffer of {out.size}")
        out.reshape(-1)[:flat.size] = flat
        return out

    def pointer(self, buf: np.ndarray) -> int:
        return int(buf.ctypes.data)

    def synchronize(self) -> None:
        pass

    def download(self, buf: np.ndarray) -> np.ndarray:
        return np.array(buf, copy=True)

    def zero(self, buf: np.ndarray) -> None:
        buf.fill(0)

    def launch(self, kernel: str, launch: Launch, *args: Any) -> None:
        kinds = KERNELS[kernel][1]
        if len(args) != len(kinds):
            raise TypeError(f"{kernel}: {len(args)} arguments for {len(kinds)} parameters")
        c_args = []
        for kind, arg in zip(kinds, args):
            if kind == "P":
                if arg is not None and not (isinstance(arg, np.ndarray) and arg.flags.c_contiguous):
                    raise TypeError(f"{kernel}: pointer arguments must be C-contiguous numpy arrays")
                c_args.append(None if arg is None else arg.ctypes.data)
            else:
                c_args.append(arg)
        self.launches.append((kernel, launch))
        status = getattr(self.lib, "emu_" + kernel)(launch.grid[0], launch.grid[1], launch.block, *c_args)
        if status:
            raise RuntimeError(f"{kernel} (emulated): {self.lib.emu_last_error().decode()}")
