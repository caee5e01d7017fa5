"""Reduced-precision variants of an exported model.onnx, kept only when accuracy holds.

``btp-export --precision int8|bf16`` derives the variant from the FP32 model.onnx (torch-free):

- **int8**: static quantisation in the QDQ format (``onnxruntime.quantization``): per-channel
  symmetric int8 weights, uint8 activations, MatMul / Conv / Gemm, ranges (MinMax) from the
  engine inputs of *normal* scans of the training-split meshes, made by the runtime's own chain.
  The graph's quantisable nodes fall into layer groups (``layer_groups``: the geometry computed
  in the graph, each transformer block's attention and MLP, the patch encoder, the heads ...).
  The accuracy-aware search (``search_int8``) measures each group's sensitivity (that group alone
  in INT8: the mean |change| of the patch probabilities on other normal and defective scans) and
  keeps the most sensitive groups in FP32, one more per step, until the gate holds.
- **bf16**: the same graph, run by OpenVINO's CPU plugin with bfloat16 inside
  (``openvino-bf16``); only where the CPU has native bf16 (AVX512-BF16 or AMX), refused elsewhere.

**The gate is accuracy** (``gate``): on held-out evaluation sets (``btp data eval-sets``), the
variant's O-AUROC and P-AUROC within ``GATE_AUROC_DROP`` of FP32 on every set, and its OK/NG
decisions equal to FP32's on at least ``GATE_AGREEMENT`` of the scans, each model at its own
threshold calibrated on the sets' good scans by ``btp calibrate``'s rule (as a user calibrates the
model they deploy; with FP32's threshold, the good scan that sets it would flip on any change).
Then a fast parity check (``parity``) compares the raw outputs on a few sample scans, with an
object-score tolerance that follows from the gate. A variant that fails either is refused unless
forced; the metadata (``export.precision``) records the precision, the groups kept in FP32, the
calibration, the gate's and the parity check's numbers and whether it was forced.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from btp import contract
from btp.errors import BTPError

GATE_AUROC_DROP = 0.005  # O-AUROC and P-AUROC: at most half a point below FP32 on every set
GATE_AGREEMENT = 0.99  # OK/NG decisions equal to FP32's on at least this share of the scans
QUANTIZED_OPS = ("MatMul", "Conv", "Gemm")


class PrecisionError(BTPError, ValueError):
    """A reduced-precision variant cannot be made here, or failed its gate."""


# ---- the graph's layer groups ---------------------------------------------------------------

def group_of(node_name: str) -> str:
    """The layer group of a node, from its module path in the exported graph:
    ``blocks.i/attn`` and ``blocks.i/mlp`` per transformer block, else the first two module names
    (``gfcm`` = the geometric features computed in the graph, ``gfcm/convs``, ``mgfem/layer_mlp``,
    ``point_encoder/encoder`` = the patch encoder ...); ``head`` for the graph's top level."""
    parts = [p for p in node_name.strip("/").split("/")[:-1] if p != "inner"]
    if "blocks" in parts:
        i = parts.index("blocks")
        return "/".join(parts[i + 1:i + 3])
    return "/".join(parts[:2]) or "head"


def layer_groups(proto) -> dict[str, list[str]]:
    """{group: [names of its quantisable nodes]} in graph order."""
    groups: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if node.op_type in QUANTIZED_OPS:
            groups.setdefault(group_of(node.name), []).append(node.name)
    return groups


# ---- INT8 ------------------------------------------------------------------------------------

# The committed INT8 recipes: the layer groups ``search_int8`` kept in FP32 for a model's weights
# (by weights_sha256), so that ``--keep-fp32 auto`` needs no search for them (models/*.md says
# how each was found).
_GEO4K_KEEP = ("gfcm", "gfcm/convs", "head", "gfcm/head", "point_encoder/pos_embed", "mgfem/desc_mlp", "mgfem/fuse",
               "point_refine/patch_proj", "point_refine/point_proj", "point_encoder")
