"""Full-size stand-in for a model trained with the official BTP-3DAD code, for latency and FP16 checks.

No official weights exist on the machines this project is built on, so this writes seeded random
checkpoints with the official key names and full shapes (ULIP-2 PointBERT: 226 tensors, 32.5 M;
best.pth heads: ~9 M; a narrow OpenCLIP text tower with D = 1280 - its size never reaches the
exported graph, the text is frozen), converts them with ``btp convert btp-3dad`` and exports
``model.onnx`` (and ``model-fp16safe.onnx`` with the FP16 keep-list in its metadata). Latency does
not depend on the weights' values; the scores of this model mean nothing.

    python benchmarks/btp3dad_fullsize.py --out runs/btp3dad-full
    btp-bench latency runs/btp3dad-full/model.onnx --checkpoint runs/btp3dad-full/model.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))  # the fakes with the official key names live with the tests
    from test_convert_btp3dad import FULL, write_fakes

    from btp.export.onnx import export_onnx, load_model
    from btp.model.checkpoint import save_checkpoint
    from btp.model.convert import btp3dad_provenance, convert_btp3dad

    args.out.mkdir(parents=True, exist_ok=True)
    fakes = write_fakes(args.out, FULL, text_width=64, seed=1)
    model, report = convert_btp3dad(fakes["best"], fakes["ulip"], fakes["clip"])
    prov = btp3dad_provenance(fakes["best"], fakes["ulip"], fakes["clip"], report, False)
    prov["weights"] = "seeded random stand-ins with the official shapes (benchmarks/btp3dad_fullsize.py): latency only"
    ckpt = save_checkpoint(args.out / "model.safetensors", model, prov)
    for name, fp16_safe in (("model.onnx", False), ("model-fp16safe.onnx", True)):
        res = export_onnx(load_model(ckpt), args.out / name, fp16_safe=fp16_safe, parity_scans=2)
        print(f"{res.path}: {res.size_bytes / 1e6:.0f} MB, parity {res.verdict}, {res.seconds:.0f} s")


if __name__ == "__main__":
    main()
