"""Official ULIP-2 PointBERT (+ OpenCLIP text tower) checkpoints -> a btp checkpoint.

ULIP's training script saves `{'epoch', 'state_dict', 'optimizer', 'scaler', 'best_acc1', 'args'}`
with the DistributedDataParallel prefix `module.` on every key of `state_dict`:
    module.point_encoder.<PointBERT key>   -> point_encoder.<same key>   (226 tensors for ULIP-2)
    module.pc_projection [768, D]          -> point_encoder.pc_projection
    module.open_clip_model.<OpenCLIP key>  -> text_encoder.<key> (text tower only; used when no
                                              separate --clip-ckpt is given)
    module.logit_scale, ...visual.*        -> ignored (listed in the provenance)
An `open_clip_pytorch_model.bin` holds the OpenCLIP keys at top level (`token_embedding.weight`,
`positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`, `text_projection`, `visual.*`).

Dimensions come from tensor shapes (attention heads = width / 64 unless given, as in both
originals); G, K, feature layers, scoring and everything not stored in weights come from the
base config. GFCM, MGFEM and the prompt context are BTP's own heads: freshly initialised (seeded).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from btp.config import BTPConfig, EncoderConfig, preset
from btp.errors import BTPError
from btp.model.text import (OPENCLIP_TEXT_PREFIXES, OpenCLIPTextEncoder, TextEncoderError, infer_openclip_dims,
                            load_openclip_state, openclip_text_state)

POINT_PREFIX = "module.point_encoder."
PROJECTION_KEY = "module.pc_projection"
CLIP_IN_ULIP_PREFIX = "module.open_clip_model."


class ConversionError(BTPError, ValueError):
    """The source checkpoint does not fit: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, source: str | Path, missing=(), unexpected=(), mis_shaped=(), reason: str = ""):
        self.source = Path(source)
        self.missing, self.unexpected, self.mis_shaped = list(missing), list(unexpected), list(mis_shaped)
        lines = [f"cannot convert {source}" + (f": {reason}" if reason else "")]
        for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                             ("mis-shaped keys", self.mis_shaped)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items)
        super().__init__("\n".join(lines))


@dataclass(kw_only=True)
class ConversionReport:
    config: BTPConfig
    point_keys: int
    text_keys: int
    text_source: str | None
    ignored: list[str] = field(default_factory=list)
    official: dict[str, Any] = field(default_factory=dict)  # btp-3dad: best.pth's epoch, loss


