"""A btp checkpoint -> one self-describing model.onnx.

The graph holds everything after grouping: mini-PointNet, transformer, GFCM, MGFEM, the global
head and the scoring against the text embeddings, which are frozen into initializers
(``BTPModel.freeze_text``). FPS, kNN, gather and score propagation stay outside (btp.geometry /
btp.kernels), as in CUDA-PointPillars.

    inputs   neighborhood float32 [B, G, K, C], center float32 [B, G, 3]
    outputs  patch_logits [B, G], patch_probs [B, G], global_prob [B], object_score [B]
             (+ patch_point_probs [B, G, K] for a model with per-point scores, + the requested
             optional outputs, e.g. patch_embed [B, G, D]: the table in btp.contract)
    metadata metadata_props["btp"] = one JSON document (btp.runtime.metadata)

``export_onnx`` traces (TorchScript exporter, constant folding), checks (``onnx.checker`` full
check + strict shape inference), optionally simplifies (onnxslim), writes the metadata, and
verifies parity with PyTorch on real sampled shapes *before* the file appears at ``out``
(temp file + ``os.replace``): no model.onnx that failed its checks is left behind.

The trace runs with ``btp.export.rewrite.split_concat_conv``: the mini-PointNet's concat conv is
split so its global half runs once per patch (-10% FLOPs; the model and its weights unchanged,
``export.rewrites`` in the metadata lists it).
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

import btp
from btp import contract
from btp.config import DEFAULT_MODEL_NAME, PRESETS, BTPConfig, preset
from btp.errors import BTPError
from btp.export.formats import check_batch, check_opset
from btp.geometry.prepare import pad_batch
from btp.io.files import atomic_write_bytes, file_sha256
from btp.io.locations import model_search_paths
from btp.runtime.metadata import META_KEY, build_metadata, output_names

DEFAULT_MODEL = DEFAULT_MODEL_NAME
TRT_OPS_FILE = Path(__file__).with_name("trt_onnx_ops.txt")
PARITY_ATOL = 1e-4  # max abs diff of probabilities and object score in FP32
FP16_MAX = 65504.0


class ExportError(BTPError, RuntimeError):
    """The export failed a check (checker, shape inference, parity); the message says which and why."""


@dataclass
class LoadedModel:
    """A frozen-text BTPModel in eval mode and what the metadata says about it."""

    model: Any  # btp.model.BTPModel
    info: dict[str, Any]  # name, version, source, weights_sha256, fresh_init, text_prompts
    provenance: dict[str, Any]


# ---- the model -----------------------------------------------------------------------------

def state_sha256(model) -> str:
    """sha256 over the model's tensors (sorted names, raw float bytes): the weights' identity in memory."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        if key.startswith("text_encoder."):
            continue
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _finish_model(model, info: dict, provenance: dict) -> LoadedModel:
    if not model.is_text_frozen:
        model.freeze_text(drop_encoder=True)  # the exported form: text embeddings as constants
    model.text_encoder = None
    model.eval()
    info.setdefault("name", model.cfg.name)
    info.setdefault("version", model.cfg.version)
    info["text_prompts"] = list(model.prompt_texts)
    info["text_encoder"] = model.cfg.text.kind
    info["weights_sha256"] = info.get("weights_sha256") or state_sha256(model)
    return LoadedModel(model, info, provenance)


def fresh_model(cfg: BTPConfig, seed: int = 0) -> LoadedModel:
    """A freshly initialised model (torch seed ``seed``) with its text embeddings frozen. UNTRAINED:
    its scores carry no meaning; every output that uses it says so (``fresh_init``)."""
    import torch

    from btp.model import BTPModel

    torch.manual_seed(seed)
    model = BTPModel.with_default_text_encoder(cfg)
    info = {"source": f"fresh init (torch seed {seed}, untrained)", "fresh_init": True, "seed": seed}
    provenance = {"weights": f"freshly initialised {cfg.name}, torch seed {seed}: untrained, scores carry no meaning"}
    return _finish_model(model, info, provenance)


def load_model(spec: str | Path = DEFAULT_MODEL, *, seed: int = 0) -> LoadedModel:
    """``spec``: a checkpoint path (.safetensors), or a preset name (``btp-mini``, ``tiny``, ``ulip2``).

    A preset name loads its weights from $BTP_MODELS/<name>.safetensors or the package's own
    btp/assets/models/<name>.safetensors (btp.io.locations) when they exist and falls back to a freshly initialised model of that preset otherwise (``info["fresh_init"]``).
    """
    from btp.model.checkpoint import load_checkpoint

    spec_str = str(spec)
    if spec_str in PRESETS and not Path(spec_str).exists():
        found = next((p for p in model_search_paths(spec_str) if p.is_file()), None)
        if found is None:
            return fresh_model(preset(spec_str), seed)
        path = found
    else:
        path = Path(spec_str)
        if not path.is_file():
            raise ExportError(f"{path}: no such checkpoint; pass a .safetensors file from `btp train` / "
                              f"`btp convert`, or a preset name ({', '.join(sorted(PRESETS))})")
    model, provenance = load_checkpoint(path)
    info = {"source": str(path.name), "weights_sha256": file_sha256(path), "fresh_init": False}
    return _finish_model(model, info, provenance)


