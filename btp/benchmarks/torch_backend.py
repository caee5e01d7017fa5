"""The torch row: PyTorch eager on the same model, behind the runtime's backend contract.

A backend (docs/design.md) is any object with ``name`` and ``run(neighborhood [B,G,K,C],
center [B,G,3]) -> dict[str, np.ndarray]`` keyed by the ONNX output names. This one runs
``BTPModel.forward`` in eval mode under ``torch.inference_mode`` — the baseline a user would run
without btp-edge: same weights, same preprocessing (it sits inside the same Pipeline), torch
instead of the engine.

Which weights: ``--checkpoint`` if given; else what model.onnx's metadata says it was exported
from — a checkpoint file (looked up beside model.onnx, in $BTP_MODELS, in the package's own models) or a
fresh init (rebuilt with the same torch seed). The weights' sha256 is compared with the one in the
metadata and the row's label says whether they match.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def load_torch_model(model_path, checkpoint=None):
    """-> (BTPModel in eval mode with frozen text, label saying where the weights came from)."""
    from btp.export.onnx import fresh_model, load_model, state_sha256
    from btp.io.locations import model_search_paths
    from btp.runtime.metadata import read_model_meta

    model_path = Path(model_path)
    meta = read_model_meta(model_path)
    info = meta.model
    if checkpoint is not None:
        loaded = load_model(Path(checkpoint))
        where = f"checkpoint {Path(checkpoint).name}"
    elif info.get("fresh_init"):
        seed = int(info.get("seed", 0))
        loaded = fresh_model(meta.config, seed)
        where = f"fresh init, torch seed {seed} (untrained)"
    else:
        source = str(info.get("source", ""))
        candidates = [model_path.parent / Path(source).name] + model_search_paths(Path(source).stem)
        found = next((p for p in candidates if source and p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"the torch row needs the checkpoint model.onnx was exported from "
                                    f"({source or 'unknown'}); pass --checkpoint PATH")
        loaded = load_model(found)
        where = f"checkpoint {found.name}"
    want = info.get("weights_sha256")
    have = loaded.info.get("weights_sha256")
    if not want:
        check = "model.onnx records no weights hash"
    elif want == have or (info.get("fresh_init") and want == state_sha256(loaded.model)):
        check = "same weights as model.onnx (sha256)"
    else:
        check = "WEIGHTS DIFFER from model.onnx (sha256 mismatch)"
    return loaded.model.eval(), f"{where}; {check}"


class TorchBackend:
    """PyTorch eager forward of a BTPModel (see module docstring)."""

    def __init__(self, model, *, threads: int | None = None, weights: str = "", half: bool = False,
                 mixed: bool = False):
        """half: every op in float16; with mixed, the FP16 keep-list of btp.runtime.tensorrt stays
        float32 (LayerNorm modules, the MGFEM head and the scoring after patch_embed), as a
        TensorRT FP16 engine built with that list computes it."""
        import torch

        if threads is None:  # same default as ONNX Runtime (one thread per physical core), whatever
            import psutil  # OMP_NUM_THREADS says (torch would take its thread count from it)

            threads = psutil.cpu_count(logical=False) or 1
        torch.set_num_threads(threads)
        self.threads = threads
        self._torch = torch
        self.model = model.eval().half() if half else model.eval()
        self.dtype = torch.float16 if half else torch.float32
        self.mixed = half and mixed
        if self.mixed:
            _keep_fp32(self.model)
        self.name = ("torch-fp16-mixed" if self.mixed else "torch-fp16") if half else "torch"
        self.weights = weights + (
            "; float16 with LayerNorm, MGFEM and the scoring head in float32 (CPU emulation of a TensorRT FP16 "
            "engine with the keep-list)" if self.mixed else
            "; every op in float16 (CPU emulation of an all-FP16 engine)" if half else "")

    @classmethod
    def for_onnx(cls, model_path, *, checkpoint=None, threads: int | None = None, half: bool = False,
                 mixed: bool = False) -> "TorchBackend":
        model, label = load_torch_model(model_path, checkpoint)
        return cls(model, threads=threads, weights=label, half=half, mixed=mixed)

    def run(self, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            inputs = (torch.from_numpy(np.ascontiguousarray(neighborhood, dtype=np.float32)).to(self.dtype),
                      torch.from_numpy(np.ascontiguousarray(center, dtype=np.float32)).to(self.dtype))
            if self.mixed:
                out = self.model.score(*(None if t is None else t.float() for t in self.model.embed(*inputs)))
            else:
                out = self.model(*inputs)
        return {k: v.float().numpy() for k, v in out.items()}


def _keep_fp32(model) -> None:
    """The FP16 keep-list of btp.runtime.tensorrt.precision_policy on a half model: LayerNorm
    modules back to float32 (fed and returning float16) and the MGFEM head in float32 (its
    float32 output goes on to the scoring, which ``run`` computes in float32)."""
    import torch

    def to_float(args):
        return tuple([a.float() for a in x] if isinstance(x, (list, tuple)) else x.float() for x in args)

    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
            module.register_forward_pre_hook(lambda m, args: to_float(args))
            module.register_forward_hook(lambda m, args, out: out.half())
    model.mgfem.float()
    model.mgfem.register_forward_pre_hook(lambda m, args: to_float(args))
