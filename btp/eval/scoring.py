"""Score one raw scan: the CPU chain of every scorer, the torch-model path, the ONNX path.

raw scan [M,3] -> ``btp.geometry.prepare.prepare`` (downsample to N, normalize, group) -> scorer
-> scores [N] -> ``score_maps`` / ``interpolate`` -> point scores [M] in the raw scan's row order.

`score_cloud_torch(model, raw_points)` is the one place that runs a PyTorch `BTPModel` on a
cloud the way the runtime does (same chain), for `btp eval --model CKPT` and for validation
during training. Torch is imported only there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from btp.config import BTPConfig
from btp.geometry.prepare import interpolate, prepare, score_maps
from btp.geometry.scores import object_score


@dataclass(frozen=True, kw_only=True)
class CloudScores:
    """Scores of one scan: object_score, point_scores float32 [M] (raw order), sampled_idx [N],
    sampled_scores float32 [N] (scores of raw[sampled_idx])."""

    object_score: float
    point_scores: np.ndarray
    sampled_idx: np.ndarray
    sampled_scores: np.ndarray


def score_with(scorer: Callable[[np.ndarray], tuple[float, np.ndarray]], raw_points: np.ndarray,
               cfg: BTPConfig, method: str = "exact") -> CloudScores:
    """Generic path: `scorer(normed [N,3]) -> (object_score, point_scores [N])` (the baselines);
    ``method``: the downsampling rule (the interpolation back is the exact rule)."""
    prepared = prepare(raw_points, cfg, method, group=False)
    object_score, sampled_scores = scorer(prepared.points)
    sampled_scores = np.asarray(sampled_scores, dtype=np.float32)
    return CloudScores(object_score=float(object_score),
                       point_scores=interpolate(sampled_scores, prepared, cfg, exact=True),
                       sampled_idx=prepared.sample_idx, sampled_scores=sampled_scores)


def score_cloud_torch(model, raw_points: np.ndarray, cfg: BTPConfig | None = None, device: str = "cpu",
                      method: str = "auto") -> CloudScores:
    """Run a PyTorch `BTPModel` on one raw scan [M,3] (eval mode, no grad).

    Patch probabilities -> points (mean over containing patches) -> the map shown -> raw scan
    (``btp.geometry.prepare.score_maps``); object score as the runtime's
    (``btp.geometry.scores.object_score``). ``method``: the downsampling rule
    (``btp.geometry.prepare``); the raw-scan interpolation is the exact rule unless that resolves
    to "voxel" (then its gather).
    """
    import torch

    cfg = cfg or model.cfg
    prepared = prepare(raw_points, cfg, method)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(prepared.neighborhood[None]).to(device),
                        torch.from_numpy(prepared.center[None]).to(device))
    finally:
        model.train(was_training)
    patch_probs = out["patch_probs"][0].float().cpu().numpy()  # [G]
    point_probs = out["patch_point_probs"][0].float().cpu().numpy() if "patch_point_probs" in out else None
    maps = score_maps(patch_probs, prepared, cfg, exact=prepared.voxel_map is None, point_probs=point_probs)
    obj = object_score(cfg.scoring, float(out["object_score"][0]), float(out["global_prob"][0]), maps.model,
                       selfsim=maps.selfsim)
    return CloudScores(object_score=obj, point_scores=maps.raw, sampled_idx=prepared.sample_idx,
                       sampled_scores=maps.sampled)


class TorchScorer:
    """`btp eval --model model.safetensors`: a checkpoint scored with `score_cloud_torch`."""

    def __init__(self, path: str | Path, downsample: str = "auto"):
        from btp.model.checkpoint import load_checkpoint

        self.path = Path(path)
        self.downsample = downsample
        self.model, self.provenance = load_checkpoint(self.path)
        self.model.eval()
        self.cfg: BTPConfig = self.model.cfg
        self.name = self.cfg.name

    def __call__(self, raw_points: np.ndarray) -> CloudScores:
        return score_cloud_torch(self.model, raw_points, self.cfg, method=self.downsample)

    def info(self) -> dict:
        return {"path": str(self.path), "kind": "checkpoint", "name": self.cfg.name, "config": self.cfg.to_dict(),
                "downsample": self.downsample, "provenance": self.provenance}


class OnnxScorer:
    """`btp eval --model model.onnx`: the edge runtime (`btp.runtime.Pipeline`), config from its metadata."""

    def __init__(self, path: str | Path, backend: str = "ort-cpu", downsample: str = "auto"):
        from btp.runtime import Pipeline

        self.path = Path(path)
        self.backend = backend
        self.pipeline = Pipeline(self.path, backend=backend, downsample=downsample)
        self.cfg: BTPConfig = self.pipeline.cfg
        self.name = self.pipeline.meta.name

    def __call__(self, raw_points: np.ndarray) -> CloudScores:
        result = self.pipeline(np.ascontiguousarray(raw_points, dtype=np.float32))
        point_scores = np.asarray(result.point_scores, dtype=np.float32)  # [M] raw order
        idx = np.asarray(result.sampled_idx, dtype=np.int64)  # [N]
        sampled = (np.asarray(result.sampled_scores, dtype=np.float32) if result.sampled_scores is not None
                   else point_scores[idx])
        return CloudScores(object_score=float(result.object_score), point_scores=point_scores, sampled_idx=idx,
                           sampled_scores=sampled)

    @property
    def embed(self):
        """The model's patch embeddings of a scan (``btp.runtime.Pipeline.embed``), None for a model
        file without them."""
        return self.pipeline.embed if self.pipeline.has_embeddings else None

    def info(self) -> dict:
        meta = self.pipeline.meta
        return {"path": str(self.path), "kind": "onnx", "backend": self.backend, "name": self.name,
                "downsample": self.pipeline.downsample,
                "config": self.cfg.to_dict(), "provenance": meta.provenance, "export": meta.export}