def load_ulip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """`state_dict` of a ULIP checkpoint, read with weights_only=True.

    ULIP pickles its argparse options (`args`) next to the weights; argparse.Namespace is the one
    non-tensor class we allow (plain attributes, no code runs). Anything else is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, reason="file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(path, reason=f"not readable with torch.load(weights_only=True): {exc}") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(path, reason="expected a dict with a `state_dict` of tensors (as ULIP saves it)")
    if not any(k.startswith("module.") for k in state):  # saved without DDP: add the prefix ULIP keys carry
        state = {"module." + k: v for k, v in state.items()}
    return state


def _block_ids(keys, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def infer_encoder_config(point_state: dict[str, torch.Tensor], base: EncoderConfig, heads: int | None,
                         source: Path) -> tuple[EncoderConfig, int]:
    """EncoderConfig from PointBERT tensor shapes (G, K, feature layers from `base`) and D."""
    needed = ["encoder.first_conv.0.weight", "encoder.first_conv.3.weight", "encoder.second_conv.0.weight",
              "encoder.second_conv.3.weight", "reduce_dim.weight", "pos_embed.0.weight",
              "blocks.blocks.0.mlp.fc1.weight", "pc_projection"]
    missing = [(PROJECTION_KEY if k == "pc_projection" else POINT_PREFIX + k) for k in needed if k not in point_state]
    if missing:
        raise ConversionError(source, missing=missing, reason="cannot infer the encoder's dimensions")
    s = {k: tuple(v.shape) for k, v in point_state.items()}
    trans_dim = s["reduce_dim.weight"][0]
    depth = len(_block_ids(point_state, "blocks.blocks."))
    n_heads = heads if heads is not None else max(1, trans_dim // 64)
    enc = dataclasses.replace(
        base,
        in_channels=s["encoder.first_conv.0.weight"][1],
        pointnet_dims=(s["encoder.first_conv.0.weight"][0], s["encoder.first_conv.3.weight"][0],
                       s["encoder.second_conv.0.weight"][0]),
        encoder_dims=s["encoder.second_conv.3.weight"][0],
        trans_dim=trans_dim, depth=depth, num_heads=n_heads,
        mlp_ratio=s["blocks.blocks.0.mlp.fc1.weight"][0] / trans_dim,
        pos_hidden=s["pos_embed.0.weight"][0],
    )
    return enc, s["pc_projection"][1]


def _compare(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], name_of) -> tuple[list, list, list]:
    missing = sorted(name_of(k) for k in set(expected) - set(given))
    unexpected = sorted(name_of(k) for k in set(given) - set(expected))
    mis_shaped = sorted(f"{name_of(k)}: checkpoint {tuple(given[k].shape)}, expected {tuple(expected[k].shape)}"
                        for k in set(expected) & set(given) if given[k].shape != expected[k].shape)
    return missing, unexpected, mis_shaped


def convert_ulip2(point_ckpt: str | Path, clip_ckpt: str | Path | None = None, *, heads: int | None = None,
                  text_heads: int | None = None, base_config: str | BTPConfig = "ulip2", seed: int = 0):
    """-> (BTPModel, ConversionReport). Raises ConversionError naming every bad key."""
    from btp.model.network import BTPModel

    point_ckpt = Path(point_ckpt)
    base = preset(base_config) if isinstance(base_config, str) else base_config
    ulip = load_ulip_state(point_ckpt)

    point_state = {k[len(POINT_PREFIX):]: v for k, v in ulip.items() if k.startswith(POINT_PREFIX)}
    if PROJECTION_KEY in ulip:
        point_state["pc_projection"] = ulip[PROJECTION_KEY]
    if not point_state:
        raise ConversionError(point_ckpt, missing=[POINT_PREFIX + "*", PROJECTION_KEY],
                              reason="no ULIP PointBERT keys in its state_dict")
    enc_cfg, embed_dim = infer_encoder_config(point_state, base.encoder, heads, point_ckpt)

    # ---- text tower: a separate OpenCLIP file, else the one inside the ULIP-2 checkpoint ----
    text_state: dict[str, torch.Tensor] = {}
    text_source = None
    if clip_ckpt is not None:
        try:
            text_state = openclip_text_state(load_openclip_state(clip_ckpt))
        except TextEncoderError as exc:
            raise ConversionError(clip_ckpt, reason=str(exc)) from exc
        text_source = str(clip_ckpt)
        if not text_state:
            raise ConversionError(clip_ckpt, missing=list(OPENCLIP_TEXT_PREFIXES), reason="no OpenCLIP text-tower keys")
    else:
        inner = {k[len(CLIP_IN_ULIP_PREFIX):]: v for k, v in ulip.items() if k.startswith(CLIP_IN_ULIP_PREFIX)}
        text_state = openclip_text_state(inner)
        text_source = f"{point_ckpt} ({CLIP_IN_ULIP_PREFIX}*)" if text_state else None
    text_cfg = dataclasses.replace(base.text, kind="openclip", embed_dim=embed_dim)
    if text_state:
        try:
            dims = infer_openclip_dims(text_state, text_heads)
        except TextEncoderError as exc:
            raise ConversionError(clip_ckpt or point_ckpt, reason=str(exc)) from exc
        if dims["mlp_width"] != 4 * dims["width"]:
            raise ConversionError(clip_ckpt or point_ckpt, mis_shaped=[
                f"transformer.resblocks.0.mlp.c_fc.weight: hidden {dims['mlp_width']}, btp's config supports 4 x width"])
        if dims["embed_dim"] != embed_dim:
            raise ConversionError(clip_ckpt or point_ckpt, mis_shaped=[
                f"text_projection: D={dims['embed_dim']} but {PROJECTION_KEY} maps to D={embed_dim}"])
        text_cfg = dataclasses.replace(text_cfg, vocab_size=dims["vocab_size"], context_length=dims["context_length"],
                                       width=dims["width"], heads=dims["heads"], layers=dims["layers"])

    cfg = dataclasses.replace(base, encoder=enc_cfg, text=text_cfg)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConversionError(point_ckpt, reason=f"{exc} (pick a base config whose settings fit: --config)") from exc

    torch.manual_seed(seed)
    text_encoder = None
    if text_state:
        text_encoder = OpenCLIPTextEncoder(**infer_openclip_dims(text_state, text_heads))
    model = BTPModel(cfg, text_encoder)

    # ---- strict key/shape check, then load --------------------------------------------
    def point_name(k: str) -> str:
        return PROJECTION_KEY if k == "pc_projection" else POINT_PREFIX + k

    missing, unexpected, mis_shaped = _compare(model.point_encoder.state_dict(), point_state, point_name)
    if text_encoder is not None:
        prefix = "" if clip_ckpt is not None else CLIP_IN_ULIP_PREFIX
        t_missing, t_unexpected, t_mis = _compare(text_encoder.state_dict(), text_state, lambda k: prefix + k)
        missing, unexpected, mis_shaped = (sorted(missing + t_missing), sorted(unexpected + t_unexpected),
                                           sorted(mis_shaped + t_mis))
    if missing or unexpected or mis_shaped:
        raise ConversionError(point_ckpt if clip_ckpt is None else f"{point_ckpt} + {clip_ckpt}",
                              missing, unexpected, mis_shaped)
    model.point_encoder.load_state_dict(point_state, strict=True)
    if text_encoder is not None:
        text_encoder.load_state_dict(text_state, strict=True)

    used = {POINT_PREFIX + k for k in point_state} | {PROJECTION_KEY}
    if clip_ckpt is None and text_state:
        used |= {CLIP_IN_ULIP_PREFIX + k for k in text_state}
    ignored = _summarise(sorted(set(ulip) - used))
    report = ConversionReport(config=cfg, point_keys=len(point_state), text_keys=len(text_state),
                              text_source=text_source, ignored=ignored)
    return model.eval(), report


def _summarise(keys: list[str], limit: int = 20) -> list[str]:
    """Ignored keys grouped by their leading name parts (a bigG visual tower has hundreds)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        depth = 3 if k.startswith(CLIP_IN_ULIP_PREFIX) else 2
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
    out = [members[0] if members == [head] else f"{head}.* ({len(members)} tensors)"
           for head, members in sorted(groups.items())]
    return out[:limit] + ([f"... {len(out) - limit} more groups"] if len(out) > limit else [])


