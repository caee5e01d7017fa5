"""Score one raw scan: preprocessing shared by every scorer, the torch-model path, the ONNX path.

raw scan [M,3] -> `downsample` to N (config) -> `normalize` -> scorer on the N points ->
point scores [N] -> `interpolate_to_raw` -> point scores [M] in the raw scan's row order.

`score_cloud_torch(model, raw_points)` is the one place that runs a PyTorch `BTPModel` on a
cloud the way the runtime does (same geometry ops), for `btp eval --model CKPT` and for
validation during training. Torch is imported only there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from btp.config import BTPConfig, PreprocessConfig
from btp.geometry import group, interpolate_to_raw, propagate_patch_scores
from btp.geometry.prepare import sample_points


@dataclass(frozen=True)
class Prepared:
    """A raw scan reduced to the model's N points.

    sampled_idx int64 [N] into the raw scan; normed float32 [N,3] (centroid 0, max radius 1);
    centre float32 [3] and scale so that raw[sampled_idx] = normed * scale + centre.
    """

    sampled_idx: np.ndarray
    normed: np.ndarray
    centre: np.ndarray
    scale: float


@dataclass(frozen=True)
class CloudScores:
    """Scores of one scan: object_score, point_scores float32 [M] (raw order), sampled_idx [N],
    sampled_scores float32 [N] (scores of raw[sampled_idx])."""

    object_score: float
    point_scores: np.ndarray
    sampled_idx: np.ndarray
    sampled_scores: np.ndarray


def prepare(raw_points: np.ndarray, pre: PreprocessConfig, method: str = "auto") -> Prepared:
    """The runtime's rule (btp.geometry.prepare.sample_points): N points (all when the scan has
    fewer), normalised before or after sampling as ``pre.normalize`` says."""
    s = sample_points(raw_points, pre, method)
    return Prepared(s.sample_idx, s.points, s.centre, s.scale)


def to_raw(raw_points: np.ndarray, prepared: Prepared, sampled_scores: np.ndarray, object_score: float,
           interpolation: str = "nearest") -> CloudScores:
    """Carry scores of the sampled points back to every raw point."""
    raw = np.asarray(raw_points, dtype=np.float32)
    point_scores = interpolate_to_raw(raw[prepared.sampled_idx], sampled_scores, raw, method=interpolation)
    return CloudScores(float(object_score), point_scores, prepared.sampled_idx,
                       np.asarray(sampled_scores, dtype=np.float32))


def score_with(scorer: Callable[[np.ndarray], tuple[float, np.ndarray]], raw_points: np.ndarray,
               pre: PreprocessConfig, interpolation: str = "nearest") -> CloudScores:
    """Generic path: `scorer(normed [N,3]) -> (object_score, point_scores [N])` (the baselines)."""
    prepared = prepare(raw_points, pre)
    object_score, sampled_scores = scorer(prepared.normed)
    return to_raw(raw_points, prepared, sampled_scores, object_score, interpolation)


def score_cloud_torch(model, raw_points: np.ndarray, cfg: BTPConfig | None = None, device: str = "cpu",
                      interpolation: str | None = None) -> CloudScores:
    """Run a PyTorch `BTPModel` on one raw scan [M,3] (eval mode, no grad).

    Patch probabilities -> points (`propagate_patch_scores`, mean over containing patches) ->
    raw scan; object score = the model's `object_score`.
    """
    import torch

    cfg = cfg or model.cfg
    enc, pre = cfg.encoder, cfg.preprocess
    prepared = prepare(raw_points, pre)
    groups = group(prepared.normed, enc.num_group, enc.group_size, start_idx=pre.fps_start,
                   rgb_fill=pre.rgb_fill, in_channels=enc.in_channels)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(groups.neighborhood[None]).to(device),
                        torch.from_numpy(groups.center[None]).to(device))
    finally:
        model.train(was_training)
    patch_probs = out["patch_probs"][0].float().cpu().numpy()  # [G]
    sampled = propagate_patch_scores(patch_probs, groups.patch_idx, groups.center, prepared.normed,
                                     cfg.scoring.uncovered_points)
    return to_raw(raw_points, prepared, sampled, float(out["object_score"][0]),
                  interpolation or cfg.scoring.raw_interpolation)


class TorchScorer:
    """`btp eval --model model.safetensors`: a checkpoint scored with `score_cloud_torch`."""

    def __init__(self, path: str | Path):
        from btp.model.checkpoint import load_checkpoint

        self.path = Path(path)
        self.model, self.provenance = load_checkpoint(self.path)
        self.model.eval()
        self.cfg: BTPConfig = self.model.cfg
        self.name = self.cfg.name

    def __call__(self, raw_points: np.ndarray) -> CloudScores:
        return score_cloud_torch(self.model, raw_points, self.cfg)

    def info(self) -> dict:
        return {"path": str(self.path), "kind": "checkpoint", "name": self.cfg.name, "config": self.cfg.to_dict(),
                "provenance": self.provenance}


class OnnxScorer:
    """`btp eval --model model.onnx`: the edge runtime (`btp.runtime.Pipeline`), config from its metadata."""

    def __init__(self, path: str | Path, backend: str = "ort-cpu"):
        from btp.runtime import Pipeline

        self.path = Path(path)
        self.backend = backend
        self.pipeline = Pipeline(self.path, backend=backend)
        self.cfg: BTPConfig = self.pipeline.cfg
        self.name = self.pipeline.meta.name

    def __call__(self, raw_points: np.ndarray) -> CloudScores:
        result = self.pipeline(np.ascontiguousarray(raw_points, dtype=np.float32))
        point_scores = np.asarray(result.point_scores, dtype=np.float32)  # [M] raw order
        idx = np.asarray(result.sampled_idx, dtype=np.int64)  # [N]
        sampled = (np.asarray(result.sampled_scores, dtype=np.float32) if result.sampled_scores is not None
                   else point_scores[idx])
        return CloudScores(float(result.object_score), point_scores, idx, sampled)

    def info(self) -> dict:
        meta = self.pipeline.meta
        return {"path": str(self.path), "kind": "onnx", "backend": self.backend, "name": self.name,
                "config": self.cfg.to_dict(), "provenance": meta.provenance, "export": meta.export}