# ---- the graph -----------------------------------------------------------------------------

def _export_graph(model, optional=()):
    import torch

    names = output_names(model.cfg, optional)

    class ExportGraph(torch.nn.Module):
        """BTPModel.forward with its dict flattened to the ONNX outputs, in a fixed order."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, neighborhood, center):
            out = self.inner(neighborhood, center)
            return tuple(out[name] for name in names)

    return ExportGraph(model).eval(), names


def trace_to_onnx(model, example: tuple[np.ndarray, np.ndarray], *, opset: int, batch: str | int,
                  optional=(), rewrite: bool = True):
    """torch -> onnx.ModelProto (TorchScript exporter, constant folding; B symbolic when dynamic);
    ``optional``: the optional outputs (btp.contract) the graph also gives.

    ``rewrite``: trace with the mini-PointNet's concat conv split (btp.export.rewrite: the global
    half once per patch, -10% FLOPs); the model itself is left unchanged."""
    import onnx
    import torch

    from btp.export.rewrite import split_concat_conv

    graph, names = _export_graph(model, optional)
    neighborhood, center = (torch.from_numpy(np.ascontiguousarray(a)) for a in example)
    dynamic_axes = None
    if batch == "dynamic":
        dynamic_axes = {name: {0: "B"} for name in contract.input_names() + names}
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings(), split_concat_conv(model) if rewrite else nullcontext():
        # torch >= 2.9 calls the TorchScript exporter "legacy"; the dynamo one needs onnxscript and
        # gives no better graph for this model. Its deprecation notes are not the user's business.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(graph, (neighborhood, center), buf, dynamo=False, opset_version=opset,
                          input_names=list(contract.input_names()), output_names=list(names), dynamic_axes=dynamic_axes,
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def check_graph(proto):
    """``onnx.checker`` (full) + strict shape inference; every output must get a typed shape."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported graph does not pass onnx.checker / shape inference: {exc}") from exc
    for out in inferred.graph.output:
        if not out.type.tensor_type.HasField("shape") or not out.type.tensor_type.shape.dim:
            raise ExportError(f"output {out.name!r} has no inferred shape after shape inference")
    return inferred


def _onnxslim_version() -> str:
    from importlib.metadata import version

    return version("onnxslim")


def simplify_graph(proto):
    """onnxslim (constant folding, dead-node and shape-op clean-up); returns the simplified proto."""
    import onnxslim

    return onnxslim.slim(proto)


def op_types(proto) -> set[tuple[str, str]]:
    """{(domain, op_type)} of every node (domain "ai.onnx" for the default one)."""
    return {(node.domain or "ai.onnx", node.op_type) for node in proto.graph.node}


def trt_supported_ops() -> frozenset[str]:
    """ONNX ops TensorRT's parser supports (btp/export/trt_onnx_ops.txt, source noted there)."""
    lines = TRT_OPS_FILE.read_text().splitlines()
    return frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))


def unsupported_trt_ops(proto) -> list[str]:
    """Ops of the graph TensorRT cannot parse (custom domains count as unsupported)."""
    supported = trt_supported_ops()
    return sorted(f"{d}::{op}" if d != "ai.onnx" else op for d, op in op_types(proto)
                  if d != "ai.onnx" or op not in supported)


def fp16_report(proto) -> dict[str, Any]:
    """What TensorRT FP16 needs to know: the nodes to keep FP32 (btp.runtime.tensorrt's one
    precision policy: LayerNorm, softmax, normalisation, the scoring head) and a range check."""
    from onnx import numpy_helper

    from btp.runtime.tensorrt import FP32_OP_TYPES, graph_precision_plan

    nodes = proto.graph.node
    plan = graph_precision_plan(proto.graph)
    out_of_range = []
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f" and arr.size and float(np.abs(arr).max()) > FP16_MAX:
            out_of_range.append(init.name)
    if not any(node.op_type == "LayerNormalization" for node in nodes):
        raise ExportError("--fp16-safe: the graph has no LayerNormalization op (decomposed into "
                          "ReduceMean/Pow/...), so TensorRT cannot keep it FP32; export with opset >= 17")
    if out_of_range:
        raise ExportError(f"--fp16-safe: initializers exceed the FP16 range ({FP16_MAX}): {out_of_range[:5]}")
    keep = [p for p in plan if p.precision == "fp32"]
    return {"keep_fp32_ops": sorted(op for op in FP32_OP_TYPES if not op.isupper()),
            "keep_fp32_nodes": [p.name for p in keep], "keep_fp32_reasons": dict(Counter(p.reason for p in keep))}