def conversion_provenance(point_ckpt: str | Path, clip_ckpt: str | Path | None, report: ConversionReport,
                          seed: int) -> dict[str, Any]:
    return {
        "source": "btp convert ulip2",
        "point_checkpoint": str(point_ckpt),
        "clip_checkpoint": str(clip_ckpt) if clip_ckpt else None,
        "text_tower": report.text_source,
        "point_tensors": report.point_keys,
        "text_tensors": report.text_keys,
        "ignored": report.ignored,
        "heads_initialised": f"GFCM, MGFEM, prompt context: random (seed {seed}); train them with `btp train`",
        "text_frozen": False,
    }


# ---- official BTP-3DAD heads (train.py's best.pth) ---------------------------------------------

HEAD_GROUPS = ("patch_feature_embedder", "patch_geo_encoder", "prompt_learner")
_MLP_NAMES = {"mapper_pointbert": "layer_mlp", "mapper_fpfh": "desc_mlp", "mapper_global": "cls_mlp",
              "fusion_proj": "fuse"}
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
PROMPT_BUFFERS = ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg")


def official_head_names() -> dict[str, str]:
    """Official key (``group.key``) -> btp BTPModel state key, for every tensor we load."""
    names = {"patch_feature_embedder.layer_weights": "mgfem.layer_weights", "prompt_learner.ctx": "prompt_ctx"}
    for official, ours in _MLP_NAMES.items():
        for i in (0, 2):
            for p in ("weight", "bias"):
                names[f"patch_feature_embedder.{official}.{i}.{p}"] = f"mgfem.{ours}.{i}.{p}"
    for i in range(3):  # mlp{1,2,3} = Conv2d(1x1) + BatchNorm2d  ->  convs.{3i}, convs.{3i+1}
        for p in ("weight", "bias"):
            names[f"patch_geo_encoder.mlp{i + 1}.0.{p}"] = f"gfcm.convs.{3 * i}.{p}"
        for p in _BN_FIELDS:
            names[f"patch_geo_encoder.mlp{i + 1}.1.{p}"] = f"gfcm.convs.{3 * i + 1}.{p}"
    for i in (0, 2):
        for p in ("weight", "bias"):
            names[f"patch_geo_encoder.fc.{i}.{p}"] = f"gfcm.head.{i}.{p}"
    return names


