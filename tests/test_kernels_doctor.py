"""`btp doctor [--gpu]`: reports what this machine can run; --gpu fails with the reason where
there is no usable GPU."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.cli.doctor import collect_checks
from btp.kernels.devices import gpu_unavailable_reason


def test_doctor_lists_every_check():
    names = [c.name for c in collect_checks()]
    assert names[:3] == ["python", "numpy", "onnxruntime"]
    for name in ("nvcc", "kernel emulation (g++)", "CUDA binding pycuda", "CUDA binding cuda-python", "CUDA GPU",
                 "preprocess auto", "TensorRT", "torch"):
        assert name in names
    result = CliRunner().invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "CUDA GPU" in result.output and "preprocess auto" in result.output


@pytest.mark.skipif(gpu_unavailable_reason() is None, reason="a GPU is usable here: the no-GPU exit cannot be seen")
def test_doctor_gpu_exits_2_with_the_reason():
    result = CliRunner().invoke(app, ["doctor", "--gpu"])
    assert result.exit_code == 2
    assert "no usable GPU" in result.output and "pycuda" in result.output and "cuda-python" in result.output


def test_gpu_modules_import_without_torch_pycuda_or_tensorrt():
    import subprocess
    import sys

    code = ("import sys\n"
            "import btp.kernels.ops, btp.kernels.emu, btp.kernels.cuda, btp.kernels.cuda_python, btp.kernels.devices\n"
            "import btp.kernels.preprocess, btp.kernels.build, btp.runtime.device\n"
            "import btp.cli.doctor, btp.benchmarks.gpu, btp.runtime.tensorrt, btp.runtime.backends.trt\n"
            "print(sorted(m for m in ('torch', 'pycuda', 'tensorrt') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
