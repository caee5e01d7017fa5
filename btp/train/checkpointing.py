"""Training-state checkpoints for resume: modules + AdamW state + step, as safetensors (no pickle).

Layout: ``module.<name>.<key>`` for every module's state dict, ``param.<name>`` for loose
parameters, ``opt.<param index>.<field>`` for the optimiser's per-parameter tensors; the
optimiser's param-group hyper-parameters and the step live in the metadata JSON. Written to a
temporary file and renamed, so an interruption never leaves a half checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def save_training_state(path, modules: dict, optimizer, step: int, extra_params: dict | None = None,
                        meta: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value.detach().contiguous().clone()
    for name, p in (extra_params or {}).items():
        tensors[f"param.{name}"] = p.detach().contiguous().clone()
    opt_state = optimizer.state_dict()
    scalars = {}
    for idx, st in opt_state["state"].items():
        for field, value in st.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{field}"] = value.detach().contiguous().clone().reshape(value.shape)
            else:
                scalars[f"{idx}.{field}"] = value
    groups = [{k: v for k, v in g.items()} for g in opt_state["param_groups"]]
    metadata = {"step": str(int(step)), "param_groups": json.dumps(groups), "opt_scalars": json.dumps(scalars),
                "meta": json.dumps(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_step(path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def load_training_state(path, modules: dict, optimizer, extra_params: dict | None = None) -> int:
    """Restore modules / optimiser / loose parameters in place; returns the step to continue at."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in modules.items():
        prefix = f"module.{name}."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        module.load_state_dict(state, strict=True)
    with torch.no_grad():
        for name, p in (extra_params or {}).items():
            p.copy_(tensors[f"param.{name}"])
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, field = key.split(".", 2)
            state.setdefault(int(idx), {})[field] = value
    for key, value in json.loads(meta["opt_scalars"]).items():
        idx, field = key.split(".", 1)
        state.setdefault(int(idx), {})[field] = value
    groups = json.loads(meta["param_groups"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(meta["step"])
