"""The BTP model in PyTorch (point encoder, GFCM, MGFEM, prompt learner, scoring, losses, checkpoints).

Imports are lazy so that `btp --help` (which imports btp.cli.convert) does not import torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BTPModel": "btp.model.network",
    "OUTPUT_NAMES": "btp.model.network",
    "TextNotReadyError": "btp.model.network",
    "PointBERT": "btp.model.pointbert",
    "GFCM": "btp.model.heads",
    "MGFEM": "btp.model.heads",
    "TextEncoder": "btp.model.text",
    "OpenCLIPTextEncoder": "btp.model.text",
    "MiniLMTextEncoder": "btp.model.text",
    "build_text_encoder": "btp.model.text",
    "point_logits_from_patches": "btp.model.scoring",
    "btp_loss": "btp.model.losses",
    "save_checkpoint": "btp.model.checkpoint",
    "load_checkpoint": "btp.model.checkpoint",
    "CheckpointError": "btp.model.checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'btp.model' has no attribute {name!r}")
