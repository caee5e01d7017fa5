"""Geometry-only baselines that every eval table reports next to the model (torch-free).

Both work on the N normalized sampled points (the model's input, see `btp.eval.scoring`) and
give point scores [N] plus an object score = mean of the top 1 % point scores.

- `surface_variation_scores`: training-free, lambda_min / (lambda_1 + lambda_2 + lambda_3) of
  the covariance of each point's k nearest neighbours (high on creases, bumps, rims, breaks).
- `LearnedBaseline`: multi-scale local covariance features + a LightGBM point classifier
  trained on labelled (synthetic) samples: `fit_learned_baseline(samples)`, `save`, `load`.
  Saved in LightGBM's own text model format (never pickle); the feature names in that file
  pin the feature definition, so a file made with other scales is refused on load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from btp.errors import BTPError
from btp.geometry import knn, top_mean
from btp.geometry.features import LEARNED_SCALES, LEARNED_WIDE_K, _neighbourhood_eigen, feature_names, local_features

SURFACE_VARIATION_K = 16
OBJECT_TOP_RATIO = 0.01  # object score = mean of the top 1 % point scores


class BaselineError(BTPError, ValueError):
    """A baseline model file that cannot be used (missing, wrong feature set); names file and fix."""


def object_score_from_points(point_scores: np.ndarray, top_ratio: float = OBJECT_TOP_RATIO) -> float:
    """Mean of the top `top_ratio` share of point scores (at least one point)."""
    return top_mean(point_scores, top_ratio)


def surface_variation_scores(points: np.ndarray, k: int = SURFACE_VARIATION_K) -> np.ndarray:
    """Training-free point scores: lambda_min / sum(lambda) of the kNN covariance; float32 [N] in [0, 1/3]."""
    pts = np.ascontiguousarray(points, dtype=np.float32)
    k = min(k, pts.shape[0])
    idx, _ = knn(pts, pts, k)  # [N,k], includes the point itself
    evals, _, _ = _neighbourhood_eigen(pts, idx)
    return (evals[:, 0] / np.maximum(evals.sum(axis=1), 1e-20)).astype(np.float32)


def surface_variation_scorer(normed: np.ndarray) -> tuple[float, np.ndarray]:
    """`scoring.score_with` adapter: (object score, point scores [N])."""
    scores = surface_variation_scores(normed)
    return object_score_from_points(scores), scores


# ---- learned baseline ------------------------------------------------------------------

@dataclass
class LearnedBaseline:
    """A LightGBM point classifier over `local_features`; scores are P(anomalous point)."""

    booster: object  # lightgbm.Booster
    scales: tuple[int, ...] = LEARNED_SCALES
    wide_k: int = LEARNED_WIDE_K

    def point_scores(self, normed: np.ndarray) -> np.ndarray:
        feats = local_features(normed, self.scales, self.wide_k)
        return np.asarray(self.booster.predict(feats), dtype=np.float32)

    def __call__(self, normed: np.ndarray) -> tuple[float, np.ndarray]:
        """`scoring.score_with` adapter: (object score, point scores [N])."""
        scores = self.point_scores(normed)
        return object_score_from_points(scores), scores

    def save(self, path: str | Path) -> Path:
        """LightGBM text model format (feature names inside pin the feature definition)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LearnedBaseline":
        import lightgbm as lgb

        path = Path(path)
        if not path.is_file():
            raise BaselineError(f"{path}: learned-baseline model not found; make one with "
                                f"fit_learned_baseline(...).save(path) or `btp eval --fit-baseline DIR`")
        try:
            booster = lgb.Booster(model_file=str(path))
        except lgb.basic.LightGBMError as err:
            raise BaselineError(f"{path}: not a LightGBM text model ({err})") from None
        names = booster.feature_name()
        if names != feature_names():
            raise BaselineError(f"{path}: made with other features ({len(names)}: {names[:3]}...) than this "
                                f"version computes ({len(feature_names())}); refit it with fit_learned_baseline")
        return cls(booster)


def fit_learned_baseline(samples: Iterable, *, num_points: int | None = None, seed: int = 0,
                         num_rounds: int = 200, max_negatives_per_sample: int | None = 512,
                         params: dict | None = None) -> LearnedBaseline:
    """Train the learned baseline on labelled samples: objects with `points` [M,3] and `labels` [M]
    (`btp.io.Sample`, `btp.train.synth.SynthSample`) or `(points, labels)` pairs.

    Each sample goes through the same preprocessing as evaluation (downsample to `num_points`,
    default the btp-mini N, then normalize); normal points are subsampled to
    `max_negatives_per_sample` per sample (all anomalous points kept), classes are balanced by
    `scale_pos_weight`. Deterministic for a given seed.
    """
    import lightgbm as lgb

    from btp.config import btp_mini_config
    from btp.geometry.prepare import prepare

    cfg = btp_mini_config()
    if num_points is not None:
        cfg.preprocess.num_points = int(num_points)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for sample in samples:
        points, labels = (sample.points, sample.labels) if hasattr(sample, "points") else sample
        labels = np.asarray(labels).reshape(-1)
        prepared = prepare(points, cfg, "exact", group=False)
        feats = local_features(prepared.points)
        y = labels[prepared.sample_idx]
        if max_negatives_per_sample is not None:
            neg = np.flatnonzero(y == 0)
            if neg.size > max_negatives_per_sample:
                drop = np.setdiff1d(neg, rng.choice(neg, max_negatives_per_sample, replace=False))
                keep = np.ones(y.size, bool)
                keep[drop] = False
                feats, y = feats[keep], y[keep]
        xs.append(feats)
        ys.append(y)
    if not xs:
        raise BaselineError("fit_learned_baseline: no samples given")
    x, y = np.concatenate(xs), np.concatenate(ys)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        raise BaselineError(f"fit_learned_baseline: needs normal and anomalous points, got {n_pos} anomalous "
                            f"of {y.size}; train it on anomalous (synthetic) test samples")
    config = {"objective": "binary", "learning_rate": 0.05, "num_leaves": 31, "min_data_in_leaf": 20,
              "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
              "scale_pos_weight": (y.size - n_pos) / n_pos, "seed": seed, "deterministic": True,
              "force_row_wise": True, "num_threads": 2, "verbosity": -1}
    config.update(params or {})
    data = lgb.Dataset(x, label=y, feature_name=feature_names(), free_raw_data=True)
    booster = lgb.train(config, data, num_boost_round=num_rounds)
    return LearnedBaseline(booster)
