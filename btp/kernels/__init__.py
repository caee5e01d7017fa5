"""GPU kernels of the BTP pipeline (FPS, kNN grouping, normalisation, score propagation) and
their launchers. Torch-free; pycuda is imported only by ``btp.kernels.cuda`` when used.

- ``*.cu``: the CUDA source (plain CUDA C++14, CUDA 11.4+).
- ``launch``: the kernels' signatures and launch geometry (one table).
- ``ops``: the pipeline over a ``Device`` (``enqueue_*`` on device buffers; numpy wrappers).
- ``preprocess.GpuPreprocessor``: raw scan -> engine inputs -> scores, one stream.
- ``cuda.CudaDevice``: pycuda device (fatbin cached by source hash, pinned staging, one stream).
- ``emu.EmuDevice``: the same kernel source on the CPU (btp/kernels/emu/cuda_emu.h), for tests.
- ``build``: nvcc / g++ builds, caches and the resource-report check.
See docs/gpu.md for what has been verified on which hardware.
"""
