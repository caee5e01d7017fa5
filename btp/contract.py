"""The engine's contract, as tables: its tensors, the backends that run it, the formats it is
exported to. Everything else derives from these rows - the ONNX export's input and output names,
the metadata's ``io`` section and the graph check at load (``btp.runtime.metadata``), TensorRT's
optimization profile (``btp.runtime.tensorrt``), the Triton configs (``btp.export.triton``), the
choices and help of ``btp-run --backend`` and ``btp export --format`` and the backend rows of
``btp-bench``. Adding an optional graph output is one ``Tensor`` row (``graph="requested"``): the
model's forward must return it, ``btp-export --optional-output NAME`` puts it into the graph.

Shapes are written in symbols, resolved per model by ``sizes(cfg)``:

| symbol | size                                   |
|--------|----------------------------------------|
| B      | scans per engine call (batch)          |
| G      | patches per scan, encoder.num_group    |
| K      | points per patch, encoder.group_size   |
| C      | channels per point, encoder.in_channels|
| D      | embedding width, text.embed_dim        |

Torch-free and import-light (only btp.config): every floor may read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from btp.config import BTPConfig

# ---- tensors --------------------------------------------------------------------------------

SYMBOLS = {"B": "scans per engine call", "G": "patches per scan (encoder.num_group)",
           "K": "points per patch (encoder.group_size)", "C": "channels per point (encoder.in_channels)",
           "D": "embedding width (text.embed_dim)"}

# A row's ``when``: the models whose forward (and graph) carry it.
CONDITIONS = {
    "point-head": ("models with per-point scores (gfcm.point_dim > 0)", lambda cfg: cfg.gfcm.point_dim > 0),
}

GRAPH = ("always", "requested", "never")  # in the exported graph: always, on request, only in PyTorch
RUNTIME = ("required", "read", "")        # the runtime refuses a graph without it / reads it when there / not


@dataclass(frozen=True, kw_only=True)
class Tensor:
    """One tensor of the engine: an input, or an output of ``BTPModel.forward`` (and of the graph)."""

    name: str
    role: str                     # "input" | "output"
    shape: tuple[str | int, ...]  # symbols of SYMBOLS or fixed sizes
    meaning: str
    dtype: str = "float32"
    graph: str = "always"         # GRAPH
    runtime: str = ""             # RUNTIME (inputs: always "required")
    when: str | None = None       # a key of CONDITIONS, or None: every model

    def __post_init__(self) -> None:
        if self.role not in ("input", "output") or self.graph not in GRAPH or self.runtime not in RUNTIME:
            raise ValueError(f"tensor {self.name!r}: bad role/graph/runtime ({self.role}, {self.graph}, "
                             f"{self.runtime})")
        if self.when is not None and self.when not in CONDITIONS:
            raise ValueError(f"tensor {self.name!r}: unknown condition {self.when!r}")
        if any(isinstance(d, str) and d not in SYMBOLS for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: shape {self.shape} uses a symbol outside {list(SYMBOLS)}")

    def applies(self, cfg: BTPConfig) -> bool:
        """Whether a model of ``cfg`` has this tensor at all."""
        return self.when is None or CONDITIONS[self.when][1](cfg)

    def dims(self, cfg: BTPConfig, batch: int | str | None = "B") -> list[int | str | None]:
        """The shape for a model of ``cfg``; the batch axis is ``batch`` (a size, "B" or None)."""
        size = sizes(cfg)
        return [batch if d == "B" else size[d] if isinstance(d, str) else d for d in self.shape]


TENSORS: tuple[Tensor, ...] = (
    Tensor(name="neighborhood", role="input", shape=("B", "G", "K", "C"), runtime="required",
           meaning="each patch's K nearest points relative to its center (xyz, then colour or preprocess.rgb_fill)"),
    Tensor(name="center", role="input", shape=("B", "G", 3), runtime="required",
           meaning="the patch centers (FPS samples of the normalised scan)"),
    Tensor(name="patch_logits", role="output", shape=("B", "G"),
           meaning="per patch: anomaly minus normal text similarity"),
    Tensor(name="patch_probs", role="output", shape=("B", "G"), runtime="required",
           meaning="per patch anomaly probability, sigmoid(patch_logits); the point scores come from it"),
    Tensor(name="global_logit", role="output", shape=("B",), graph="never",
           meaning="the global head's logit over the whole scan"),
    Tensor(name="global_prob", role="output", shape=("B",), runtime="read",
           meaning="the global head's probability (NaN in the results when a graph lacks it)"),
    Tensor(name="object_score", role="output", shape=("B",), runtime="required",
           meaning="alpha * global_prob + (1 - alpha) * top mean of the patch (or point) probabilities"),
    Tensor(name="patch_point_logits", role="output", shape=("B", "G", "K"), graph="never", when="point-head",
           meaning="each point's own logit in each patch"),
    Tensor(name="patch_point_probs", role="output", shape=("B", "G", "K"), runtime="required", when="point-head",
           meaning="each point's own probability in each patch; the point scores come from it"),
    Tensor(name="patch_embed", role="output", shape=("B", "G", "D"), graph="requested",
           meaning="per patch embedding scored against the text (for debugging and analysis)"),
    Tensor(name="geo_desc", role="output", shape=("B", "G", 33), graph="never",
           meaning="per patch geometric descriptor (GFCM, 33 FPFH bins)"),
)


def sizes(cfg: BTPConfig) -> dict[str, int]:
    """The symbols' sizes for a model of ``cfg`` (all but B)."""
    enc = cfg.encoder
    return {"G": enc.num_group, "K": enc.group_size, "C": enc.in_channels, "D": cfg.text.embed_dim}


