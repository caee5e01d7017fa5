"""Learning-rate schedule and optimiser of the BTP stage (spec: "Training").

AdamW (0.9, 0.999); two learning rates (prompt context vs everything else); weight decay only on
weights (tensors with >= 2 dims), never on biases, norms or the prompt context; per *iteration*:
linear warm-up over the first ``warmup_frac`` of the iterations from ``warmup_start`` x the base
rate up to the base rate, then a half cosine down to ``min_lr`` at the last iteration.
"""
from __future__ import annotations

import math

from btp.config import TrainConfig


def warmup_steps(total_steps: int, warmup_frac: float) -> int:
    return max(1, int(round(warmup_frac * total_steps))) if total_steps > 1 else 0


def lr_at(step: int, total_steps: int, base_lr: float, cfg: TrainConfig) -> float:
    """Learning rate for iteration ``step`` (0-based) of ``total_steps``.

    step 0 -> ``warmup_start * base_lr``; step ``warmup_steps`` -> ``base_lr`` (the peak);
    step ``total_steps - 1`` -> ``min_lr``.
    """
    if total_steps <= 1:
        return base_lr
    step = min(max(step, 0), total_steps - 1)
    warm = warmup_steps(total_steps, cfg.warmup_frac)
    if step < warm:
        return base_lr * (cfg.warmup_start + (1.0 - cfg.warmup_start) * step / warm)
    span = max(1, total_steps - 1 - warm)
    progress = (step - warm) / span
    return cfg.min_lr + 0.5 * (base_lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def param_groups(named_params, cfg: TrainConfig, prompt_names=("prompt", "ctx")):
    """Split trainable parameters into AdamW groups.

    ``prompt``: names containing any of ``prompt_names`` (the learnable context) -> ``lr_prompt``,
    no decay. Others: tensors with ndim >= 2 -> ``lr`` + ``weight_decay``; ndim < 2 (biases,
    norm scales, layer weights of MGFEM's softmax) -> ``lr``, no decay. Each group carries its
    ``base_lr`` so ``set_lr`` can follow the schedule.
    """
    prompt, decay, no_decay = [], [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if any(key in name for key in prompt_names):
            prompt.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": 0.0, "name": "no_decay"},
        {"params": prompt, "lr": cfg.lr_prompt, "base_lr": cfg.lr_prompt, "weight_decay": 0.0, "name": "prompt"},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(named_params, cfg: TrainConfig, prompt_names=("prompt", "ctx")):
    import torch

    return torch.optim.AdamW(param_groups(named_params, cfg, prompt_names), betas=(0.9, 0.999))


def set_lr(optimizer, step: int, total_steps: int, cfg: TrainConfig) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total_steps, group["base_lr"], cfg)
