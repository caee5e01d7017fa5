"""The checks of `btp export`'s numeric options (the formats themselves: ``btp.contract.FORMATS``)."""
from __future__ import annotations

MIN_OPSET = 17  # LayerNormalization as one op (TensorRT keeps it in FP32 / uses its norm layer)
MAX_OPSET = 20  # torch's TorchScript exporter and TensorRT 10's parser both cover 17..20


def check_batch(batch: str | int) -> str | int:
    """'dynamic' or a positive int (as text or int) -> 'dynamic' | int."""
    if isinstance(batch, int) or (isinstance(batch, str) and batch.isdigit()):
        value = int(batch)
        if value < 1:
            raise ValueError(f"batch={batch}: expected 'dynamic' or a positive integer")
        return value
    if batch == "dynamic":
        return "dynamic"
    raise ValueError(f"batch={batch!r}: expected 'dynamic' or a positive integer")


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ValueError(f"opset={opset}: btp-export supports opset {MIN_OPSET}..{MAX_OPSET} "
                         f"(>= 17 keeps LayerNormalization one op, which TensorRT needs for FP16)")
    return int(opset)
