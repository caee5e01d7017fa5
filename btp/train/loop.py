"""Stage 2: the BTP stage - joint representation learning on synthetic defects (spec "Training").

Frozen: the point encoder (weights from stage 1, BN in eval) and the text encoder. Trained:
GFCM, MGFEM and the prompt context. Loss: ``btp.model.btp_loss`` (focal + dice + 0.5 global
BCE + 0.1 geometric InfoNCE against cached patch FPFH). AdamW / warm-up + cosine per
iteration / grad clip: ``btp.train.schedule``. Checkpoints (``train_state.safetensors``) every
``ckpt_every`` steps; ``resume=True`` continues from the last one at the same step, with the
same data order (the order is a pure function of seed and epoch). torchrun: WORLD_SIZE > 1 ->
process group + DDP + DistributedSampler (each rank sees its shard).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from btp.config import BTPConfig
from btp.errors import BTPError
from btp.train.ddp import DistEnv, dist_env, init_distributed, mean_across, shutdown, unwrap, wrap_model


class TrainingDivergedError(BTPError, FloatingPointError):
    """The training loss became NaN or infinite; says at which step, on which samples, and where
    the last good checkpoint is."""


@dataclass(kw_only=True)
class BTPOptions:
    """How one BTP-stage run goes, beside the model's own training settings: epochs, batch size,
    learning rates and the seed are ``cfg.train`` (btp/config.py), read from the config only."""

    ckpt_every: int = 100
    # ablation switches (all on = the spec's model)
    use_gfcm: bool = True  # False: GFCM descriptor replaced by zeros, no geometric loss
    learn_prompt: bool = True  # False: prompt context stays at its random init
    max_steps: int | None = None  # cap on iterations (tests, quick runs)
    # The encoder is frozen and the samples are fixed, so its outputs are computed once per
    # dataset (float16, in memory) instead of every step: same maths, ~3x faster on CPU.
    cache_features: bool = True
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def _cached_encoder_cls():
    import torch
    from torch import nn

    from btp.model.pointbert import PointFeatures

    class CachedPointEncoder(nn.Module):
        """Stands in for the frozen PointBERT during the BTP stage: returns the features computed
        once by ``precompute`` for the samples named by ``select(idx)``. ``patch_tokens`` is None
        (BTPModel's heads do not read it; a future reader fails loudly instead of silently)."""

        def __init__(self, layers: list, cls: torch.Tensor, global_embed: torch.Tensor):
            super().__init__()
            self.layers, self.cls, self.global_embed = layers, cls, global_embed  # float16 [S, ...]
            self._idx = None

        def select(self, idx) -> None:
            self._idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)

        def forward(self, neighborhood, center):
            idx = self._idx
            if idx is None or idx.numel() != neighborhood.shape[0]:
                raise RuntimeError("CachedPointEncoder: select(batch indices) before every forward")
            return PointFeatures(cls=self.cls[idx].float(), patch_tokens=None,
                                 layer_features=[f[idx].float() for f in self.layers],
                                 global_embed=self.global_embed[idx].float())

    return CachedPointEncoder


def _features_key(encoder, arrays) -> str:
    import hashlib

    h = hashlib.sha256(repr(tuple(encoder.feature_layers)).encode())  # which blocks' features are stored
    for key, value in sorted(encoder.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().float().numpy().tobytes())
    for key in ("points", "patch_idx", "center"):
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()[:16]


def cached_features(encoder, dataset, arrays, cache_dir=None, log=print):
    """``precompute_features``, kept on disk under ``cache_dir`` keyed by encoder weights + samples."""
    if cache_dir is None:
        return precompute_features(encoder, dataset, log=log)
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir) / f"feats-{_features_key(encoder, arrays)}.safetensors"
    if path.is_file():
        t = load_file(str(path))
        n_layers = sum(1 for k in t if k.startswith("layer"))
        log(f"btp: encoder features from {path}")
        return _cached_encoder_cls()([t[f"layer{i}"] for i in range(n_layers)], t["cls"], t["global_embed"])
    cached = precompute_features(encoder, dataset, log=log)
    tensors = {f"layer{i}": f.contiguous() for i, f in enumerate(cached.layers)}
    tensors.update(cls=cached.cls.contiguous(), global_embed=cached.global_embed.contiguous())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return cached


