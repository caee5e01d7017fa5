"""Compiling the kernel source: nvcc -> fatbin (GPU) and g++ -> shared library (CPU emulation).

Everything is cached by a hash of the sources, the compiler's version and the flags, under
``$BTP_CACHE_DIR`` or ``~/.cache/btp`` (``kernels/<hash>/``). Builds write to a temporary name
and rename, so concurrent processes never see half a file. Torch-free, pycuda-free.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from btp.errors import NotAvailableError
from btp.kernels.launch import KERNEL_FILES

KERNEL_DIR = Path(__file__).resolve().parent
EMU_DIR = KERNEL_DIR / "emu"
COMMON_HEADERS = ("btp_common.cuh",)

# Turing, Ampere (A100, RTX 30), Orin, Ada, Hopper, Blackwell (B200), Thor, Blackwell (RTX 50).
# Xavier (sm_72) is not in CUDA 13: there the kernels compile from source with JetPack's nvcc.
FATBIN_ARCHS = (75, 80, 86, 87, 89, 90, 100, 110, 120)
# PTX of the lowest arch rides along: the driver JIT-compiles it on GPUs newer than the list.
PTX_ARCH = 75
NVCC_FLAGS = ("-std=c++14", "-O3", "-lineinfo", "-Werror", "all-warnings")
EMU_FLAGS = ("-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-fPIC", "-shared",
             "-Wall", "-Wextra", "-Werror")


def cache_dir() -> Path:
    """$BTP_CACHE_DIR or ~/.cache/btp."""
    return Path(os.environ.get("BTP_CACHE_DIR", Path.home() / ".cache" / "btp")).expanduser()


def source_hash(paths, *extra: str) -> str:
    """sha256 over the files' names and bytes plus any extra strings (compiler, flags); 16 hex."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        h.update(item.encode() + b"\0")
    return h.hexdigest()[:16]


def kernel_sources() -> list[Path]:
    """The .cu files and the headers they include."""
    return [KERNEL_DIR / f for f in (*KERNEL_FILES, *COMMON_HEADERS)]


def find_nvcc() -> str | None:
    """$CUDACXX, nvcc on PATH, or /usr/local/cuda/bin/nvcc; None when absent."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else out.strip().splitlines()[-1]


@lru_cache(maxsize=8)
def nvcc_archs(nvcc: str) -> tuple[int, ...]:
    """The sm_XY numbers this nvcc can target (`nvcc --list-gpu-arch`, CUDA 11.1+)."""
    out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return tuple(sorted({int(m) for m in re.findall(r"compute_(\d+)", out)}))


def gencode_flags(archs, ptx_arch: int | None) -> list[str]:
    """-gencode flags: SASS for every arch in ``archs`` + PTX for ``ptx_arch`` (pure)."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if ptx_arch is not None:
        flags += ["-gencode", f"arch=compute_{ptx_arch},code=compute_{ptx_arch}"]
    return flags


def fatbin_command(nvcc: str, source: Path, output: Path, archs, ptx_arch: int | None = PTX_ARCH,
                   extra=()) -> list[str]:
    """The nvcc command line that builds one .cu into a fatbin (pure; see compile_fatbin)."""
    return [nvcc, "-fatbin", *NVCC_FLAGS, *gencode_flags(archs, ptx_arch), "-I", str(KERNEL_DIR),
            *extra, "-o", str(output), str(source)]


def _atomic_build(target: Path, build) -> Path:
    """Run build(tmp_path) and rename the result to target (safe under concurrent builders)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compile_fatbin(source_name: str, nvcc: str | None = None, archs=None) -> Path:
    """btp/kernels/<source_name> -> cached fatbin path (SASS for FATBIN_ARCHS this nvcc knows)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise NotAvailableError("nvcc not found (set CUDACXX or put the CUDA toolkit's bin on PATH); "
                                "it is needed once to build the kernels' fatbin")
    known = nvcc_archs(nvcc)
    wanted = tuple(a for a in (archs or FATBIN_ARCHS) if not known or a in known)
    ptx = PTX_ARCH if not known or PTX_ARCH in known else (min(known) if known else None)
    source = KERNEL_DIR / source_name
    key = source_hash([source, *(KERNEL_DIR / h for h in COMMON_HEADERS)], nvcc_version(nvcc),
                      " ".join(fatbin_command("nvcc", Path(source_name), Path("o"), wanted, ptx)))
    target = cache_dir() / "kernels" / key / (Path(source_name).stem + ".fatbin")
    if target.is_file():
        return target

    def build(tmp: Path) -> None:
        cmd = fatbin_command(nvcc, source, tmp, wanted, ptx)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed on {source}:\n{' '.join(cmd)}\n{proc.stderr}")

    return _atomic_build(target, build)


NVRTC_FLAGS = ("-std=c++14", "--fmad=false")