INT8_RECIPES: dict[str, tuple[str, ...]] = {
    # btp-geo-4k (the default): searched on the held-out sets of models/btp-geo-4k.md, 8192 points,
    # both makers and layouts; INT8 stays in the patch encoder, the transformer blocks and MGFEM's
    # layer/class MLPs (benchmarks/results/precision-btp-geo-4k-*.md). The key is the file's hash:
    # its tensors are those of the search (4b8969f6...), its config has since changed (scoring only:
    # the map-mean rule, 649407d4..., the self-similarity term, 988311e2..., its point map, 1f9a6002..., smoothed,
    # 38e3bbea...)
    "649407d4f615918eaff2a9c71bee46cdb24ae905e5651b5f6d650be27cb78779": _GEO4K_KEEP,
    "988311e25b18713977c2ef21e10dcff1ed32792d036d6fefd824dd24cb1def45": _GEO4K_KEEP,
    "1f9a600262593cb63b3bdcc0a14b3f10db94f1219721e3c4ffe4714fd425de49": _GEO4K_KEEP,
    "38e3bbeac40602b90731febcca8358038ae27688875b88d8ae812a44fcdf7a3b": _GEO4K_KEEP,
}


def committed_keep(meta) -> tuple[str, ...] | None:
    """The committed recipe's FP32 groups for this model's weights (None: no recipe, search)."""
    return INT8_RECIPES.get(str(meta.model.get("weights_sha256", "")))


@dataclass(frozen=True, kw_only=True)
class Int8Settings:
    """How an INT8 variant is made (recorded in the metadata)."""

    calibration_scans: int = 32
    calibration_meshes: int = 8
    method: str = "MinMax"
    per_channel: bool = True
    activations: str = "uint8"
    weights: str = "int8"
    op_types: tuple[str, ...] = QUANTIZED_OPS


