"""NVIDIA cuda-python's modules (driver API, NVRTC) and the check of their return codes: used by
the cuda-python device (``btp.kernels.cuda_python``), the NVRTC build (``btp.kernels.build``)
and the device report (``btp.kernels.devices``). Imports nothing of cuda-python until called.
"""
from __future__ import annotations

from btp.errors import NotAvailableError


def driver_api():
    """cuda-python's driver API module, or NotAvailableError. (NVRTC is imported only by the
    child process that compiles the kernels: ``btp.kernels.build.compile_nvrtc``.)"""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError as exc:
            raise NotAvailableError(f"cuda-python is not installed ({exc}); pip install cuda-python") from None
    return driver


def nvrtc_api():
    """cuda-python's NVRTC module (for the compiling child process), or NotAvailableError."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        try:
            from cuda import nvrtc  # cuda-python < 12.6
        except ImportError as exc:
            raise NotAvailableError(f"cuda-python's NVRTC is not installed ({exc}); pip install cuda-python") from None
    return nvrtc


def check(result, what: str):
    """cuda-python calls return (status, *values): raise on a bad status, return the values."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise RuntimeError(f"{what} failed: {status!r}")
    return values[0] if len(values) == 1 else tuple(values)
