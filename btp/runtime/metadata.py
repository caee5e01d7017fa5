"""The one JSON document a btp model.onnx carries in ``metadata_props["btp"]`` (torch-free).

    {"format": "btp-onnx", "format_version": 1,
     "config": BTPConfig.to_dict(),                     # G, K, N, C, scoring, preprocessing ...
     "model": {"name", "version", "weights_sha256", "source", "text_prompts", "fresh_init"},
     "provenance": {...},                               # training data / commit / conversion, as saved
     "export": {"opset", "batch", "fp16_safe", "simplified", "torch", "exported_at", "btp_version",
                "precision": {"mode": fp32|int8|bf16, "kept_fp32", "gate", ...}},   # btp.export.precision
     "io": {"inputs": {name: {"shape", "dtype"}}, "outputs": {...}}}

The exporter writes it (``build_metadata``), the runtime reads it (``read_model_meta``): no flag
has to be matched by hand between the two.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btp import contract
from btp.config import BTPConfig
from btp.errors import BTPError

META_KEY = "btp"
FORMAT = "btp-onnx"
FORMAT_VERSION = 1


def output_names(cfg: BTPConfig, optional=()) -> tuple[str, ...]:
    """The graph's outputs, in order, for a model of this config (``optional``: the requested
    optional outputs, ``btp.contract.optional_outputs``)."""
    return tuple(t.name for t in contract.graph_outputs(cfg, optional))


class ModelMetadataError(BTPError, ValueError):
    """model.onnx is missing, not a btp export, or its metadata JSON does not parse."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, kw_only=True)
class ModelMeta:
    """What the runtime knows about a model.onnx, all from its metadata."""

    config: BTPConfig
    model: dict[str, Any]
    provenance: dict[str, Any]
    export: dict[str, Any]
    io: dict[str, Any]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    # the numbers the pipeline needs, named as in docs/design.md
    @property
    def num_points(self) -> int:  # N
        return self.config.preprocess.num_points

    @property
    def num_group(self) -> int:  # G
        return self.config.encoder.num_group

    @property
    def group_size(self) -> int:  # K
        return self.config.encoder.group_size

    @property
    def in_channels(self) -> int:  # C
        return self.config.encoder.in_channels

    @property
    def batch(self) -> int | None:
        """Fixed batch size of the graph, or None for a dynamic batch axis."""
        b = self.export.get("batch", "dynamic")
        return None if b == "dynamic" else int(b)

    @property
    def precision(self) -> str:  # fp32 | int8 | bf16 (btp-export --precision)
        return self.export.get("precision", {}).get("mode", "fp32")

    @property
    def name(self) -> str:
        return str(self.model.get("name", self.config.name))


def io_spec(cfg: BTPConfig, batch: str | int, optional=()) -> dict[str, Any]:
    """Input/output names, shapes (symbolic "B" for a dynamic batch) and dtypes of the graph."""
    b = "B" if batch == "dynamic" else int(batch)

    def spec(rows) -> dict[str, Any]:
        return {t.name: {"shape": t.dims(cfg, b), "dtype": t.dtype} for t in rows}

    return {"inputs": spec(contract.inputs()), "outputs": spec(contract.graph_outputs(cfg, optional))}