def precompute_features(encoder, dataset, batch_size: int = 8, log=print):
    """Run the frozen encoder once over every sample -> CachedPointEncoder (float16 features)."""
    import torch

    was = encoder.training
    encoder.eval()
    layers, cls, glob = None, [], []
    t0 = time.time()
    with torch.no_grad():
        for b0 in range(0, len(dataset), batch_size):
            batch = _collate([dataset[i] for i in range(b0, min(len(dataset), b0 + batch_size))])
            feats = encoder(batch["neighborhood"], batch["center"])
            if layers is None:
                layers = [[] for _ in feats.layer_features]
            for store, f in zip(layers, feats.layer_features):
                store.append(f.half())
            cls.append(feats.cls.half())
            glob.append(feats.global_embed.half())
    encoder.train(was)
    log(f"btp: encoder features of {len(dataset)} samples cached in {time.time() - t0:.0f} s")
    return _cached_encoder_cls()([torch.cat(x) for x in layers], torch.cat(cls), torch.cat(glob))


def _collate(items: list[dict]) -> dict:
    import torch

    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


def sample_scores(model, dataset, cached=None, batch_size: int = 16, objects: bool = True) -> dict[str, np.ndarray]:
    """The trained model on BTP samples, scored as the runtime scores them on the N sampled points:
    each point's mean probability over the patches that contain it (its own per-point ones with
    ``gfcm.point_dim``), points in no patch by ``scoring.uncovered_points``; object scores by ``btp.geometry.scores.object_score``.
    The point scores are the model's own map: the self-similarity point term
    (``scoring.selfsim_point_weight``, ``btp.geometry.scores.point_map``) is left out, so the point
    threshold is calibrated on what the model learnt; the term leaves it in place at a typical good point.
    -> {point_scores [S, N], point_labels [S, N], object_scores [S], object_labels [S]}.
    ``cached``: the CachedPointEncoder standing in for the encoder (rows = ``dataset``'s).
    ``objects=False``: no object scores (NaN; their self-similarity term costs ~0.2 s a sample)."""
    import torch

    from btp.geometry.scores import object_score
    from btp.model.scoring import point_logits_from_patches

    was = model.training
    model.eval()
    points, labels, object_scores, object_labels = [], [], [], []
    with torch.no_grad():
        for b0 in range(0, len(dataset), batch_size):
            idx = list(range(b0, min(len(dataset), b0 + batch_size)))
            batch = _collate([dataset[i] for i in idx])
            if cached is not None:
                cached.select(idx)
            out = model(batch["neighborhood"], batch["center"])
            point = point_logits_from_patches(out["patch_probs"], batch["patch_idx"], batch["point_labels"].shape[1],
                                              points=batch["points"], center=batch["center"],
                                              point_values=out.get("patch_point_probs"),
                                              uncovered=model.cfg.scoring.uncovered_points)
            points.append(point.numpy())
            labels.append(batch["point_labels"].numpy())
            obj = ([object_score(model.cfg.scoring, o, g, p, points=x) for o, g, p, x in
                    zip(out["object_score"].numpy(), out["global_prob"].numpy(), points[-1], batch["points"].numpy())]
                   if objects else [np.nan] * len(idx))
            object_scores.append(np.array(obj))
            object_labels.append(batch["object_label"].numpy())
    model.train(was)
    return {"point_scores": np.concatenate(points), "point_labels": np.concatenate(labels),
            "object_scores": np.concatenate(object_scores), "object_labels": np.concatenate(object_labels)}


def calibrate_point_threshold(model, dataset, cached=None, batch_size: int = 16) -> tuple[float, float]:
    """Point-F1-max threshold of the trained model on ``dataset`` (its own training samples), on
    the scores of ``sample_scores``. Returns (threshold, F1 at it); sets
    ``model.cfg.scoring.point_threshold``."""
    from btp.metrics import f1_max_threshold

    got = sample_scores(model, dataset, cached, batch_size, objects=False)
    f1, threshold = f1_max_threshold(got["point_labels"].ravel(), got["point_scores"].ravel())
    if np.isfinite(threshold):
        model.cfg.scoring.point_threshold = float(min(max(threshold, 1e-6), 1 - 1e-6))
    return model.cfg.scoring.point_threshold, f1


