"""TensorRT engines from model.onnx: build, cache, precision policy (torch-free; the runtime
builds an engine on demand for ``--backend trt``, and ``btp build`` ahead of time).

``build_engine``: the TensorRT 10/11 Python API builds a serialized plan with an optimization
profile over the batch size, a timing cache and a precision policy, stored in an engine cache
keyed by GPU name + compute capability + TensorRT version + model hash + build options, with a
JSON manifest beside the plan. ``cached_engine`` never loads a plan whose manifest does not match
this GPU / TensorRT / model: it rebuilds (``check_cache``). (ONNX Runtime's TensorRT execution
provider, ``--backend ort-trt``, keeps its own engines.)

Precision (anchors.md): FP16 everywhere except LayerNorm (and its decomposed ops), Softmax,
normalisations, GFCM's frame and in-patch geometry (covariances, closed-form eigen-solves), and
the final scoring tail (everything downstream of ``patch_embed`` and the
top-level ops: text dot products, logits, sigmoid, top-k, object score) which stay FP32 -
``precision_plan``, a pure function of the ONNX graph. TensorRT 10 applies it as per-layer
precision with OBEY_PRECISION_CONSTRAINTS; TensorRT 11 (strongly typed only) needs the ONNX
itself in mixed precision: ``mixed_precision_onnx`` (onnxconverter-common) writes it.

Everything that needs TensorRT or a GPU imports it lazily; the rest (keys, manifests, cache
decisions, profiles, precision plan) is pure and unit-tested without them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from btp import contract
from btp.config import BTPConfig
from btp.errors import BTPError, NotAvailableError
from btp.io.files import file_sha256
from btp.runtime.metadata import META_KEY, parse_metadata

MANIFEST_FORMAT = "btp-trt-engine"
MANIFEST_SCHEMA = 1
PRECISIONS = ("fp32", "fp16", "int8")


class EngineBuildError(BTPError):
    """TensorRT could not parse or build the model (the message names the file and the step)."""


# ---- engine cache key and manifest -----------------------------------------------------------

def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "gpu"


@dataclass(frozen=True, kw_only=True)
class EngineKey:
    """Everything a serialized plan depends on. Two keys equal <=> the plan may be reused."""

    model_sha256: str
    gpu_name: str                 # e.g. "NVIDIA H100 80GB HBM3", "Orin (nvgpu)"
    compute_capability: str       # "9.0", "8.7"
    trt_version: str              # tensorrt.__version__, e.g. "10.3.0"
    precision: str                # "fp32" | "fp16" | "int8"
    batch: tuple[int, int, int]   # optimization profile over B: (min, opt, max)
    workspace_mb: int
    calib_sha256: str = ""        # int8 only: hash of the calibration cache/data

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}")
        lo, opt, hi = self.batch
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"batch profile {self.batch}: need 1 <= min <= opt <= max")

    def digest(self) -> str:
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def dirname(self) -> str:
        """Readable and unique: <gpu>-sm<cc>-trt<version>-<precision>-b<min>-<max>-<digest8>."""
        cc = self.compute_capability.replace(".", "")
        lo, _, hi = self.batch
        return f"{_slug(self.gpu_name)}-sm{cc}-trt{self.trt_version}-{self.precision}-b{lo}-{hi}-{self.digest()[:8]}"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EngineKey":
        data = dict(data)
        data["batch"] = tuple(int(b) for b in data["batch"])
        return cls(**data)


def engine_dir(cache_dir: str | os.PathLike, model_path: str | os.PathLike, key: EngineKey) -> Path:
    """<cache>/engines/<model stem>-<sha12>/<key.dirname()>/ (holds engine.plan + manifest.json)."""
    return Path(cache_dir) / "engines" / f"{Path(model_path).stem}-{key.model_sha256[:12]}" / key.dirname()


def timing_cache_path(cache_dir: str | os.PathLike, key: EngineKey) -> Path:
    """Timing caches are valid per GPU + TensorRT version, shared between models."""
    cc = key.compute_capability.replace(".", "")
    return Path(cache_dir) / "timing" / f"{_slug(key.gpu_name)}-sm{cc}-trt{key.trt_version}.cache"


def default_cache_dir() -> Path:
    """$BTP_CACHE_DIR/trt or ~/.cache/btp/trt."""
    from btp.kernels.build import cache_dir

    return cache_dir() / "trt"


def make_manifest(key: EngineKey, plan_bytes: bytes, *, profile: dict[str, Any], outputs: list[str],
                  fp32_layers: list[str], build_seconds: float, strongly_typed: bool) -> dict[str, Any]:
    """The JSON written beside engine.plan."""
    return {
        "format": MANIFEST_FORMAT,
        "schema": MANIFEST_SCHEMA,
        "key": dataclasses.asdict(key),
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "plan_bytes": len(plan_bytes),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(build_seconds, 2),
        "profile": {name: {k: list(v) for k, v in shapes.items()} for name, shapes in profile.items()},
        "outputs": list(outputs),
        "fp32_layers": list(fp32_layers),
        "strongly_typed": bool(strongly_typed),
    }


@dataclass(frozen=True)
class CacheDecision:
    """What to do with a cache slot: "load" the plan, or "build" it (reasons say why)."""

    action: str
    reasons: tuple[str, ...] = ()


_KEY_WORDS = {
    "model_sha256": "the model file changed",
    "gpu_name": "built on another GPU",
    "compute_capability": "built for another compute capability",
    "trt_version": "built with another TensorRT version",
    "precision": "built with another precision",
    "batch": "built for another batch profile",
    "workspace_mb": "built with another workspace limit",
    "calib_sha256": "built with other INT8 calibration data",
}


def check_cache(plan_path: str | os.PathLike, manifest_path: str | os.PathLike, key: EngineKey,
                verify_plan_hash: bool = True) -> CacheDecision:
    """Load only a plan whose manifest matches ``key`` field by field (and whose bytes match the
    manifest's hash); anything else - missing, unreadable, other GPU / TensorRT / model - builds."""
    plan_path, manifest_path = Path(plan_path), Path(manifest_path)
    if not plan_path.is_file():
        return CacheDecision("build", (f"no engine at {plan_path}",))
    if not manifest_path.is_file():
        return CacheDecision("build", (f"engine without manifest ({manifest_path} missing): not loaded blindly",))
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return CacheDecision("build", (f"manifest {manifest_path} unreadable: {exc}",))
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or manifest.get("schema") != MANIFEST_SCHEMA:
        return CacheDecision("build", (f"manifest {manifest_path}: not a {MANIFEST_FORMAT} v{MANIFEST_SCHEMA} manifest",))
    try:
        stored = EngineKey.from_dict(manifest["key"])
    except (KeyError, TypeError, ValueError) as exc:
        return CacheDecision("build", (f"manifest {manifest_path}: bad key ({exc})",))
    reasons = []
    for name, why in _KEY_WORDS.items():
        have, want = getattr(stored, name), getattr(key, name)
        if have != want:
            reasons.append(f"{why}: engine has {name}={have!r}, this run needs {want!r}")
    if not reasons and verify_plan_hash:
        if file_sha256(plan_path) != manifest.get("plan_sha256"):
            reasons.append(f"{plan_path} does not match the hash in its manifest (corrupt or replaced)")
    return CacheDecision("build", tuple(reasons)) if reasons else CacheDecision("load")


# ---- ONNX inputs, metadata and optimization profile -------------------------------------------

@dataclass(frozen=True)
class OnnxIO:
    """What the engine build needs to know about model.onnx (read without its weights)."""

    inputs: dict[str, list[int | str]]  # name -> dims (int, or a symbolic name for dynamic axes)
    outputs: list[str]
    meta: dict[str, Any] = field(default_factory=dict)  # metadata_props["btp"] parsed


def read_onnx_io(model_path: str | os.PathLike) -> OnnxIO:
    """Input dims, output names and the btp metadata of model.onnx (weights not loaded)."""
    import onnx

    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX model (export one with `btp export`)")
    model = onnx.load(str(path), load_external_data=False)
    init_names = {init.name for init in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in init_names:
            continue
        dims = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?"))
        inputs[value.name] = dims
    props = {p.key: p.value for p in model.metadata_props}
    meta = parse_metadata(props[META_KEY], path).raw if META_KEY in props else {}
    return OnnxIO(inputs, [o.name for o in model.graph.output], meta)


def profile_shapes(io: OnnxIO, batch: tuple[int, int, int]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Optimization profile {input: {"min"|"opt"|"max": shape}} over the batch dimension.

    The inputs and their shapes are btp.contract's (neighborhood [B, G, K, C], center [B, G, 3])
    with G, K, C from the model's metadata; static dims in the ONNX graph must agree with them, the
    batch dim may be symbolic or fixed (then the profile must be that one size).
    """
    config = io.meta.get("config") if io.meta else None
    if not config:
        raise ValueError("model.onnx has no btp metadata (metadata_props['btp'].config): export it with `btp export`")
    cfg = BTPConfig.from_dict(config)
    expected = {t.name: t.dims(cfg)[1:] for t in contract.inputs()}
    missing = [name for name in expected if name not in io.inputs]
    if missing:
        raise ValueError(f"model.onnx lacks inputs {missing}; it has {sorted(io.inputs)} (expected {list(expected)})")
    lo, opt, hi = batch
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"batch profile {batch}: need 1 <= min <= opt <= max")
    profile = {}
    for name in expected:
        dims = io.inputs[name]
        if len(dims) != len(expected[name]) + 1:
            raise ValueError(f"input {name}: rank {len(dims)}, expected {len(expected[name]) + 1} ([B, ...])")
        for got, want in zip(dims[1:], expected[name]):
            if isinstance(got, int) and got > 0 and got != want:
                raise ValueError(f"input {name}: dims {dims} disagree with the config's {['B', *expected[name]]}")
        if isinstance(dims[0], int) and dims[0] > 0 and (lo, hi) != (dims[0], dims[0]):
            raise ValueError(f"input {name}: batch fixed to {dims[0]} in the graph; re-export with a dynamic batch "
                             f"or use --min-batch/--max-batch {dims[0]}")
        rest = tuple(expected[name])
        profile[name] = {"min": (lo, *rest), "opt": (opt, *rest), "max": (hi, *rest)}
    return profile


# ---- precision policy --------------------------------------------------------------------------

# ONNX op types (and TensorRT layer types, for the weakly typed route) kept in FP32: LayerNorm and
# its decomposed pieces, softmax, L2 normalisation, and the scoring nonlinearities.
FP32_OP_TYPES = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceL2", "ReduceSumSquare",
    "LpNormalization", "Pow", "Sqrt", "Reciprocal", "Sigmoid", "TopK",
    "NORMALIZATION", "SOFTMAX", "REDUCE", "TOPK",
})
# LayerNorm modules by their exported names: /point_encoder/norm/..., /blocks.3/norm1/...
_NORM_SCOPE = re.compile(r"(^|[/.])(norm\d*|ln_?\w*|layer_?norm\w*)([/.]|$)", re.IGNORECASE)
# ops at the model's top level (no submodule path below the model's own scope): torch.onnx names
# them "<scope>/MatMul_3", "<scope>/Sigmoid" (scope "/inner/" in btp.export.onnx's graphs); in
# BTPModel.forward these are the scoring tail (text dot products, logits, top-k, object score)
_ROOT_OP = re.compile(r"[A-Za-z0-9]+(_\d+)?")
SCORING_TENSORS = ("patch_embed",)
# the MGFEM fusion head (/mgfem/... in the exported graph): it produces the unnormalised patch
# embedding that the text dot product amplifies; in FP16 its rounding alone moved full-size patch
# probabilities past the FP16 tolerance (benchmarks/results/fp16-btp3dad-*.md)
_HEAD_SCOPE = re.compile(r"(^|/)mgfem[/.]")
# ops directly in GFCM's scope (/gfcm/Mul_3, not /gfcm/convs/...): the local frame's and the
# in-patch geometry's covariances and closed-form 3x3 eigen-solves (acos/cos of near-equal
# eigenvalues, cubes of small scales) and the context's center distances. FP16's 11-bit mantissa
# and 6e-5 smallest normal put them at risk (not measured on TensorRT here); they are small
# element-wise ops, so FP32 costs little.
_GEOMETRY_OP = re.compile(r"(^|/)gfcm/[A-Za-z][^/]*$")


def common_scope(names: Iterable[str]) -> str:
    """The module scope every scoped node name shares ("/inner/" for btp.export.onnx graphs,
    "/" for a plain torch.onnx export); names without a "/" are ignored. Pure."""
    scopes = [name[:name.rindex("/") + 1] for name in names if "/" in name]
    if not scopes:
        return ""
    prefix = os.path.commonprefix(scopes)
    return prefix[:prefix.rindex("/") + 1] if "/" in prefix else ""


@dataclass(frozen=True, kw_only=True)
class LayerPrecision:
    name: str
    op_type: str
    precision: str  # "fp32" | "fp16"
    reason: str


def precision_policy(layers: Iterable[tuple[str, str]], scoring_tail: Iterable[str] = (),
                     root_scope: str | None = None, root_ops: bool = True) -> list[LayerPrecision]:
    """FP16 with LayerNorm/Softmax/normalisation, GFCM's frame and geometry ops, the MGFEM head
    and the scoring kept FP32. Pure.

    layers: (name, op_type) pairs - ONNX node names and op types, or TensorRT layer names and
    LayerType names. scoring_tail: names kept FP32 as the scoring tail (``scoring_tail``: nodes
    downstream of ``patch_embed``; for TensorRT layers, the FP32 node names of ``precision_plan``),
    because cosine-similarity heads amplify small errors. root_scope: the model's own scope
    (default: ``common_scope`` of the names); with ``root_ops`` ops directly in it are the
    scoring tail too.
    """
    layers = list(layers)
    tail = set(scoring_tail)
    root = common_scope(name for name, _ in layers) if root_scope is None else root_scope
    out = []
    for name, op_type in layers:
        if op_type in FP32_OP_TYPES:
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32",
                                      reason=f"{op_type} is FP16-sensitive"))
        elif _NORM_SCOPE.search(name):
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32",
                                      reason="inside a LayerNorm/normalisation"))
        elif _HEAD_SCOPE.search(name):
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32",
                                      reason="MGFEM fusion head (feeds the scoring)"))
        elif _GEOMETRY_OP.search(name):
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32",
                                      reason="GFCM frame / geometry (covariances, eigen-solves)"))
        elif name in tail:
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32",
                                      reason="scoring tail (after patch_embed)"))
        elif root_ops and name.startswith(root) and "/" in name and _ROOT_OP.fullmatch(name[len(root):]):
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp32", reason="top-level op (scoring)"))
        else:
            out.append(LayerPrecision(name=name, op_type=op_type, precision="fp16", reason="default"))
    return out


def scoring_tail(nodes: Iterable[tuple[str, list[str], list[str]]], start_tensors=SCORING_TENSORS) -> set[str]:
    """Names of the nodes downstream of ``start_tensors``: nodes as (name, inputs, outputs),
    in any order. Pure graph walk."""
    nodes = list(nodes)
    reached = set(start_tensors)
    tail: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, inputs, outputs in nodes:
            if name not in tail and reached.intersection(inputs):
                tail.add(name)
                reached.update(outputs)
                changed = True
    return tail


def graph_precision_plan(graph) -> list[LayerPrecision]:
    """``precision_policy`` over an ONNX graph's nodes (with the scoring tail found in it)."""
    names = [node.name or f"{node.op_type}_{i}" for i, node in enumerate(graph.node)]
    tail = scoring_tail((n, list(node.input), list(node.output)) for n, node in zip(names, graph.node))
    return precision_policy(((n, node.op_type) for n, node in zip(names, graph.node)), tail)


def precision_plan(model_path: str | os.PathLike) -> list[LayerPrecision]:
    """``graph_precision_plan`` of model.onnx."""
    import onnx

    return graph_precision_plan(onnx.load(str(model_path), load_external_data=False).graph)


def mixed_precision_onnx(model_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """TensorRT 11 route (strong typing): write an FP16 copy of the model with the FP32 nodes of
    ``precision_plan`` kept FP32 and FP32 inputs/outputs. Needs onnxconverter-common."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise NotAvailableError("TensorRT 11 builds FP16 only from a mixed-precision ONNX; that needs "
                                "onnxconverter-common (pip install onnxconverter-common), or build --fp32") from None
    import onnx

    keep = [p.name for p in precision_plan(model_path) if p.precision == "fp32"]
    model = onnx.load(str(model_path))
    converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    onnx.save(converted, str(out_path))
    return Path(out_path)


# ---- ONNX Runtime TensorRT execution provider ------------------------------------------------------

# ---- TensorRT (lazy) -----------------------------------------------------------------------------------

def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot build/run here (None when it can)."""
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        return (f"TensorRT's Python package is not importable ({exc}); install the tensorrt wheel that "
                f"matches the CUDA driver (pip install 'btp-edge[gpu]', or JetPack's python3-libnvinfer)")
    except OSError as exc:
        return f"TensorRT's libraries (libnvinfer) are missing: {exc}"
    from btp.kernels.devices import gpu_unavailable_reason

    return gpu_unavailable_reason()


def import_tensorrt():
    reason = tensorrt_unavailable_reason()
    if reason:
        raise NotAvailableError(reason)
    import tensorrt as trt

    return trt


def current_gpu() -> tuple[str, str]:
    """(name, compute capability "M.m") of CUDA device $BTP_CUDA_DEVICE (default 0)."""
    from btp.kernels.devices import gpu_identity

    return gpu_identity(int(os.environ.get("BTP_CUDA_DEVICE", "0")))


def strongly_typed_only(trt) -> bool:
    """TensorRT 11 removed BuilderFlag.FP16 (every network is strongly typed)."""
    return not hasattr(trt.BuilderFlag, "FP16")


@dataclass(frozen=True, kw_only=True)
class BuildResult:
    plan_path: Path
    manifest_path: Path
    built: bool          # False: a matching cached engine was reused
    seconds: float
    reasons: tuple[str, ...]


def engine_key_for(model_path: str | os.PathLike, precision: str, batch: tuple[int, int, int],
                   workspace_mb: int, calib_dir: str | os.PathLike | None = None) -> EngineKey:
    """The key of this GPU + TensorRT + model + options (needs TensorRT and a GPU)."""
    trt = import_tensorrt()
    gpu_name, cc = current_gpu()
    calib = ""
    if calib_dir is not None:
        h = hashlib.sha256()
        for f in sorted(Path(calib_dir).glob("*.npz")):
            h.update(f.name.encode() + file_sha256(f).encode())
        calib = h.hexdigest()[:16]
    return EngineKey(model_sha256=file_sha256(model_path), gpu_name=gpu_name, compute_capability=cc,
                     trt_version=trt.__version__, precision=precision, batch=tuple(batch),
                     workspace_mb=int(workspace_mb), calib_sha256=calib)


def cached_engine(model_path: str | os.PathLike, *, precision: str = "fp16", batch=(1, 1, 4),
                  workspace_mb: int = 2048, cache_dir: str | os.PathLike | None = None,
                  calib_dir: str | os.PathLike | None = None, force: bool = False, log=print) -> BuildResult:
    """The engine.plan for this model on this GPU/TensorRT: reused when its manifest matches,
    built (and cached) otherwise. ``log`` receives one line per decision."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = engine_key_for(model_path, precision, batch, workspace_mb, calib_dir)
    slot = engine_dir(cache_dir, model_path, key)
    plan_path, manifest_path = slot / "engine.plan", slot / "manifest.json"
    decision = CacheDecision("build", ("--force",)) if force else check_cache(plan_path, manifest_path, key)
    if decision.action == "load":
        log(f"engine cache hit: {plan_path}")
        return BuildResult(plan_path=plan_path, manifest_path=manifest_path, built=False, seconds=0.0, reasons=())
    for reason in decision.reasons:
        log(f"building engine: {reason}")
    start = time.perf_counter()
    plan, manifest_extra = build_engine(model_path, key, timing_cache_path(cache_dir, key), calib_dir=calib_dir, log=log)
    seconds = time.perf_counter() - start
    slot.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(plan)
    os.replace(tmp, plan_path)
    manifest = make_manifest(key, plan, build_seconds=seconds, **manifest_extra)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return BuildResult(plan_path=plan_path, manifest_path=manifest_path, built=True, seconds=seconds,
                       reasons=decision.reasons)


class TrtLogger:
    """TensorRT logger forwarding warnings and errors to ``log``."""

    def __new__(cls, trt, log):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                # pybind enums compare reliably as ints: INTERNAL_ERROR 0 < ERROR 1 < WARNING 2 < INFO 3
                if int(severity) <= int(trt.ILogger.Severity.WARNING):
                    log(f"TensorRT {getattr(severity, 'name', severity)}: {msg}")

        return Logger()


def model_precision(model_path) -> str:
    """The precision a model.onnx was exported in (metadata export.precision.mode; fp32 without it)."""
    return read_onnx_io(model_path).meta.get("export", {}).get("precision", {}).get("mode", "fp32")


def build_engine(model_path: str | os.PathLike, key: EngineKey, timing_cache: Path, *,
                 calib_dir: str | os.PathLike | None = None, log=print) -> tuple[bytes, dict[str, Any]]:
    """Parse model.onnx and build a serialized plan for ``key`` (TensorRT 10 or 11).

    Returns (plan bytes, manifest fields). Raises EngineBuildError naming the step that failed.
    """
    trt = import_tensorrt()
    io = read_onnx_io(model_path)
    profile = profile_shapes(io, key.batch)
    strong = strongly_typed_only(trt)
    source = Path(model_path)
    if strong and key.precision == "fp16":
        source = mixed_precision_onnx(model_path, Path(timing_cache).parent / f"{source.stem}.{key.model_sha256[:12]}.fp16.onnx")
    explicit = key.precision == "int8" and model_precision(model_path) == "int8"  # Q/DQ nodes from btp-export
    if strong and key.precision == "int8" and not explicit:
        raise NotAvailableError("INT8 on TensorRT 11 needs explicit quantization (Q/DQ nodes, e.g. NVIDIA ModelOpt) "
                                "in the ONNX; implicit calibration (--int8 --calib) exists only up to TensorRT 10")
    logger = TrtLogger(trt, log)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") and strong:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(source)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{source}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, key.workspace_mb << 20)
    opt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt_profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(opt_profile)

    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    fp32_layers: list[str] = []
    if not strong and key.precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        layers = [network.get_layer(i) for i in range(network.num_layers)]
        # the parser names layers after ONNX nodes: pin the FP32 nodes of the ONNX-level plan by
        # name, plus the sensitive layer types (no scope rule: TensorRT adds layers of its own names)
        onnx_fp32 = {p.name for p in precision_plan(model_path) if p.precision == "fp32"}
        policy = precision_policy(((layer.name, layer.type.name) for layer in layers), onnx_fp32, root_ops=False)
        floats = (trt.float32, trt.float16)
        for layer, decision in zip(layers, policy):
            float_outputs = [i for i in range(layer.num_outputs) if layer.get_output(i).dtype in floats]
            if decision.precision == "fp32" and float_outputs:  # shape/int layers have no precision to pin
                layer.precision = trt.float32
                for i in float_outputs:
                    layer.set_output_type(i, trt.float32)
                fp32_layers.append(layer.name)
    if not strong and explicit:  # the graph's own Q/DQ scales: no calibrator
        config.set_flag(trt.BuilderFlag.INT8)
    elif not strong and key.precision == "int8":
        if calib_dir is None:
            raise ValueError("--int8 needs --calib DIR (npz files with neighborhood/center from `btp calibrate`)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _make_calibrator(trt, calib_dir, profile, Path(timing_cache).parent / f"{key.digest()}.calib")
        config.set_calibration_profile(opt_profile)
    log(f"building {key.precision} engine for {key.gpu_name} (sm {key.compute_capability}, TensorRT "
        f"{key.trt_version}, batch {key.batch}) - this takes a while the first time")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"{model_path}: TensorRT could not build the engine (see the TensorRT errors above)")
    timing_cache.write_bytes(bytes(cache.serialize()))
    extra = {"profile": profile, "outputs": io.outputs, "fp32_layers": fp32_layers, "strongly_typed": strong}
    return bytes(plan), extra


def _make_calibrator(trt, calib_dir, profile, cache_file: Path):
    """IInt8EntropyCalibrator2 over calib_dir/*.npz (arrays `neighborhood` [B,G,K,C], `center` [B,G,3])."""
    import numpy as np

    from btp.kernels.devices import open_device

    files = sorted(Path(calib_dir).glob("*.npz"))
    if not files:
        raise ValueError(f"{calib_dir}: no .npz calibration batches (arrays neighborhood, center)")
    max_shapes = {name: shapes["max"] for name, shapes in profile.items()}

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.files = list(files)
            self.device = open_device("auto")
            self.buffers = {n: self.device.empty(s, np.float32) for n, s in max_shapes.items()}
            self.batch = 1

        def get_batch_size(self):
            return self.batch

        def get_batch(self, names):
            if not self.files:
                return None
            data = np.load(self.files.pop(0))
            for name in names:
                self.device.upload(np.ascontiguousarray(data[name], dtype=np.float32), out=self.buffers[name])
            self.device.synchronize()
            return [self.device.pointer(self.buffers[n]) for n in names]

        def read_calibration_cache(self):
            return cache_file.read_bytes() if cache_file.is_file() else None

        def write_calibration_cache(self, cache):
            cache_file.write_bytes(bytes(cache))

    return Calibrator()
