#!/usr/bin/env bash
# GPU check for btp-edge: run on any machine with an NVIDIA GPU and driver.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--sizes 2048,40000,400000,2000000] [--quick]
#
# 1. installs what is missing (pycuda, tensorrt, onnxruntime-gpu) from local wheels/sdists in
#    DIR if given (pip --no-index --find-links DIR), otherwise from the configured index; the
#    kernels run through pycuda or, without it, NVIDIA's cuda-python (driver API + NVRTC);
# 2. `btp doctor --gpu` (GPU, CUDA bindings, nvcc, TensorRT; kernels vs CPU on one cloud);
# 3. the kernel tests: nvcc/NVRTC compile and resource check, the CPU emulation, the GPU tests
#    (kernels vs btp.geometry on random, lattice and real shapes at the given sizes, through
#    each usable binding) and Pipeline(preprocess="cuda"|"cuda-emu") against the CPU chain;
# 4. python -m btp.benchmarks.gpu: CUDA-event latencies next to PyTorch references, the
#    product's Pipeline(preprocess="cuda"), the torch-CUDA model path and TensorRT (reported
#    as skipped, with the reason, where it is not importable) ->
#    benchmarks/results/gpu-<device>-<date>.md|json (commit them, naming the machine).
# Exit status: 0 all passed, 1 a check failed, 2 no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS=""
SIZES="2048,40000,400000,2000000"
ITERS=50
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --sizes) SIZES="$2"; shift 2 ;;
    --quick) SIZES="2048,40000"; ITERS=20; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
echo "== python: $($PY --version 2>&1) ($PY)"
export BTP_SHAPES="${BTP_SHAPES:-$(cd .. && pwd)/shared/data/shapes}"
export BTP_GPU_SIZES="$SIZES"
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check.sh: nvidia-smi not found: no NVIDIA driver on this machine" >&2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"

# 1. dependencies (only what does not import yet)
install() {  # module pip-spec
  if ! $PY -c "import $1" >/dev/null 2>&1; then
    echo "== installing $2"
    if [ -n "$WHEELS" ]; then
      $PY -m pip install -q --no-index --find-links "$WHEELS" "$2" || echo "   could not install $2 from $WHEELS"
    else
      $PY -m pip install -q "$2" || echo "   could not install $2"
    fi
  fi
}
$PY -c "import btp" >/dev/null 2>&1 || $PY -m pip install -q -e '.[test]'
install pycuda pycuda
install cuda.bindings cuda-python
install tensorrt tensorrt
$PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" \
  >/dev/null 2>&1 || echo "   (onnxruntime without CUDA EP: install onnxruntime-gpu for the ort-cuda/ort-trt backends)"

status=0
# 2. doctor
echo "== btp doctor --gpu"
$PY -m btp.cli doctor --gpu; rc=$?
if [ $rc -eq 2 ]; then echo "gpu_check.sh: no usable GPU (see above)" >&2; exit 2; fi
[ $rc -ne 0 ] && status=1

# 3. tests
echo "== kernel tests (compile, emulation, GPU) at N = $SIZES"
$PY -m pytest -q -rs tests/test_kernels_compile.py tests/test_kernels_emu.py tests/test_kernels_preprocess.py \
  tests/test_kernels_gpu.py tests/test_pipeline_device.py tests/test_tensorrt_logic.py || status=1

# 4. benchmark + report
echo "== benchmark"
$PY -m btp.benchmarks.gpu --out benchmarks/results --sizes "$SIZES" --iters "$ITERS" || status=1
exit $status