def build_model(cfg: BTPConfig, encoder_path=None, opts: BTPOptions | None = None, text_encoder=None,
                init_from=None):
    """BTPModel with the config's text encoder, the stage-1 encoder loaded and frozen.

    ``init_from``: a btp checkpoint (e.g. from ``btp convert ulip2`` / ``btp convert btp-3dad``) to
    start from instead - its encoder (frozen), heads, prompt context and text side; its config
    but ``cfg.train``, the training this run gives it. With an OpenCLIP tower in the file the
    prompt context learns through it; a checkpoint whose text is frozen and that holds no tower
    trains GFCM and MGFEM against its frozen text embeddings."""
    from btp.model import BTPModel
    from btp.model.text import build_text_encoder
    from btp.train.pretrain import load_encoder_weights

    opts = opts or BTPOptions()
    if init_from is not None:
        from btp.model.checkpoint import load_checkpoint

        model, _ = load_checkpoint(init_from)
        model.cfg.train = replace(cfg.train)
        if model.text_encoder is not None and model.is_text_frozen:
            model.unfreeze_text()
        if model.text_encoder is None:
            opts = replace(opts, learn_prompt=False)
    else:
        model = BTPModel(cfg, text_encoder if text_encoder is not None else build_text_encoder(cfg.text))
    if encoder_path is not None:
        load_encoder_weights(model.point_encoder, encoder_path)
    model.set_point_encoder_frozen(True)
    if not opts.use_gfcm:  # ablation: descriptor == 0 (last layer zeroed + frozen; state dict unchanged)
        import torch

        with torch.no_grad():
            model.gfcm.head[-1].weight.zero_()
            model.gfcm.head[-1].bias.zero_()
        for p in model.gfcm.parameters():
            p.requires_grad_(False)
    model.prompt_ctx.requires_grad_(opts.learn_prompt)
    return model