def set_metadata(proto, metadata: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(metadata, sort_keys=True)
    proto.producer_name = "btp-edge"
    proto.producer_version = btp.__version__ if hasattr(btp, "__version__") else "0"
    proto.doc_string = (f"BTP zero-shot 3D anomaly detection: {metadata['model'].get('name')} "
                        f"({metadata['model'].get('source')}); metadata_props['{META_KEY}'] describes it")


# ---- parity --------------------------------------------------------------------------------

def torch_outputs(model, neighborhood: np.ndarray, center: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(neighborhood), torch.from_numpy(center))
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def onnx_outputs(model_bytes_or_path, neighborhood: np.ndarray, center: np.ndarray,
                 fixed_batch: int | None) -> dict[str, np.ndarray]:
    """ORT CPU outputs, fed in chunks of the graph's fixed batch (padded) when it has one."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes_or_path, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    step = fixed_batch or len(neighborhood)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for s in range(0, len(neighborhood), step):
        nb, ct = neighborhood[s:s + step], center[s:s + step]
        real = len(nb)
        if fixed_batch:
            nb, ct = pad_batch(nb, fixed_batch), pad_batch(ct, fixed_batch)
        for n, v in zip(names, sess.run(names, {"neighborhood": nb, "center": ct})):
            parts[n].append(v[:real])
    return {n: np.concatenate(v) for n, v in parts.items()}


def verify_parity(model, model_bytes, neighborhood, center, fixed_batch: int | None, atol: float = PARITY_ATOL):
    """PyTorch vs ONNX Runtime CPU on the same engine inputs -> (checks, verdict) (btp.export.compare).

    An output that misses ``atol`` against PyTorch FP32 is checked again against the float64
    evaluation of the same model (``recheck_float64``)."""
    from btp.export.compare import Tolerance, compare, overall

    ref = torch_outputs(model, neighborhood, center)
    got = onnx_outputs(model_bytes, neighborhood, center, fixed_batch)
    why = f"FP32 export parity: max abs diff <= {atol:g}"
    tols = [Tolerance(name, kind="abs", limit=atol, why=why)
            for name in ("patch_probs", "global_prob", "object_score", "patch_point_probs") if name in got]
    if "patch_embed" in got:
        tols.append(Tolerance("patch_embed", kind="cosine", limit=1 - 1e-5, why="FP32: cosine >= 1 - 1e-5"))
    checks = compare(ref, got, tols)
    if any(c.passed is False and c.kind == "abs" and c.value is not None for c in checks):
        checks = recheck_float64(model, neighborhood, center, ref, got, checks, atol)
    return checks, overall(checks)


FLOAT64_CAP = 1e-3  # no output may drift further than this from the float64 evaluation, whatever PyTorch does


def recheck_float64(model, neighborhood, center, ref, got, checks, atol: float = PARITY_ATOL):
    """Re-check the failed ``abs`` checks against the exact answer: the same model in float64.

    Some inputs make FP32 itself ill-conditioned, e.g. a local covariance with two nearly equal
    small eigenvalues (an edge or a pin seen by few points) leaves its normal, and the heights and
    bends read from it, free to turn under rounding. Then PyTorch FP32 and ONNX Runtime round
    differently and neither is the reference. The check passes when ONNX Runtime is no farther
    from float64 than PyTorch FP32 is (and than ``atol``), and never beyond ``FLOAT64_CAP``.
    A model that cannot run in float64 keeps its failed checks."""
    try:
        exact = torch_outputs(copy.deepcopy(model).double(), neighborhood.astype(np.float64),
                              center.astype(np.float64))
    except (RuntimeError, TypeError) as exc:
        return tuple(replace(c, note=f"{c.note} (float64 re-check impossible: {exc})".strip())
                     if c.passed is False else c for c in checks)
    out = []
    for c in checks:
        if c.passed is False and c.kind == "abs" and c.value is not None and c.output in exact:
            e = np.asarray(exact[c.output], dtype=np.float64)
            own = float(np.max(np.abs(np.asarray(ref[c.output], dtype=np.float64) - e)))
            diff = np.abs(np.asarray(got[c.output], dtype=np.float64) - e)
            limit = min(max(atol, own), FLOAT64_CAP)
            c = replace(c, value=float(diff.max()), mean=float(diff.mean()), limit=limit,
                           passed=bool(diff.max() <= limit),
                           why=f"FP32 parity against the float64 evaluation: max abs diff <= max({atol:g}, "
                               f"PyTorch FP32's own {own:.2e}), at most {FLOAT64_CAP:g}",
                           note=f"against float64, which PyTorch FP32 misses by {own:.2e}; ONNX Runtime vs "
                                f"PyTorch FP32: {c.value:.2e}")
        out.append(c)
    return tuple(out)


# ---- the export ----------------------------------------------------------------------------

def exported_at() -> str:
    """UTC time of the export, or of $SOURCE_DATE_EPOCH when set (the reproducible-builds convention):
    the graph is deterministic, so with it the whole file is (the package's own ONNX is made so)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch) if epoch else None))


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    path: Path
    size_bytes: int
    seconds: float
    parity: tuple = ()  # btp.export.compare.CheckResult per output
    verdict: str = "SKIP"
    op_types: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)


def export_onnx(loaded: LoadedModel, out: str | Path, *, opset: int = 17, batch: str | int = "dynamic",
                fp16_safe: bool = False, simplify: bool = True, optional_outputs=(), patch_embed: bool = False,
                parity_scans: int = 3, atol: float = PARITY_ATOL, rewrite: bool = True, log=None) -> ExportResult:
    """Export ``loaded`` (``load_model`` / ``fresh_model``) to ``out``; see the module docstring.
    ``rewrite=False`` traces the model's own forward (no ``btp.export.rewrite``; for A/B checks).
    ``optional_outputs``: names of btp.contract's optional outputs the graph also gives
    (``patch_embed=True`` is short for ``optional_outputs=("patch_embed",)``).

    Raises ExportError (and leaves no file at ``out``) when a check or the parity test fails.
    """
    import onnx
    import torch

    from btp.export.samples import parity_inputs

    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    opset, batch = check_opset(opset), check_batch(batch)
    optional = contract.check_optional(tuple(optional_outputs) + (("patch_embed",) if patch_embed else ()))
    model, cfg = loaded.model, loaded.model.cfg
    out = Path(out)
    # real sampled shapes through the runtime's own preprocessing: the trace example and the parity set
    n_scans = max(parity_scans, 2 if batch == "dynamic" else batch)
    neighborhood, center = parity_inputs(cfg, n_scans)
    example_b = 2 if batch == "dynamic" else batch  # B = 2 so no size-1 broadcast gets baked in
    example = (np.resize(neighborhood, (example_b,) + neighborhood.shape[1:]),
               np.resize(center, (example_b,) + center.shape[1:]))
    log(f"tracing {loaded.info['name']} (torch {torch.__version__}, opset {opset}, batch {batch})")
    proto = trace_to_onnx(model, example, opset=opset, batch=batch, optional=optional, rewrite=rewrite)
    check_graph(proto)
    if simplify:
        proto = simplify_graph(proto)
        check_graph(proto)
    metadata = build_metadata(
        cfg,
        model=loaded.info,
        provenance=loaded.provenance,
        export={
            "format": "onnx", "opset": opset, "batch": batch, "fp16_safe": fp16_safe, "simplified": simplify,
            "torch": torch.__version__, "onnx": onnx.__version__, "exporter": "torch.onnx (TorchScript)",
            "onnxslim": _onnxslim_version() if simplify else None,
            "rewrites": ["split_concat_conv"] if rewrite else [],  # btp.export.rewrite
            "exported_at": exported_at(),
            "btp_version": getattr(btp, "__version__", cfg.version),
            "fp16": fp16_report(proto) if fp16_safe else None,
        },
        optional=optional,
    )
    set_metadata(proto, metadata)
    payload = proto.SerializeToString()
    checks, verdict = verify_parity(model, payload, neighborhood, center, None if batch == "dynamic" else batch, atol)
    if verdict != "PASS":
        lines = "; ".join(f"{c.output}: max {c.value} > {c.limit} {c.note}".strip() for c in checks if not c.passed)
        raise ExportError(f"{out}: ONNX Runtime does not match PyTorch on {n_scans} real sampled shapes ({lines}); "
                          "nothing was written")
    atomic_write_bytes(out, payload)
    ops = tuple(sorted(op for _, op in op_types(proto)))
    return ExportResult(path=out, size_bytes=len(payload), seconds=time.perf_counter() - t0, parity=checks,
                        verdict=verdict, op_types=ops, metadata=metadata)