def build_metadata(cfg: BTPConfig, *, model: dict[str, Any], provenance: dict[str, Any],
                   export: dict[str, Any], optional=()) -> dict[str, Any]:
    """The metadata document (a plain dict; ``json.dumps`` it into ``metadata_props[META_KEY]``)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "model": dict(model),
        "provenance": dict(provenance),
        "export": dict(export),
        "io": io_spec(cfg, export.get("batch", "dynamic"), optional),
    }


def parse_metadata(text: str, path: str | Path = "<model.onnx>") -> ModelMeta:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelMetadataError(path, f"metadata_props[{META_KEY!r}] is not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ModelMetadataError(path, f"metadata_props[{META_KEY!r}] is not a {FORMAT} document")
    version = doc.get("format_version", 0)
    if not _is_integer(version) or version < 0:
        raise ModelMetadataError(path, f"metadata format_version = {version!r}: expected a whole number; {_RE_EXPORT}")
    if version > FORMAT_VERSION:
        raise ModelMetadataError(path, f"metadata format_version {doc.get('format_version')} is newer than this "
                                       f"btp-edge reads ({FORMAT_VERSION}): upgrade btp-edge")
    check_numbers(doc.get("config"), path)
    try:
        cfg = BTPConfig.from_dict(doc["config"]).validate()
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelMetadataError(path, f"bad config in metadata: {exc}") from exc
    parts = {}
    for key in ("model", "provenance", "export", "io"):
        value = doc.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ModelMetadataError(path, f"metadata {key!r} is {type(value).__name__}, expected an object")
        parts[key] = value
    batch = parts["export"].get("batch", "dynamic")
    if batch != "dynamic" and not (_is_integer(batch) and 1 <= batch <= MAX_FIXED_BATCH):
        raise ModelMetadataError(path, f"metadata export.batch = {batch!r}: expected \"dynamic\" or a whole number "
                                       f"in [1, {MAX_FIXED_BATCH}]; {_RE_EXPORT}")
    precision = parts["export"].get("precision", {"mode": "fp32"})
    if not isinstance(precision, dict) or precision.get("mode") not in contract.PRECISIONS:
        mode = precision.get("mode") if isinstance(precision, dict) else precision
        raise ModelMetadataError(path, f"metadata export.precision's mode = {mode!r}: expected one of "
                                       f"{', '.join(contract.PRECISIONS)}; {_RE_EXPORT}")
    return ModelMeta(config=cfg, model=parts["model"], provenance=parts["provenance"], export=parts["export"],
                     io=parts["io"], raw=doc)


# The numbers of the config the runtime reads, with the range a real model has them in:
# "dotted.key": (low, high, whole number?). Every other number of the config must be finite.
# A model file with a number outside these was edited or damaged (an N of 1e9 would silently
# score every scan without downsampling), so it is refused at load.
MAX_FIXED_BATCH = 4096
CONFIG_RANGES: dict[str, tuple[float, float, bool]] = {
    "preprocess.num_points": (1, 1 << 17, True),
    "preprocess.fps_start": (0, (1 << 17) - 1, True),
    "preprocess.downsample_seed": (0, 2 ** 32 - 1, True),
    "preprocess.voxel_reps": (1, 64, True),
    "preprocess.rgb_fill": (0.0, 1.0, False),
    "encoder.num_group": (1, 1 << 13, True),
    "encoder.group_size": (1, 1 << 10, True),
    "encoder.in_channels": (3, 6, True),
    "scoring.object_alpha": (0.0, 1.0, False),
    "scoring.top_ratio": (0.0, 1.0, False),
    "scoring.point_threshold": (0.0, 1.0, False),
    "scoring.global_temperature": (1e-6, 1e6, False),
}
_RE_EXPORT = "the model file was edited or damaged: export it again with btp-export"


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_numbers(config, path: str | Path) -> None:
    """ModelMetadataError unless every number of the metadata's config is finite and those the
    runtime reads lie in ``CONFIG_RANGES`` (whole numbers where they count something)."""
    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{key}.{name}" if key else str(name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ModelMetadataError(path, f"metadata config.{key} = {value}: expected a finite number; {_RE_EXPORT}")

    if not isinstance(config, dict):
        return  # BTPConfig.from_dict says what is wrong
    walk(config, "")
    for key, (low, high, whole) in CONFIG_RANGES.items():
        section, _, name = key.partition(".")
        part = config.get(section)
        if not isinstance(part, dict) or name not in part:
            continue  # the config's default applies
        value = part[name]
        number = _is_integer(value) or (isinstance(value, float) and not whole)
        if not number or not low <= value <= high:
            kind = "a whole number" if whole else "a number"
            raise ModelMetadataError(path, f"metadata config.{key} = {value!r}: expected {kind} in [{low}, {high}]; "
                                           f"{_RE_EXPORT}")


def read_model_meta(path: str | Path) -> ModelMeta:
    """Read ``metadata_props["btp"]`` of a model.onnx (the graph's weights are not needed for it)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelMetadataError(path, "no such model file; make one with `btp-export --out model.onnx`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError / google.protobuf errors
        raise ModelMetadataError(path, f"not an ONNX model ({type(exc).__name__}: {exc})") from exc
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise ModelMetadataError(path, f"no metadata_props[{META_KEY!r}]: this ONNX file was not made by btp-export")
    meta = parse_metadata(props[META_KEY], path)
    check_graph_io(proto.graph, meta, path)
    return meta


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value.type.tensor_type.shape.dim]


def check_graph_io(graph, meta: ModelMeta, path: str | Path) -> None:
    """The graph must take and give what its metadata's config says (``btp.contract``): every
    input, every output the runtime requires (patch_probs, object_score; patch_point_probs for a
    model with per-point scores), and any other contract output it has, each with every fixed dim
    equal to the config's (a model whose metadata says G = 128 but whose graph has 256 is refused)."""
    cfg = meta.config
    init = {i.name for i in graph.initializer}
    have = {"input": {v.name: _dims(v) for v in graph.input if v.name not in init},
            "output": {v.name: _dims(v) for v in graph.output}}
    for row in contract.inputs() + contract.model_outputs(cfg):
        got = have[row.role].get(row.name)
        if got is None:
            if row.runtime == "required":
                raise ModelMetadataError(path, f"the graph has no {row.role} {row.name!r} (it has "
                                               f"{sorted(have[row.role])}): not a btp model, or a damaged one; "
                                               "export it again with btp-export")
            continue
        dims = row.dims(cfg, meta.batch)
        if len(got) != len(dims) or any(isinstance(a, int) and a > 0 and b is not None and a != b
                                        for a, b in zip(got, dims)):
            shown = ["B" if d is None else d for d in dims]
            g, k, c = meta.num_group, meta.group_size, meta.in_channels
            raise ModelMetadataError(path, f"graph {row.role} {row.name!r} has shape {got}, but the metadata's config "
                                           f"(G={g}, K={k}, C={c}) says {shown}: the metadata does not belong "
                                           "to this graph; export it again with btp-export")