def trainable(model) -> list:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_btp(cfg: BTPConfig, arrays: dict[str, np.ndarray], out_dir, opts: BTPOptions, *, encoder_path=None,
              resume: bool = False, progress: bool = True, log=print, text_encoder=None,
              provenance: dict | None = None, feature_cache=None, init_from=None) -> dict:
    """Run the BTP stage on cached samples; returns a summary (losses, steps, wall time, paths).
    Epochs, batch size, learning rates and seed: ``cfg.train``. ``init_from``: start from a btp
    checkpoint (``build_model``); ``cfg`` is then its config, whose ``train`` this run follows."""
    import torch
    from torch.utils.data import DistributedSampler

    from btp.train.checkpointing import load_training_state
    from btp.train.data import BTPArrays
    from btp.train.progress import Progress
    from btp.train.schedule import make_optimizer

    env: DistEnv = dist_env()
    init_distributed(env)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / "train_state.safetensors"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, encoder_path, opts, text_encoder, init_from=init_from)
    cfg = model.cfg
    run = cfg.train
    named = trainable(model)
    optimizer = make_optimizer(named, run)
    dataset = BTPArrays(arrays, cfg)
    sampler = DistributedSampler(range(len(dataset)), num_replicas=env.world_size, rank=env.rank, shuffle=True,
                                 seed=run.seed, drop_last=True)
    steps_per_epoch = max(1, len(sampler) // run.batch_size)
    total = steps_per_epoch * run.epochs
    if opts.max_steps:
        total = min(total, opts.max_steps)
    state = _TrainingState(state_path, model, optimizer, total, opts)
    start = 0
    if resume and state_path.is_file():
        start = load_training_state(state_path, state.modules, optimizer, extra_params=state.extra)
        log(f"btp: resumed from {state_path} at step {start}/{total}")
    real_encoder = model.point_encoder
    cached = None
    if opts.cache_features:
        cached = cached_features(real_encoder, dataset, arrays, feature_cache,
                                 log=log if env.is_main else (lambda *_: None))
        model.point_encoder = cached
    ddp_model = wrap_model(model, env)
    model.train()
    history: list[tuple[int, float]] = []
    t0 = time.time()
    with Progress("btp", total=total, start=start, enabled=env.is_main, bar=progress) as bar:
        for step in range(start, total):
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            batch_idx = list(sampler)[offset * run.batch_size:(offset + 1) * run.batch_size]
            batch = _collate([dataset[i] for i in batch_idx])
            if cached is not None:
                cached.select(batch_idx)
            loss, parts = _optimise(ddp_model, model, batch, optimizer, named, step, total, cfg, opts,
                                    where=f"step {step + 1} (samples {batch_idx})", state_path=state_path)
            value = mean_across(env, loss)
            history.append((step + 1, value))
            bar.update(step + 1, loss=value, **parts)
            if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < total and env.is_main:
                state.save(step + 1)
    wall = time.time() - t0
    model = unwrap(ddp_model)
    summary = {"steps": total, "resumed_from": start, "wall_s": round(wall, 1), "losses": history,
               "steps_per_epoch": steps_per_epoch, "samples": len(dataset)}
    if env.is_main:  # model.point_encoder is still the cached one here: calibration is cheap
        threshold, f1 = calibrate_point_threshold(model, dataset, cached)
        summary.update(point_threshold=threshold, point_f1_at_threshold=f1)
        log(f"btp: point threshold {threshold:.4f} (point-F1-max {f1:.3f} on the {len(dataset)} training samples)")
    model.point_encoder = real_encoder  # the checkpoint holds the real (frozen) encoder
    if env.is_main:
        state.save(total)
        summary["checkpoint"] = _save_model(model, out_dir, opts, summary, provenance)
        (out_dir / "btp_history.json").write_text(json.dumps(summary, indent=1))
    shutdown(env)
    return summary


class _TrainingState:
    """What ``train_state.safetensors`` holds to resume: the trained modules (the frozen encoder
    is not among them), the prompt context and the optimiser, at a step."""

    def __init__(self, path: Path, model, optimizer, total: int, opts: BTPOptions):
        self.path, self.optimizer, self.total, self.opts = path, optimizer, total, opts
        self.modules = {"gfcm": model.gfcm, "mgfem": model.mgfem}
        if model.point_refine is not None:
            self.modules["point_refine"] = model.point_refine
        self.extra = {"prompt_ctx": model.prompt_ctx}

    def save(self, step: int) -> None:
        from btp.train.checkpointing import save_training_state

        save_training_state(self.path, self.modules, self.optimizer, step, extra_params=self.extra,
                            meta={"total": self.total, "options": asdict(self.opts)})


def _optimise(ddp_model, model, batch: dict, optimizer, named, step: int, total: int, cfg: BTPConfig,
              opts: BTPOptions, *, where: str, state_path: Path) -> tuple[float, dict[str, float]]:
    """One optimiser step on one batch: learning rate of ``step``, loss, backward, clipped update.
    -> (loss, its parts). A loss that is not finite raises before any weight changes."""
    import torch

    from btp.model import btp_loss
    from btp.train.schedule import set_lr

    set_lr(optimizer, step, total, cfg.train)
    outputs = ddp_model(batch["neighborhood"], batch["center"])
    loss, parts = btp_loss(outputs, batch, cfg.loss, gfcm=cfg.gfcm, object_alpha=cfg.scoring.object_alpha,
                           point_top_k=model.point_top_k)
    if not opts.use_gfcm:
        loss = loss - cfg.loss.geometric_weight * parts["geometric"]
    if not torch.isfinite(loss):
        terms = ", ".join(f"{k} {float(v):.4g}" for k, v in parts.items())
        raise TrainingDivergedError(
            f"btp: the loss is not finite at {where} ({terms}); the weights were not updated from it. "
            f"The last checkpoint is {state_path if state_path.is_file() else 'none yet'}: fix the cause "
            f"(inputs, learning rate), then --resume")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.train.grad_clip)
    optimizer.step()
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


def _save_model(model, out_dir: Path, opts: BTPOptions, summary: dict, provenance: dict | None) -> str:
    """The trained model, text frozen, as ``out_dir/<cfg.name>.safetensors`` with its provenance."""
    from btp.model import save_checkpoint

    model.eval()
    model.freeze_text(drop_encoder=True)
    history = summary["losses"]
    prov = dict(provenance or {})
    prov.update({"stage": "btp", "btp_options": asdict(opts), "btp_steps": summary["steps"],
                 "btp_wall_s": summary["wall_s"],
                 "final_loss_mean_last50": float(np.mean([v for _, v in history[-50:]])) if history else None,
                 "point_threshold": {k: summary[k] for k in ("point_threshold", "point_f1_at_threshold")}})
    return str(save_checkpoint(out_dir / f"{model.cfg.name}.safetensors", model, prov))
