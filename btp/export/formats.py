"""Export formats, declared once (Ultralytics style): the table drives `btp export --help`,
argument validation and the artifact names.

| format | command          | suffix      | arguments                                        | GPU |
|--------|------------------|-------------|--------------------------------------------------|-----|
| onnx   | btp-export       | .onnx       | opset, batch, fp16_safe, simplify, patch_embed   | no  |
| engine | btp build        | .engine     | (TensorRT; see btp.export.tensorrt)              | yes |
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    name: str
    command: str
    suffix: str
    arguments: tuple[str, ...]
    gpu: bool
    what: str


EXPORT_FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "btp-export", ".onnx", ("opset", "batch", "fp16_safe", "simplify", "patch_embed"), False,
                 "one self-describing model.onnx: everything after grouping, text embeddings frozen inside"),
    ExportFormat("engine", "btp build", ".engine", ("fp16", "int8", "workspace"), True,
                 "TensorRT engine built from model.onnx, cached per GPU + TensorRT version + model hash"),
)

MIN_OPSET = 17  # LayerNormalization as one op (TensorRT keeps it in FP32 / uses its norm layer)
MAX_OPSET = 20  # torch's TorchScript exporter and TensorRT 10's parser both cover 17..20


def get_format(name: str) -> ExportFormat:
    for fmt in EXPORT_FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown export format {name!r}; choose one of {[f.name for f in EXPORT_FORMATS]}")


def formats_help() -> str:
    return "; ".join(f"{f.name} ({f.suffix}, `{f.command}`{', GPU' if f.gpu else ''}): {f.what}"
                     for f in EXPORT_FORMATS)


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
