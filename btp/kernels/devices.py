"""Which CUDA binding runs the kernels: pycuda (``btp.kernels.cuda``) or NVIDIA's cuda-python
(``btp.kernels.cuda_python``), behind the one ``btp.kernels.ops.Device`` interface.

``open_device("auto")`` takes pycuda when it is installed and sees a GPU (the ``[gpu]`` extra, the
user's choice), else cuda-python (shipped with NVIDIA's Python stack, e.g. beside PyTorch), else
raises NotAvailableError naming what each one lacks. ``"emu"`` is the CPU emulation of the same
kernel source (``btp.kernels.emu``): slow, for proving the wiring in tests and CI.
"""
from __future__ import annotations

from btp.errors import NotAvailableError

BINDINGS = ("pycuda", "cuda-python")


def unavailable_reasons() -> dict[str, str | None]:
    """{binding: why it cannot run the kernels here, or None when it can}."""
    from btp.kernels import cuda, cuda_python

    return {"pycuda": cuda.gpu_unavailable_reason(), "cuda-python": cuda_python.unavailable_reason()}


def gpu_unavailable_reason() -> str | None:
    """None when some binding can run the kernels on a GPU, else both reasons in one line."""
    reasons = unavailable_reasons()
    if any(r is None for r in reasons.values()):
        return None
    return "; ".join(f"{name}: {why}" for name, why in reasons.items())


def open_device(binding: str = "auto", device_id: int = 0):
    """A ``Device`` on GPU ``device_id`` through ``binding`` (auto | pycuda | cuda-python | emu)."""
    if binding == "emu":
        from btp.kernels.emu import EmuDevice

        return EmuDevice()
    if binding not in ("auto", *BINDINGS):
        raise ValueError(f"unknown CUDA binding {binding!r}; choose auto, {', '.join(BINDINGS)} or emu")
    reasons = unavailable_reasons()
    for name in (BINDINGS if binding == "auto" else (binding,)):
        if reasons[name] is None:
            if name == "pycuda":
                from btp.kernels.cuda import CudaDevice

                return CudaDevice(device_id)
            from btp.kernels.cuda_python import CudaPythonDevice

            return CudaPythonDevice(device_id)
    raise NotAvailableError("no CUDA binding can run the kernels here: " +
                            "; ".join(f"{n}: {reasons[n]}" for n in (BINDINGS if binding == "auto" else (binding,))))


def gpu_identity(device_id: int = 0) -> tuple[str, str]:
    """(name, compute capability "M.m") of GPU ``device_id`` by whichever binding is usable
    (no kernels loaded)."""
    reasons = unavailable_reasons()
    if reasons["pycuda"] is None:
        import pycuda.driver as cuda

        cuda.init()
        dev = cuda.Device(device_id)
        major, minor = dev.compute_capability()
        return dev.name(), f"{major}.{minor}"
    if reasons["cuda-python"] is None:
        from btp.kernels.cuda_bindings import check, driver_api

        driver = driver_api()
        dev = check(driver.cuDeviceGet(device_id), "cuDeviceGet")
        attr = driver.CUdevice_attribute
        major = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "arch")
        minor = check(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "arch")
        name = bytes(check(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")).split(b"\0")[0].decode()
        return name, f"{major}.{minor}"
    raise NotAvailableError(gpu_unavailable_reason())