def tensor(name: str) -> Tensor:
    for row in TENSORS:
        if row.name == name:
            return row
    raise KeyError(f"no tensor {name!r} in the contract; it has {[t.name for t in TENSORS]}")


def inputs() -> tuple[Tensor, ...]:
    return tuple(t for t in TENSORS if t.role == "input")


def input_names() -> tuple[str, ...]:
    return tuple(t.name for t in inputs())


def optional_outputs() -> tuple[Tensor, ...]:
    """The outputs a graph carries only on request (``btp-export --optional-output NAME``)."""
    return tuple(t for t in TENSORS if t.role == "output" and t.graph == "requested")


def check_optional(names) -> tuple[str, ...]:
    """``names`` (requested optional outputs) in table order; ValueError naming the choices."""
    names = tuple(names)
    allowed = [t.name for t in optional_outputs()]
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"optional output(s) {bad}: choose from {', '.join(allowed) or 'none'}")
    return tuple(n for n in allowed if n in names)


def model_outputs(cfg: BTPConfig | None = None) -> tuple[Tensor, ...]:
    """What ``BTPModel.forward`` returns, in order (``cfg=None``: the outputs every model has)."""
    return tuple(t for t in TENSORS if t.role == "output" and (t.applies(cfg) if cfg is not None else t.when is None))


def graph_outputs(cfg: BTPConfig, optional=()) -> tuple[Tensor, ...]:
    """The exported graph's outputs, in order: every ``graph="always"`` row this model has, plus
    the requested optional ones."""
    wanted = set(check_optional(optional))
    return tuple(t for t in model_outputs(cfg) if t.graph == "always" or (t.graph == "requested" and t.name in wanted))


def required_outputs(cfg: BTPConfig) -> tuple[Tensor, ...]:
    """The outputs a graph of this model must have for the runtime to score with it."""
    return tuple(t for t in model_outputs(cfg) if t.runtime == "required")


def runtime_outputs(cfg: BTPConfig) -> tuple[Tensor, ...]:
    """The outputs the runtime reads (required, or read when present), in table order."""
    return tuple(t for t in graph_outputs(cfg) if t.runtime in ("required", "read"))


# ---- backends -------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Backend:
    """One engine backend of ``btp.runtime`` (``btp-run --backend NAME``)."""

    name: str
    what: str
    gpu: bool                               # needs an NVIDIA GPU
    module: str                             # btp/runtime/backends/<module>.py
    extra: str = ""                         # the pip extra that brings it ("": the base install)
    options: tuple[str, ...] = ()           # keyword options it takes beyond threads (Pipeline(**options))
    precisions: tuple[str, ...] = ()        # values of its ``precision`` option
    bench: tuple[str, ...] = ()             # the rows btp-bench times it as (a precision after the dash)


