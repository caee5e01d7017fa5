"""The GPU report writer of btp.benchmarks.gpu (pure parts; the timing needs a GPU) and the
PyTorch FPS reference it times against (run on the CPU here: same rule as btp.geometry)."""
from __future__ import annotations

import json

import numpy as np

from btp.benchmarks import gpu as gpubench


def test_summarize_median_p90():
    stats = gpubench.summarize([5.0, 1.0, 2.0, 3.0, 4.0, 100.0, 2.5, 2.0, 3.0, 1.5, 2.0])
    assert stats == {"median_ms": 2.5, "p90_ms": 5.0, "min_ms": 1.0, "iters": 11}


def test_report_files_named_by_device_and_date(tmp_path):
    result = {
        "environment": {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-25 07:00 UTC", "compute_capability": "9.0"},
        "kernels": [{"op": "FPS 2048 -> 512", "impl": "btp CUDA kernel", "n": 2048, "median_ms": 1.25,
                     "p90_ms": 1.5, "min_ms": 1.0, "iters": 50, "equal_to_cpu": True}],
        "torch": [{"op": "FPS 2048 -> 512", "impl": "torch loop", "n": 2048, "median_ms": 30.0,
                   "p90_ms": 31.0, "min_ms": 29.0, "iters": 50, "equal_to_cpu": None}],
        "torch_cuda_model": None, "tensorrt": None, "errors": ["tensorrt: NotAvailableError: no tensorrt"],
    }
    md, js = gpubench.write_report(result, tmp_path)
    assert md.name == "gpu-nvidia-h100-80gb-hbm3-2026-11-25.md" and js.suffix == ".json"
    text = md.read_text()
    assert "| FPS 2048 -> 512 | btp CUDA kernel | 1.250 | 1.500 | 50 | yes |" in text
    assert "torch loop" in text and "no tensorrt" in text
    assert json.loads(js.read_text())["kernels"][0]["equal_to_cpu"] is True


def test_torch_fps_reference_follows_the_rule(bunny_mesh):
    import torch

    from btp.geometry import fps_reference
    from btp.io import load_mesh, sample_surface

    vertices, faces = load_mesh(bunny_mesh)
    points, _ = sample_surface(vertices, faces, 1000, seed=4)
    got = gpubench.torch_fps(torch.from_numpy(points.astype(np.float32)), 64, 5)
    np.testing.assert_array_equal(got.numpy(), fps_reference(points, 64, 5))
    knn = gpubench.torch_knn(torch.from_numpy(points.astype(np.float32)), torch.from_numpy(points[:10].astype(np.float32)), 8)
    assert knn.shape == (10, 8) and (knn[:, 0].numpy() == np.arange(10)).all()
