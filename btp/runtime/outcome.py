"""``ScanOutcome``: what became of one scan in a btp-run, as one typed value (torch-free).

    Result (btp.runtime.pipeline)  --scored()-->  ScanOutcome  --btp.runtime.outputs-->  files
    an exception                   --failed()-->  ScanOutcome  (error set, no scores)

The outcome is frozen and keyword-only. ``document()`` is the scan's ``<stem>.json``: every field in
the order declared here, under its own name, nested values as objects; ``from_document()`` reads
one back. btp.runtime.outputs is the one module that writes outcomes (per-scan files, results.csv,
summary.json, the report's rows); the CLI formats and prints them.

Adding a field (e.g. a reference score, a ledger id): declare it with ``optional()`` - default
None, written to the JSON only when set, so the documents of runs that do not fill it stay as
they were. A field for the running process only (arrays, tracebacks) takes ``in_memory()``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from btp.runtime.pipeline import Result

# field metadata: how document() treats a field
_MEMORY = "in_memory"  # never written
_OPTIONAL = "optional"  # written only when not None

FRESH_INIT_WARNING = "the model is freshly initialised (untrained): its scores carry no meaning"


def optional(**kwargs) -> Any:
    """A field that defaults to None and appears in the JSON document only when set."""
    return field(default=None, metadata={_OPTIONAL: True}, **kwargs)


def in_memory(default: Any = None, **kwargs) -> Any:
    """A field kept on the value for the running process, never written."""
    return field(default=default, compare=False, repr=False, metadata={_MEMORY: True}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class AppliedThreshold:
    """The object-score threshold a decision was made with, and where it came from
    (``--threshold`` or the model's calibration sidecar)."""

    value: float
    source: str


@dataclass(frozen=True, kw_only=True)
class PointSummary:
    """The per-point scores of one scan in numbers: their spread and how many reach the model's
    point threshold (``cfg.scoring.point_threshold``)."""

    min: float
    max: float
    mean: float
    p50: float
    p95: float
    p99: float
    point_threshold: float
    anomalous_points: int
    anomalous_fraction: float

    @classmethod
    def of(cls, scores: np.ndarray, point_threshold: float) -> "PointSummary":
        s = np.asarray(scores, dtype=np.float64)
        anomalous = int((s >= point_threshold).sum())
        return cls(min=float(s.min()), max=float(s.max()), mean=float(s.mean()),
                   p50=float(np.percentile(s, 50)), p95=float(np.percentile(s, 95)),
                   p99=float(np.percentile(s, 99)), point_threshold=point_threshold,
                   anomalous_points=anomalous, anomalous_fraction=anomalous / max(len(s), 1))


@dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """Which model scored the scan (from the model file's metadata)."""

    path: str
    name: str
    version: str | None = None
    weights_sha256: str | None = None
    fresh_init: bool = False
    precision: str = "fp32"  # the model file's (btp-export --precision)

    @classmethod
    def of(cls, pipeline) -> "ModelInfo":
        meta = pipeline.meta
        return cls(path=str(pipeline.model_path), name=meta.name, version=meta.model.get("version"),
                   weights_sha256=meta.model.get("weights_sha256"),
                   fresh_init=bool(meta.model.get("fresh_init", False)), precision=meta.precision)


@dataclass(frozen=True, kw_only=True)
class ReferenceCheck:
    """The scan against its part's reference (btp-run --reference; btp.runtime.guided).

    part             the part it was routed to (None: no part matched); route: the rule that matched
    file             the part's .btpref
    decision         "anomalous" | "normal" (the fused score against the part's threshold) |
                     "not registered" (fitness under the part's bar: not scored) | "no reference"
    registered       whether the scan registered to the part's template; fitness, rmse of that
    object_score     the fused object score; reference_score: the reference maps' alone
    threshold        the part's threshold (from its good scans, leave-one-out)
    deviation        {"max_abs", "p99_abs", "mean_abs", "residual_max"}: distances to the template,
                     in the scan's units
    """

    part: str | None
    route: str
    decision: str
    file: str | None = None
    registered: bool | None = None
    fitness: float | None = None
    rmse: float | None = None
    object_score: float | None = None
    reference_score: float | None = None
    threshold: float | None = None
    deviation: Mapping[str, float] | None = None

    @classmethod
    def of(cls, guided) -> "ReferenceCheck":
        """From a ``btp.runtime.guided.GuidedResult``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in guided.doc().items() if k in names})


@dataclass(frozen=True, kw_only=True)
class ScanOutcome:
    """One scan of a run: its scores and decision, or the error that stopped it.

    file            the scan's path as given
    object_score    the object score (None when the scan failed)
    global_prob     the global head's probability (NaN -> null when the graph has none)
    decision        "anomalous" (object score above the threshold) | "normal" | None (no threshold)
    threshold       the threshold the decision used (None: no threshold)
    points          raw points scored (M); rows = rows of the file (M + the NaN/inf rows dropped)
    point_scores    PointSummary of the M per-point scores
    regions         defect regions (btp.runtime.regions: center, extent, points, peak, mean), largest first;
                    with --reference and a registered scan, of the fused map at the part's threshold
    timings_ms      {stage: ms} (Result.timings, rounded to microseconds); total_ms their sum
    batch_size      scans in the engine call; backend, preprocess: where it ran
    model           ModelInfo of the model file
    warnings        what the reader or the pipeline noticed (dropped rows, few points, fresh model)
    outputs         {kind: path} of the files written for the scan besides its JSON (npy, ply, png)
    zero_shot_score with --reference: the model's own object score (object_score is then the part's fused one)
    reference       with --reference: ReferenceCheck (the part, registration, deviation, its decision)
    error           "ErrorType: reason" when the scan failed (then no scores and no files)

    In memory only: ``stem`` (the output files' name), ``result`` (the pipeline's Result with the
    points and per-point scores), ``traceback`` (of an internal error; btp-run --debug prints it).
    """

    file: Path
    object_score: float | None = None
    global_prob: float | None = None
    decision: str | None = None
    threshold: AppliedThreshold | None = None
    points: int | None = None
    rows: int | None = None
    point_scores: PointSummary | None = None
    regions: tuple[Mapping[str, Any], ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    total_ms: float | None = None
    batch_size: int | None = None
    backend: str | None = None
    preprocess: str | None = None
    model: ModelInfo | None = None
    warnings: tuple[str, ...] = ()
    outputs: Mapping[str, Path] = field(default_factory=dict)
    zero_shot_score: float | None = optional()
    reference: ReferenceCheck | None = optional()
    error: str | None = optional()
    stem: str = in_memory("")
    result: Result | None = in_memory()
    traceback: str | None = in_memory()

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def scored(cls, result: Result, *, file: Path, stem: str, model: ModelInfo, point_threshold: float,
               threshold: AppliedThreshold | None, backend: str, preprocess: str) -> "ScanOutcome":
        """The outcome of a scored scan; ``decision`` compares the object score with ``threshold``."""
        decision = None
        if threshold is not None:
            decision = "anomalous" if result.object_score > threshold.value else "normal"
        warnings = tuple(result.warnings) + ((FRESH_INIT_WARNING,) if model.fresh_init else ())
        score, zero_shot, check = result.object_score, None, None
        if result.reference is not None:  # the part's reference decides
            guided = result.reference
            check, zero_shot, decision = ReferenceCheck.of(guided), result.object_score, guided.decision
            threshold = None
            if guided.scores is not None and guided.scores.registered:
                score = guided.scores.object_score
                threshold = AppliedThreshold(value=guided.threshold,
                                             source=f"reference {guided.part} ({guided.reference_file})")
        return cls(file=file, stem=stem, result=result, object_score=score, zero_shot_score=zero_shot,
                   reference=check,
                   global_prob=result.global_prob, decision=decision, threshold=threshold,
                   points=int(len(result.point_scores)),
                   rows=int(len(result.row_mask)) if result.row_mask is not None else int(len(result.point_scores)),
                   point_scores=PointSummary.of(result.point_scores, point_threshold),
                   timings_ms={k: round(v, 3) for k, v in result.timings.items()},
                   total_ms=round(result.total_ms, 3), batch_size=result.batch_size, backend=backend,
                   preprocess=preprocess, model=model, warnings=warnings)

    @classmethod
    def failed(cls, *, file: Path, stem: str, error: str, traceback: str | None = None) -> "ScanOutcome":
        return cls(file=file, stem=stem, error=error, traceback=traceback)

    def document(self) -> dict[str, Any]:
        """The JSON document (``<stem>.json``): plain dicts, lists, strings and numbers."""
        return _document(self)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any], *, stem: str = "") -> "ScanOutcome":
        """A document written by ``document()`` -> the outcome (keys it does not know are ignored)."""
        return _from_document(cls, doc, stem=stem)


def _document(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        doc = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.metadata.get(_MEMORY) or (f.metadata.get(_OPTIONAL) and item is None):
                continue
            doc[f.name] = _document(item)
        return doc
    if isinstance(value, Mapping):
        return {str(k): _document(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_document(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


_NESTED = {"threshold": AppliedThreshold, "point_scores": PointSummary, "model": ModelInfo,
           "reference": ReferenceCheck}


def _from_document(cls, doc: Mapping[str, Any], *, stem: str) -> ScanOutcome:
    known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get(_MEMORY)}
    values: dict[str, Any] = {}
    for key, item in doc.items():
        if key not in known:
            continue
        if key in _NESTED and item is not None:
            nested = _NESTED[key]
            names = {f.name for f in dataclasses.fields(nested)}
            item = nested(**{k: v for k, v in item.items() if k in names})
        elif key == "file":
            item = Path(item)
        elif key == "outputs":
            item = {k: Path(v) for k, v in item.items()}
        elif isinstance(item, list):
            item = tuple(item)
        values[key] = item
    return cls(stem=stem, **values)