BACKENDS: tuple[Backend, ...] = (
    Backend(name="ort-cpu", what="ONNX Runtime, CPUExecutionProvider", gpu=False, module="ort", bench=("ort-cpu",)),
    Backend(name="ort-cuda", what="ONNX Runtime, CUDAExecutionProvider", gpu=True, module="ort", extra="gpu",
            options=("device_resident",), bench=("ort-cuda",)),
    Backend(name="ort-trt", what="ONNX Runtime, TensorrtExecutionProvider (its own engines)", gpu=True, module="ort",
            extra="gpu"),
    Backend(name="trt", what="TensorRT engine, built on demand and cached (btp build)", gpu=True, module="trt",
            extra="gpu", options=("precision", "batch", "workspace_mb", "cache_dir"),
            precisions=("fp32", "fp16", "int8"), bench=("trt-fp32", "trt-fp16")),
    Backend(name="openvino", what="OpenVINO CPU plugin, float32", gpu=False, module="openvino", extra="openvino",
            bench=("openvino",)),
    Backend(name="openvino-bf16", what="OpenVINO CPU plugin, bfloat16 inside", gpu=False, module="openvino",
            extra="openvino", bench=("openvino-bf16",)),
)
DEFAULT_BACKEND = "ort-cpu"
# "auto": the backend the model's precision (metadata export.precision.mode) runs on
AUTO_BACKEND = "auto"

# the precisions of a model.onnx (btp-export --precision) and the CPU backend each runs on
PRECISIONS: dict[str, str] = {"fp32": "ort-cpu", "int8": "ort-cpu", "bf16": "openvino-bf16"}


def precision_backend(precision: str) -> str:
    """The backend ``btp-run --backend auto`` picks for a model of this precision."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}") from None


def backend_names() -> tuple[str, ...]:
    return tuple(b.name for b in BACKENDS)


def backend(name: str) -> Backend:
    """The row called ``name``; ValueError listing every backend otherwise."""
    for row in BACKENDS:
        if row.name == name:
            return row
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())}")


def backends_help() -> str:
    """One line per backend, for --help."""
    return "; ".join(f"{b.name}: {b.what}" + (" (GPU)" if b.gpu else "") for b in BACKENDS)


# ---- export formats -------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Format:
    """One thing ``btp export`` / ``btp build`` makes (Ultralytics' export table, for btp)."""

    name: str
    what: str
    command: str                            # the command that makes it (btp export = btp-export)
    suffix: str                             # of the output ("/": a folder)
    gpu: bool
    arguments: tuple[str, ...]              # the command-line options that apply to it
    choices: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # option -> allowed values


FORMATS: tuple[Format, ...] = (
    Format(name="onnx", what="one self-describing model.onnx: everything after grouping, text embeddings frozen "
                             "inside", command="btp export", suffix=".onnx", gpu=False,
           arguments=("--model", "--out", "--format", "--opset", "--batch", "--fp16-safe", "--simplify",
                      "--optional-output", "--patch-embed", "--seed", "--precision", "--gate-data",
                      "--calibration-shapes", "--keep-fp32", "--force", "--selfsim"),
           choices={"--precision": tuple(PRECISIONS)}),
    Format(name="triton", what="a Triton model repository (--model may also be an exported model.onnx)",
           command="btp export --format triton", suffix="/", gpu=False,
           arguments=("--model", "--out", "--format", "--layout", "--engine", "--plan", "--opset", "--reference"),
           choices={"--layout": ("python", "ensemble"), "--engine": ("onnx", "plan")}),
    Format(name="engine", what="a TensorRT engine built from model.onnx, cached per GPU + TensorRT version + model "
                               "hash", command="btp build", suffix=".plan", gpu=True,
           arguments=("--fp16", "--int8", "--calib", "--workspace", "--min-batch", "--opt-batch", "--max-batch",
                      "--cache-dir", "--force")),
)


def export_format(name: str) -> Format:
    for row in FORMATS:
        if row.name == name:
            return row
    raise ValueError(f"unknown format {name!r}; choose one of {', '.join(f.name for f in FORMATS)}")


def format_names(command: str | None = None) -> tuple[str, ...]:
    """The formats (those one ``command`` makes, e.g. "btp export", when given)."""
    return tuple(f.name for f in FORMATS if command is None or f.command.startswith(command))


def formats_help() -> str:
    return "; ".join(f"{f.name} ({f.suffix}, `{f.command}`{', GPU' if f.gpu else ''}): {f.what}" for f in FORMATS)


def check_arguments(fmt: str, given) -> None:
    """ValueError when an option in ``given`` (flags set on the command line) does not apply to
    ``fmt``, naming the formats it applies to."""
    row = export_format(fmt)
    for flag in given:
        if flag not in row.arguments:
            owners = [f.name for f in FORMATS if flag in f.arguments]
            raise ValueError(f"{flag} does not apply to --format {fmt}; it applies to --format {' or '.join(owners)}")


def check_choice(fmt: str, flag: str, value: str) -> str:
    allowed = export_format(fmt).choices.get(flag, ())
    if value not in allowed:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    return value