def compile_nvrtc(source_name: str, arch: int) -> bytes:
    """btp/kernels/<source_name> -> cubin bytes for sm_<arch> by NVRTC (cuda-python's ``nvrtc``),
    cached by source hash, arch and NVRTC version. The distances use the _rn intrinsics, which are
    never contracted into FMAs; ``--fmad=false`` keeps the rest as nvcc's build does.

    NVRTC runs in a child process (``python -m btp.kernels.build nvrtc SOURCE ARCH``): loaded into
    a process that also holds PyTorch, the NVRTC 13.5 wheel corrupted later ``torch.save`` output
    in our tests (a storage pickled with 0 bytes). Only the cubin bytes come back."""
    proc = subprocess.run([sys.executable, "-m", "btp.kernels.build", "nvrtc", source_name, str(int(arch))],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"NVRTC could not build {source_name} for sm_{arch}:\n{proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1]).read_bytes()


def _nvrtc_cubin(source_name: str, arch: int) -> Path:
    """The NVRTC build itself (in the child process): the cached cubin's path."""
    from btp.kernels.cuda_bindings import check, nvrtc_api

    nvrtc = nvrtc_api()
    version = ".".join(str(v) for v in check(nvrtc.nvrtcVersion(), "nvrtcVersion"))
    source = KERNEL_DIR / source_name
    headers = [KERNEL_DIR / h for h in COMMON_HEADERS]
    options = [*NVRTC_FLAGS, f"--gpu-architecture=sm_{arch}"]
    key = source_hash([source, *headers], "nvrtc " + version, " ".join(options))
    target = cache_dir() / "kernels" / key / f"{source.stem}.sm_{arch}.cubin"
    if target.is_file():
        return target
    prog = check(nvrtc.nvrtcCreateProgram(source.read_bytes(), source.name.encode(), len(headers),
                                          [h.read_bytes() for h in headers], [h.name.encode() for h in headers]),
                 "nvrtcCreateProgram")
    status = nvrtc.nvrtcCompileProgram(prog, len(options), [o.encode() for o in options])
    size = check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    if int(status[0]) != 0:
        raise RuntimeError(f"NVRTC {version} failed on {source} for sm_{arch}:\n{log.decode(errors='replace')}")
    cubin = b" " * check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
    check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    return _atomic_build(target, lambda tmp: tmp.write_bytes(cubin))


def _main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "nvrtc":
        try:
            print(_nvrtc_cubin(argv[1], int(argv[2])))
        except Exception as exc:  # the parent reports it
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m btp.kernels.build nvrtc SOURCE.cu ARCH", file=sys.stderr)
    return 2


def emu_library() -> Path:
    """Build (once per source hash) the CPU emulation of the kernels: btp_emu.so."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if cxx is None:
        raise NotAvailableError("g++ not found: the CPU emulation of the CUDA kernels needs a C++20 "
                                "compiler (Debian: apt-get install g++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    sources = [*kernel_sources(), EMU_DIR / "cuda_emu.h", EMU_DIR / "emu_entry.cpp"]
    key = source_hash(sources, version, " ".join(EMU_FLAGS))
    target = cache_dir() / "kernels" / key / "btp_emu.so"
    if target.is_file():
        return target

    def build(tmp: Path) -> None:
        cmd = [cxx, *EMU_FLAGS, "-include", str(EMU_DIR / "cuda_emu.h"), "-o", str(tmp),
               str(EMU_DIR / "emu_entry.cpp")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"building the kernel emulation failed:\n{' '.join(cmd)}\n{proc.stderr}")

    return _atomic_build(target, build)


# ---- resource report (CI check without a GPU) ------------------------------------------------

def resource_command(nvcc: str, source: Path, arch: int, output: Path) -> list[str]:
    """nvcc -cubin for one arch with warnings as errors and ptxas' per-kernel resource report."""
    return [nvcc, "-cubin", *NVCC_FLAGS, f"-arch=sm_{arch}", "--resource-usage", "-Xptxas", "-warn-spills",
            "-I", str(KERNEL_DIR), "-o", str(output), str(source)]


_FUNC_RE = re.compile(r"Function properties for (\w+)")
_FRAME_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'|Used (\d+) registers")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """ptxas --resource-usage output -> {kernel: {stack_frame, spill_stores, spill_loads, registers}}.

    Reads the 'Function properties for K' block (stack frame, spills) and the 'Used N registers'
    line that follows 'Compiling entry function K'.
    """
    usage: dict[str, dict[str, int]] = {}
    current = None
    entry = None
    for line in text.splitlines():
        match = _FUNC_RE.search(line)
        if match:
            current = match.group(1)
            usage.setdefault(current, {})
            continue
        match = _FRAME_RE.search(line)
        if match and current is not None:
            frame, stores, loads = map(int, match.groups())
            usage[current].update(stack_frame=frame, spill_stores=stores, spill_loads=loads)
            continue
        match = re.search(r"Compiling entry function '(\w+)'", line)
        if match:
            entry = match.group(1)
            continue
        match = re.search(r"Used (\d+) registers", line)
        if match and entry is not None:
            usage.setdefault(entry, {})["registers"] = int(match.group(1))
    return usage


def resource_report(source_name: str, arch: int, nvcc: str | None = None) -> str:
    """Compile btp/kernels/<source_name> for sm_<arch> (warnings are errors) and return ptxas'
    resource report; cached by source hash. Raises RuntimeError with nvcc's output on failure."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise NotAvailableError("nvcc not found (set CUDACXX or put the CUDA toolkit's bin on PATH)")
    source = KERNEL_DIR / source_name
    key = source_hash([source, *(KERNEL_DIR / h for h in COMMON_HEADERS)], nvcc_version(nvcc),
                      " ".join(resource_command("nvcc", Path(source_name), arch, Path("o"))))
    target = cache_dir() / "kernels" / key / f"{Path(source_name).stem}.sm_{arch}.resources.txt"
    if target.is_file():
        return target.read_text()

    def build(tmp: Path) -> None:
        cubin = tmp.with_suffix(".cubin")
        cmd = resource_command(nvcc, source, arch, cubin)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        cubin.unlink(missing_ok=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed on {source} for sm_{arch}:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        tmp.write_text(proc.stdout + proc.stderr)

    return _atomic_build(target, build).read_text()


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