def calibration_scans(shapes_root, cfg, count: int, meshes: int, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """``count`` normal raw scans (2 N points each) of ``meshes`` training-split meshes of a shapes
    folder (btp.train.split: the held-out shapes never calibrate) -> (scans, mesh names)."""
    from btp.export.samples import sample_scans
    from btp.train.split import zero_shot_split

    train = sorted(zero_shot_split(shapes_root).train, key=lambda s: s.name)
    if not train:
        raise PrecisionError(f"{shapes_root}: no training-split meshes to calibrate on")
    step = max(1, len(train) // meshes)
    chosen = [train[i] for i in range(0, len(train), step)][:meshes]
    paths = [s.path for s in chosen]
    return sample_scans(count, 2 * cfg.preprocess.num_points, seed=seed, meshes=paths), [s.name for s in chosen]


def engine_feeds(scans: Sequence[np.ndarray], cfg) -> list[dict[str, np.ndarray]]:
    """Batch-1 engine inputs of raw scans by the runtime's chain (the reference rule)."""
    from btp.export.samples import engine_inputs

    feeds = []
    for scan in scans:
        neighborhood, center = engine_inputs([scan], cfg)
        feeds.append({"neighborhood": neighborhood, "center": center})
    return feeds


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over prepared feeds."""

    def __init__(self, feeds):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def __len__(self):
        return len(self._feeds)

    def rewind(self):
        self._it = iter(self._feeds)


class Int8Builder:
    """INT8 QDQ variants of one FP32 model with ranges calibrated once: ``build(out, keep)``
    quantises every quantisable node except those of the ``keep`` groups."""

    def __init__(self, model: Path, feeds, settings: Int8Settings, work: Path):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.settings = settings
        self.work = Path(work)
        self.staged = self.work / "preprocessed.onnx"
        quant_pre_process(str(model), str(self.staged), skip_symbolic_shape=True)
        self.groups = layer_groups(onnx.load(str(self.staged), load_external_data=False))
        self.cache = self.work / "ranges.json"
        self.reader = _Reader(feeds)

    def build(self, out: Path, keep: Sequence[str] = ()) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        unknown = sorted(set(keep) - set(self.groups))
        if unknown:
            raise PrecisionError(f"layer group(s) {unknown} are not in this graph; choose from {sorted(self.groups)}")
        exclude = [name for g in keep for name in self.groups[g]]
        self.reader.rewind()
        s = self.settings
        quantize_static(str(self.staged), str(out), self.reader, quant_format=QuantFormat.QDQ,
                        per_channel=s.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=list(s.op_types), nodes_to_exclude=exclude,
                        calibrate_method=getattr(CalibrationMethod, s.method), calibration_cache_path=self.cache)
        return Path(out)


def ort_runner(path: Path, threads: int | None = None) -> Callable[[dict], dict]:
    """feed -> {output: array} through an ONNX Runtime CPU session of ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feed: dict(zip(names, session.run(None, feed)))


SENSITIVITY_OUTPUTS = ("patch_probs", "object_score")


def sensitivity(builder: Int8Builder, model: Path, check_feeds, *, progress=None) -> dict[str, float]:
    """{group: the change of the scores when only that group runs in INT8}, most sensitive first:
    the mean |change| of the patch probabilities plus that of the object score (the decision's
    input), over ``check_feeds``."""
    say = progress or (lambda _m: None)
    reference = ort_runner(model)
    refs = [reference(f) for f in check_feeds]
    errors = {}
    for i, group in enumerate(builder.groups, 1):
        path = builder.build(builder.work / "one-group.onnx", keep=[g for g in builder.groups if g != group])
        run = ort_runner(path)
        got = [run(f) for f in check_feeds]
        errors[group] = float(sum(np.mean([np.abs(g[k] - r[k]).mean() for g, r in zip(got, refs)])
                                  for k in SENSITIVITY_OUTPUTS))
        say(f"sensitivity {i}/{len(builder.groups)}: {group} {errors[group]:.2e}")
    return dict(sorted(errors.items(), key=lambda kv: -kv[1]))


# ---- the accuracy gate -----------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class SetScores:
    """One model's scores on one evaluation set: its metrics and each scan's object score."""

    name: str
    o_auroc: float | None
    p_auroc: float | None
    labels: tuple[int, ...]
    object_scores: tuple[float, ...]


def score_set(root: Path, model: Path, backend: str = "ort-cpu") -> SetScores:
    """``btp eval`` of one set with the model alone (the runtime's Pipeline, the reference rule)."""
    from btp.eval.evaluate import evaluate
    from btp.eval.scoring import OnnxScorer

    report = evaluate(root, scorer=OnnxScorer(model, backend=backend, downsample="exact"), baselines=False)
    scans = report["data"]["scans"]
    return SetScores(name=root.name, o_auroc=report["mean"].get("o_auroc"), p_auroc=report["mean"].get("p_auroc"),
                     labels=tuple(s["label"] for s in scans), object_scores=tuple(s["object_score"] for s in scans))


@dataclass(kw_only=True)
class GateResult:
    """The gate's numbers: per set FP32 and variant AUROCs, and the decisions' agreement."""

    sets: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = float("nan")  # FP32's, calibrated on the sets' good scans (btp calibrate's rule)
    variant_threshold: float = float("nan")  # the variant's, by the same rule on the same scans
    agreement: float = float("nan")
    scans: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "max_auroc_drop": GATE_AUROC_DROP,
                "min_agreement": GATE_AGREEMENT}

    def lines(self) -> list[str]:
        rows = [f"{s['set']}: O-AUROC {_pt(s['fp32_o_auroc'])} -> {_pt(s['o_auroc'])}, "
                f"P-AUROC {_pt(s['fp32_p_auroc'])} -> {_pt(s['p_auroc'])}" for s in self.sets]
        rows.append(f"OK/NG, each at its threshold calibrated on the good scans (FP32 {self.threshold:.4f}, "
                    f"variant {self.variant_threshold:.4f}): {100 * self.agreement:.1f} % of {self.scans} scans "
                    f"agree (gate {100 * GATE_AGREEMENT:.0f} %)")
        return rows + [f"FAILED: {f}" for f in self.failures]


def _pt(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def gate(reference: Sequence[SetScores], variant: Sequence[SetScores]) -> GateResult:
    """Compare a variant's scores with FP32's on the same sets (see the module docstring)."""
    from btp.runtime.calibration import calibrate_threshold

    result = GateResult()

    def threshold(scores: Sequence[SetScores]) -> float:
        good = [s for r in scores for s, y in zip(r.object_scores, r.labels) if y == 0]
        return calibrate_threshold(good) if good else float("nan")

    result.threshold, result.variant_threshold = threshold(reference), threshold(variant)
    agree = total = 0
    for ref, var in zip(reference, variant):
        if ref.labels != var.labels:
            raise PrecisionError(f"{ref.name}: the variant scored other scans than FP32")
        row = {"set": ref.name, "scans": len(ref.labels), "fp32_o_auroc": ref.o_auroc, "o_auroc": var.o_auroc,
               "fp32_p_auroc": ref.p_auroc, "p_auroc": var.p_auroc}
        result.sets.append(row)
        for key in ("o_auroc", "p_auroc"):
            before, after = row[f"fp32_{key}"], row[key]
            if before is not None and (after is None or after < before - GATE_AUROC_DROP - 1e-12):
                result.failures.append(f"{ref.name}: {key.replace('_', '-').upper()} {_pt(after)} is more than "
                                       f"{100 * GATE_AUROC_DROP:.1f} point below FP32's {_pt(before)}")
        a = np.asarray(ref.object_scores) > result.threshold
        b = np.asarray(var.object_scores) > result.variant_threshold
        agree += int((a == b).sum())
        total += len(a)
    result.scans = total
    result.agreement = agree / total if total else float("nan")
    if not total:
        result.failures.append("no scans to gate on")
    elif result.agreement < GATE_AGREEMENT:
        result.failures.append(f"OK/NG decisions agree on {100 * result.agreement:.1f} % of the scans "
                               f"(at least {100 * GATE_AGREEMENT:.0f} % needed)")
    return result


def gate_sets(paths: Sequence[str | Path]) -> list[Path]:
    """The evaluation sets behind ``--gate-data``: set folders, or folders of them (the output
    of ``btp data eval-sets``: one level of subfolders with test data)."""
    from btp.io import detect_layout

    found: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            raise PrecisionError(f"--gate-data {given}: not a folder; pass the output of `btp data eval-sets`")
        try:
            detect_layout(given)
            found.append(given)
            continue
        except (ValueError, FileNotFoundError, BTPError):
            pass
        subsets = []
        for sub in sorted(p for p in given.iterdir() if p.is_dir()):
            try:
                detect_layout(sub)
                subsets.append(sub)
            except (ValueError, FileNotFoundError, BTPError):
                continue
        if not subsets:
            raise PrecisionError(f"--gate-data {given}: no evaluation set in it (Anomaly-ShapeNet or Real3D-AD "
                                 "layout); make them with `btp data eval-sets`")
        found += subsets
    return found


# ---- the fast parity check ------------------------------------------------------------------

PARITY_SCANS = 6  # the shipped sample meshes (btp/data), sampled like the FP32 export's parity check
PARITY_MARGIN = 2.0  # the object score may move by this times its largest move on the gate's scans


def parity(model: Path, variant: Path, backend: str, reference: Sequence[SetScores],
           scores: Sequence[SetScores]) -> dict[str, Any]:
    """The variant's raw outputs against FP32's on a few real scans, with a tolerance that follows
    from the gate: its object scores may differ by at most ``PARITY_MARGIN`` times the largest
    difference seen on the gate's scans (where the held-out metrics and decisions held). The
    patch probabilities' largest difference is reported beside it."""
    from btp.export.samples import parity_inputs
    from btp.runtime.backends import make_backend
    from btp.runtime.metadata import read_model_meta

    meta = read_model_meta(model)
    neighborhood, center = parity_inputs(meta.config, PARITY_SCANS)
    runs = [make_backend(name, path, meta).run for name, path in (("ort-cpu", model), (backend, variant))]
    ref, got = (run(neighborhood, center) for run in runs)
    gate_move = max((abs(a - b) for r, v in zip(reference, scores)
                     for a, b in zip(r.object_scores, v.object_scores)), default=0.0)
    tolerance = max(PARITY_MARGIN * gate_move, 1e-6)
    moved = float(np.abs(got["object_score"] - ref["object_score"]).max())
    return {"scans": PARITY_SCANS, "max_abs_object_score": moved,
            "max_abs_patch_probs": float(np.abs(got["patch_probs"] - ref["patch_probs"]).max()),
            "object_score_tolerance": tolerance, "gate_max_abs_object_score": gate_move,
            "passed": moved <= tolerance}


# ---- the search, and the variant file ---------------------------------------------------------

@dataclass(kw_only=True)
class Variant:
    """A reduced-precision model written by ``make_variant``."""

    path: Path
    precision: str
    kept_fp32: list[str]
    gate: GateResult
    info: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.gate.passed and self.info.get("parity", {}).get("passed", True)


def search_int8(builder: Int8Builder, model: Path, sets: Sequence[Path], reference: Sequence[SetScores],
                order: Sequence[str], out: Path, *, max_steps: int | None = None,
                progress=None) -> tuple[Path, list[str], GateResult, list[dict], list[SetScores]]:
    """Keep the groups of ``order`` (most sensitive first) in FP32, one more per step, until the
    gate holds -> (variant path, kept groups, its gate, each step's numbers, its scores). The last
    step tried is returned when none passes."""
    say = progress or (lambda _m: None)
    history: list[dict] = []
    steps = len(order) if max_steps is None else min(max_steps, len(order))
    for n_kept in range(steps + 1):
        kept = list(order[:n_kept])
        builder.build(out, keep=kept)
        scores = [score_set(s, out) for s in sets]
        result = gate(reference, scores)
        history.append({"kept_fp32": kept, "passed": result.passed, "agreement": result.agreement,
                        "sets": result.sets})
        say(f"int8 with {n_kept} group(s) in FP32 {kept}: gate {'passed' if result.passed else 'failed'} "
            f"({'; '.join(result.failures) or 'all sets within'})")
        if result.passed:
            break
    return out, kept, result, history, scores


def precision_record(precision: str, *, kept_fp32=(), settings: Int8Settings | None = None,
                     calibration: str = "", gate_result: GateResult | None = None,
                     forced: bool = False) -> dict[str, Any]:
    """The metadata's ``export.precision`` document."""
    record: dict[str, Any] = {"mode": precision, "kept_fp32": list(kept_fp32), "forced": bool(forced)}
    if settings is not None:
        record["int8"] = {**asdict(settings), "op_types": list(settings.op_types)}
    if calibration:
        record["calibration"] = calibration
    if gate_result is not None:
        record["gate"] = gate_result.to_dict()
    record["backend"] = contract.precision_backend(precision)
    return record


def write_variant(source: Path, graph: Path, dest: Path, record: dict[str, Any]) -> Path:
    """``graph`` (a variant of ``source``) saved atomically as ``dest`` with ``source``'s metadata,
    ``export.precision`` set to ``record``."""
    import onnx

    from btp.export.onnx import set_metadata
    from btp.io.files import atomic_write_bytes
    from btp.runtime.metadata import META_KEY

    original = onnx.load(str(source), load_external_data=False)
    doc = json.loads(next(p.value for p in original.metadata_props if p.key == META_KEY))
    doc["export"]["precision"] = record
    proto = onnx.load(str(graph))
    set_metadata(proto, doc)
    atomic_write_bytes(dest, proto.SerializeToString())
    return dest


def make_variant(model: Path, dest: Path, precision: str, *, gate_data: Sequence[str | Path], shapes=None,
                 keep_fp32: Sequence[str] | str | None = "auto", settings: Int8Settings | None = None,
                 force: bool = False, progress=None) -> Variant:
    """FP32 ``model`` -> its ``precision`` variant at ``dest``, gated on ``gate_data``.
    ``keep_fp32``: the groups to keep; "auto": the committed recipe for the model's weights, else
    search them; None: search them (most sensitive first). Raises PrecisionError when the variant
    cannot be made or fails the gate or the parity check (then nothing is written, unless ``force``)."""
    from btp.runtime.metadata import read_model_meta

    say = progress or (lambda _m: None)
    model, dest = Path(model), Path(dest)
    meta = read_model_meta(model)
    if meta.precision != "fp32":
        raise PrecisionError(f"{model} is already a {meta.precision} model: derive variants from the FP32 export")
    if precision not in contract.PRECISIONS or precision == "fp32":
        raise PrecisionError(f"--precision {precision}: a variant is int8 or bf16")
    if precision == "bf16":
        from btp.runtime.backends.openvino import bf16_unavailable

        reason = bf16_unavailable()
        if reason:
            raise PrecisionError(f"--precision bf16 runs on OpenVINO's bf16 CPU plugin, and {reason}: keep fp32, "
                                 "or use int8")
    sets = gate_sets(gate_data)
    t0 = time.perf_counter()
    say(f"gate: FP32 on {len(sets)} set(s)")
    reference = [score_set(s, model) for s in sets]
    if precision == "bf16":
        scores = [score_set(s, model, backend="openvino-bf16") for s in sets]
        result = gate(reference, scores)
        record = precision_record("bf16", gate_result=result)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["parity"] = parity(model, model, "openvino-bf16", reference, scores)
        return _finish(Variant(path=dest, precision="bf16", kept_fp32=[], gate=result, info=record), model, model,
                       force)
    settings = settings or Int8Settings()
    with tempfile.TemporaryDirectory(prefix="btp-int8-") as tmp:
        graph = Path(tmp) / "int8.onnx"
        kept, result, scores, record = _int8(model, meta, graph, sets, reference, shapes=shapes, keep_fp32=keep_fp32,
                                             settings=settings, say=say)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        record["parity"] = parity(model, graph, "ort-cpu", reference, scores)
        return _finish(Variant(path=dest, precision="int8", kept_fp32=kept, gate=result, info=record), model, graph,
                       force)


def _int8(model: Path, meta, graph: Path, sets, reference, *, shapes, keep_fp32, settings: Int8Settings,
          say) -> tuple[list[str], GateResult, list[SetScores], dict[str, Any]]:
    """The INT8 graph at ``graph`` (the given, committed or searched groups kept in FP32) and its
    gate -> (kept groups, gate, its scores, the metadata record)."""
    from btp.io.locations import shapes_dir

    root = shapes_dir(shapes, flag="--calibration-shapes")
    scans, names = calibration_scans(root, meta.config, settings.calibration_scans, settings.calibration_meshes)
    builder = Int8Builder(model, engine_feeds(scans, meta.config), settings, graph.parent)
    if keep_fp32 == "auto":
        keep_fp32 = committed_keep(meta)
        say("int8: " + ("no committed recipe for these weights: searching" if keep_fp32 is None else
                        f"the committed recipe keeps {', '.join(keep_fp32) or 'no group'} in FP32"))
    searched: dict[str, Any] = {}
    if keep_fp32 is None:
        say(f"int8: {len(builder.groups)} layer groups; measuring each one's sensitivity")
        check = engine_feeds(calibration_scans(root, meta.config, 8, 8, seed=10_000)[0], meta.config)
        ranked = sensitivity(builder, model, check, progress=say)
        _, kept, result, steps, scores = search_int8(builder, model, sets, reference, list(ranked), graph,
                                                      progress=say)
        searched = {"sensitivity": {g: float(f"{e:.3g}") for g, e in ranked.items()},
                    "sensitivity_scans": f"{len(check)} normal scans of training-split meshes (other samplings)",
                    "steps": [{"kept_fp32": st["kept_fp32"], "passed": st["passed"], "agreement": st["agreement"],
                               "sets": st["sets"]} for st in steps]}
    else:
        kept = list(keep_fp32)
        builder.build(graph, keep=kept)
        scores = [score_set(s, graph) for s in sets]
        result = gate(reference, scores)
    calibration = (f"{len(scans)} normal scans of {len(names)} training-split meshes of {root.name} "
                   f"({', '.join(names)})")
    record = precision_record("int8", kept_fp32=kept, settings=settings, calibration=calibration, gate_result=result)
    if searched:
        record["search"] = searched
    return kept, result, scores, record


def _finish(variant: Variant, source: Path, graph: Path, force: bool) -> Variant:
    """Write the variant when it passed (or is forced, and marked so); refuse it otherwise."""
    variant.info["forced"] = force and not variant.passed
    if variant.passed or force:
        write_variant(source, graph, variant.path, variant.info)
    return _checked(variant, force)


def _checked(variant: Variant, force: bool) -> Variant:
    if not variant.passed and not force:
        check = variant.info.get("parity", {})
        lines = variant.gate.lines() if not variant.gate.passed else [
            f"parity on {check['scans']} sample scans: object score moved {check['max_abs_object_score']:.2e}, "
            f"more than {check['object_score_tolerance']:.2e} (twice its largest move on the gate's scans)"]
        what = "accuracy gate" if not variant.gate.passed else "parity check"
        raise PrecisionError(f"the {variant.precision} variant fails the {what}, so it was not written "
                             f"(--force keeps it, marked in its metadata):\n  " + "\n  ".join(lines))
    return variant
