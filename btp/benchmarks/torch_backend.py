"""The torch row: PyTorch eager on the same model, behind the runtime's backend contract.

A backend (docs/design.md) is any object with ``name`` and ``run(neighborhood [B,G,K,C],
center [B,G,3]) -> dict[str, np.ndarray]`` keyed by the ONNX output names. This one runs
``BTPModel.forward`` in eval mode under ``torch.inference_mode`` — the baseline a user would run
without btp-edge: same checkpoint, same preprocessing, torch instead of the engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def onnx_metadata(model_path) -> dict:
    """The ``metadata_props["btp"]`` JSON of an exported model ({} if absent)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == "btp":
            return json.loads(prop.value)
    return {}


class TorchBackend:
    """PyTorch eager forward of a btp checkpoint (or a freshly initialised model, labelled so)."""

    def __init__(self, checkpoint=None, *, config=None, threads: int | None = None, seed: int = 0):
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        self._torch = torch
        if checkpoint is not None:
            from btp.model.checkpoint import load_checkpoint

            self.model, self.provenance = load_checkpoint(checkpoint, text_encoder=None)
            self.weights = f"checkpoint {Path(checkpoint).name}"
        else:
            if config is None:
                raise ValueError("TorchBackend needs a checkpoint or a config (from the ONNX metadata)")
            import torch.nn.functional as F

            from btp.model import BTPModel

            torch.manual_seed(seed)
            self.model = BTPModel(config)
            self.model.frozen_text = F.normalize(torch.randn(2, config.text.embed_dim), dim=-1)
            self.provenance = {"weights": f"freshly initialised (seed {seed})"}
            self.weights = f"freshly initialised {config.name} (seed {seed}): timing only, not the ONNX weights"
        self.model.eval()
        self.name = "torch"
        self.config = self.model.cfg

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(neighborhood, dtype=np.float32)),
                             torch.from_numpy(np.ascontiguousarray(center, dtype=np.float32)))
        return {k: v.numpy() for k, v in out.items()}


def find_checkpoint(model_path, explicit=None) -> Path | None:
    """The checkpoint the torch row should load: --checkpoint, else the one the ONNX provenance
    names (if it exists), else ``<model>.safetensors`` beside model.onnx, else the default model."""
    if explicit:
        return Path(explicit)
    meta = onnx_metadata(model_path)
    prov = meta.get("provenance", {}) if isinstance(meta, dict) else {}
    candidates = [prov.get(k) for k in ("checkpoint", "checkpoint_path", "source", "model_path")]
    model_path = Path(model_path)
    candidates += [model_path.with_suffix(".safetensors")]
    repo = Path(__file__).resolve().parents[2]
    name = (meta.get("config") or {}).get("name", "")
    candidates += [repo / "models" / f"{name}.safetensors"] if name else []
    for cand in candidates:
        if cand and Path(cand).is_file() and str(cand).endswith(".safetensors"):
            return Path(cand)
    return None
