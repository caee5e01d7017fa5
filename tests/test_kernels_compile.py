"""CI for the kernel source without a GPU: nvcc compiles every .cu for Orin (sm_87) and Hopper
(sm_90) with warnings as errors, ptxas' resource report shows no register spills, the launch
table matches the source, and the source stays within what CUDA 11.4 (JetPack) accepts."""
from __future__ import annotations

import re
import sys

import pytest

from btp.kernels import build
from btp.kernels.launch import HOT_KERNELS, KERNEL_FILES, KERNELS, MAX_K

NVCC = build.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit absent): compile checks skipped")

# The kNN kernel keeps its K (<= 64) best (dist2, index) pairs in a per-thread array that is
# indexed dynamically, so it lives in local memory (L1-cached): 64 * (4 + 4) bytes. That is a
# stack frame by design, not a spill; every other kernel must have none.
STACK_FRAME_ALLOWED = {"btp_knn_group": MAX_K * 8}


@needs_nvcc
@pytest.mark.parametrize("arch", [87, 90])
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_compiles_without_warnings_or_spills(source, arch):
    report = build.resource_report(source, arch, NVCC)  # raises with nvcc's output on any warning
    usage = build.parse_resource_usage(report)
    expected = {name for name, (file, _) in KERNELS.items() if file == source}
    assert set(usage) == expected, f"kernels in {source}: {sorted(usage)}"
    for name, info in usage.items():
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} spills on sm_{arch}: {info}"
        assert info["stack_frame"] <= STACK_FRAME_ALLOWED.get(name, 0), f"{name} on sm_{arch}: {info}"
        assert 0 < info["registers"] <= 64, f"{name} on sm_{arch}: {info}"
    assert all(k in KERNELS for k in HOT_KERNELS)


def _nvrtc_reason() -> str | None:
    """Asked in a child process, as compile_nvrtc runs NVRTC there (never loaded beside torch)."""
    import subprocess
    import sys

    code = "from cuda.bindings import nvrtc; assert int(nvrtc.nvrtcVersion()[0]) == 0"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"NVRTC not usable here ({tail}); pip install cuda-bindings nvidia-cuda-nvrtc"
    return None


@pytest.mark.skipif(_nvrtc_reason() is not None, reason=_nvrtc_reason() or "")
@pytest.mark.parametrize("source", KERNEL_FILES)
def test_nvrtc_compiles_every_kernel_for_hopper(source, tmp_path, monkeypatch):
    # the cuda-python route (btp.kernels.cuda_python): NVRTC, no host headers, cubin for sm_90
    monkeypatch.setenv("BTP_CACHE_DIR", str(tmp_path))
    cubin = build.compile_nvrtc(source, 90)
    assert cubin[:4] == b"\x7fELF"
    names = {name for name, (file, _) in KERNELS.items() if file == source}
    assert all(name.encode() in cubin for name in names)  # extern "C" symbols, as cuModuleGetFunction needs
    assert build.compile_nvrtc(source, 90) == cubin  # cached by source hash
    assert list(tmp_path.rglob("*.cubin"))
    assert "cuda.bindings.nvrtc" not in sys.modules  # NVRTC ran in a child process


@needs_nvcc
def test_warnings_are_errors(tmp_path, monkeypatch):
    # the check above would be worthless if nvcc let warnings through
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void k(float* x) { int unused; x[0] = 1.0f; }\n')
    monkeypatch.setattr(build, "KERNEL_DIR", tmp_path)
    monkeypatch.setattr(build, "COMMON_HEADERS", ())
    monkeypatch.setenv("BTP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="unused"):
        build.resource_report("bad.cu", 87, NVCC)


@needs_nvcc
def test_fatbin_for_one_arch_plus_ptx(tmp_path, monkeypatch):
    monkeypatch.setenv("BTP_CACHE_DIR", str(tmp_path))
    path = build.compile_fatbin("scores.cu", NVCC, archs=(87,))
    assert path.read_bytes()[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    assert build.compile_fatbin("scores.cu", NVCC, archs=(87,)) == path  # cached by hash


def test_parse_resource_usage_reads_spills():
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 16 registers
"""
    assert build.parse_resource_usage(text) == {
        "k1": {"stack_frame": 8, "spill_stores": 4, "spill_loads": 12, "registers": 255},
        "k2": {"stack_frame": 0, "spill_stores": 0, "spill_loads": 0, "registers": 16},
    }


def test_fatbin_command_lists_every_arch_and_ptx():
    cmd = build.fatbin_command("nvcc", build.KERNEL_DIR / "fps.cu", build.KERNEL_DIR / "o", build.FATBIN_ARCHS)
    codes = [cmd[i + 1] for i, flag in enumerate(cmd) if flag == "-gencode"]
    assert codes[:-1] == [f"arch=compute_{a},code=sm_{a}" for a in (75, 80, 86, 87, 89, 90, 100, 110, 120)]
    assert codes[-1] == "arch=compute_75,code=compute_75"
    assert "-Werror" in cmd and "all-warnings" in cmd


_PARAM_KIND = [(re.compile(r"\*"), "P"), (re.compile(r"^(const\s+)?int\s"), "i"), (re.compile(r"^(const\s+)?float\s"), "f")]


def _source_signatures() -> dict[str, tuple[str, str]]:
    found = {}
    for file in KERNEL_FILES:
        text = re.sub(r"//[^\n]*", "", (build.KERNEL_DIR / file).read_text())
        for match in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\)\s*)?(\w+)\(([^)]*)\)', text):
            kinds = ""
            for param in match.group(2).split(","):
                param = " ".join(param.split())
                kinds += next(kind for pattern, kind in _PARAM_KIND if pattern.search(param))
            found[match.group(1)] = (file, kinds)
    return found


def test_launch_table_matches_kernel_signatures():
    assert _source_signatures() == KERNELS


def test_source_stays_within_cuda_11_4():
    # JetPack 5 (Xavier/Orin) ships CUDA 11.4: no CUB/libcu++/cooperative groups, no intrinsics
    # newer than sm_80-era toolkits, and C++14 (the fatbin and CI compiles use -std=c++14).
    forbidden = ("cooperative_groups", "cuda::", "#include <cub", "__reduce_", "__nv_bfloat", "std::",
                 "if constexpr", "<=>")
    for path in build.kernel_sources():
        text = path.read_text()
        for token in forbidden:
            assert token not in text, f"{path.name} uses {token!r}"
        assert "__shfl_down(" not in text and "__shfl(" not in text  # pre-Volta, removed in CUDA 9+