def load_official_heads(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``best.pth`` of the official train.py -> (flat ``{group.key: tensor}``, its other plain
    entries such as epoch and loss), read with torch.load(weights_only=True).

    The file is ``{"patch_feature_embedder": sd, "patch_geo_encoder": sd, "prompt_learner": sd,
    "epoch": int, "loss": float}``; a pickled object of any other class is refused unread."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, reason="file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConversionError(path, reason=f"not readable with torch.load(weights_only=True) (a pickled object "
                                           f"that is not a tensor or plain value is never executed): {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ConversionError(path, reason=f"expected the dict train.py saves, got {type(ckpt).__name__}")
    missing_groups = [g for g in HEAD_GROUPS if g not in ckpt]
    if missing_groups:
        raise ConversionError(path, missing=missing_groups,
                              reason="not a BTP-3DAD heads checkpoint (train.py saves these three state dicts)")
    flat: dict[str, torch.Tensor] = {}
    bad = []
    for group in HEAD_GROUPS:
        if not isinstance(ckpt[group], dict):
            raise ConversionError(path, reason=f"`{group}` is a {type(ckpt[group]).__name__}, expected a state dict")
        for k, v in ckpt[group].items():
            if isinstance(v, torch.Tensor):
                flat[f"{group}.{k}"] = v
            else:
                bad.append(f"{group}.{k}")
    if bad:
        raise ConversionError(path, mis_shaped=[f"{k}: not a tensor" for k in bad])
    extras = {k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v) for k, v in ckpt.items()
              if k not in HEAD_GROUPS and isinstance(v, (int, float, str, torch.Tensor))}
    return flat, extras


def _shape(heads: dict[str, torch.Tensor], key: str, source: Path, dims: int) -> tuple[int, ...]:
    if key not in heads:
        raise ConversionError(source, missing=[key], reason="cannot infer the head widths")
    shape = tuple(heads[key].shape)
    if len(shape) < dims:
        raise ConversionError(source, mis_shaped=[f"{key}: shape {shape}, expected {dims} dimensions"])
    return shape


def infer_head_config(heads: dict[str, torch.Tensor], base: BTPConfig, source: Path) -> BTPConfig:
    """GFCM and MGFEM widths and the prompt context length from the official heads' tensor shapes
    (everything else from ``base``)."""
    pfe, pge = "patch_feature_embedder.", "patch_geo_encoder."
    hidden, in_dim = _shape(heads, pfe + "mapper_pointbert.0.weight", source, 2)[:2]
    n_layers = _shape(heads, pfe + "layer_weights", source, 1)[0]
    conv_dims = tuple(_shape(heads, f"{pge}mlp{i}.0.weight", source, 2)[0] for i in (1, 2, 3))
    gfcm_hidden = _shape(heads, pge + "fc.0.weight", source, 2)[0]
    out_dim = _shape(heads, pge + "fc.2.weight", source, 2)[0]
    n_ctx = _shape(heads, "prompt_learner.ctx", source, 2)[0]
    problems = []
    if in_dim != base.encoder.trans_dim:
        problems.append(f"{pfe}mapper_pointbert.0.weight: takes {in_dim}-d layer features, the encoder gives "
                        f"{base.encoder.trans_dim}")
    if n_layers != len(base.encoder.feature_layers):
        problems.append(f"{pfe}layer_weights: {n_layers} layers, the config fuses {len(base.encoder.feature_layers)} "
                        f"(blocks {base.encoder.feature_layers})")
    if problems:
        raise ConversionError(source, mis_shaped=problems)
    return dataclasses.replace(
        base, gfcm=dataclasses.replace(base.gfcm, conv_dims=conv_dims, hidden=gfcm_hidden, out_dim=out_dim,
                                       frame="world", context_k=0),
        mgfem=dataclasses.replace(base.mgfem, hidden=hidden), text=dataclasses.replace(base.text, n_ctx=n_ctx))


def _check_prompt_buffers(heads, model, source: Path) -> list[str]:
    """Shape problems of the prompt learner's token buffers ([1, 1, W] prefix, [1, L-1, W] suffix)."""
    width, length = model.prompt_ctx.shape[1], model.text_encoder.context_length
    problems = []
    for name in PROMPT_BUFFERS:
        key = f"prompt_learner.{name}"
        if key not in heads:
            continue
        shape = tuple(heads[key].shape)
        want = (1, 1, width) if "prefix" in name else (1, length - 1, width)
        if shape != want:
            problems.append(f"{key}: checkpoint {shape}, expected {want}")
    return problems


def convert_btp3dad(heads_ckpt: str | Path, point_ckpt: str | Path, clip_ckpt: str | Path | None = None, *,
                    use_learned_context: bool = False, heads: int | None = None, text_heads: int | None = None):
    """Official BTP-3DAD heads + ULIP-2 + OpenCLIP -> (BTPModel with frozen text, ConversionReport).

    Encoder and text tower go through ``convert_ulip2``; the heads are mapped by
    ``official_head_names`` after a strict key/shape check (every bad key named). The text
    embeddings are then frozen as the official scoring computes them: the tower's encoding of
    "normal ." / "defective ." (``--use-learned-context``: with the learned context inserted), and
    the tower is dropped - the checkpoint holds encoder, heads and the two embeddings.
    """
    from btp.config import btp3dad_config

    heads_ckpt = Path(heads_ckpt)
    head_state, extras = load_official_heads(heads_ckpt)
    base = btp3dad_config()
    if use_learned_context:
        base = dataclasses.replace(base, text=dataclasses.replace(base.text, prompt_context=True))
    # the encoder's width decides MGFEM's input: convert it first with the preset's head widths
    model, report = convert_ulip2(point_ckpt, clip_ckpt, heads=heads, text_heads=text_heads, base_config=base)
    if model.text_encoder is None:
        raise ConversionError(point_ckpt, missing=[f"{CLIP_IN_ULIP_PREFIX}*"],
                              reason="the official scoring needs the OpenCLIP text tower: pass --clip-ckpt "
                                     "open_clip_pytorch_model.bin")
    cfg = infer_head_config(head_state, model.cfg, heads_ckpt)
    from btp.model.network import BTPModel

    full = BTPModel(cfg, model.text_encoder)
    full.point_encoder.load_state_dict(model.point_encoder.state_dict())

    names = official_head_names()
    ours = full.state_dict()
    expected = {k: ours[v] for k, v in names.items()}
    given = {k: v for k, v in head_state.items() if not k.split(".", 1)[1] in PROMPT_BUFFERS}
    missing, unexpected, mis_shaped = _compare(expected, given, lambda k: k)
    mis_shaped += _check_prompt_buffers(head_state, full, heads_ckpt)
    missing += [f"prompt_learner.{b}" for b in PROMPT_BUFFERS if f"prompt_learner.{b}" not in head_state]
    if missing or unexpected or mis_shaped:
        raise ConversionError(heads_ckpt, sorted(missing), unexpected, sorted(mis_shaped))
    with torch.no_grad():
        for official, key in names.items():
            ours[key].copy_(head_state[official])
    full.eval()
    full.freeze_text(drop_encoder=True)
    report = dataclasses.replace(report, config=cfg, official=extras)
    return full, report


def btp3dad_provenance(heads_ckpt, point_ckpt, clip_ckpt, report: ConversionReport,
                       use_learned_context: bool) -> dict[str, Any]:
    from btp.io.files import file_sha256

    files = {"heads": heads_ckpt, "point": point_ckpt, "clip": clip_ckpt}
    return {
        "source": "btp convert btp-3dad",
        "heads_checkpoint": str(heads_ckpt), "point_checkpoint": str(point_ckpt),
        "clip_checkpoint": str(clip_ckpt) if clip_ckpt else None,
        "sha256": {k: file_sha256(v) for k, v in files.items() if v},
        "text_tower": report.text_source,
        "text_frozen": True,
        "text": ("OpenCLIP encoding of the prompts with the learned context inserted" if use_learned_context
                 else 'OpenCLIP encoding of "normal ." / "defective ." (the official scoring; learned context unused)'),
        "point_tensors": report.point_keys, "text_tensors": report.text_keys, "ignored": report.ignored,
        "official_checkpoint_info": {k: v for k, v in report.official.items() if isinstance(v, (int, float, str))},
    }
