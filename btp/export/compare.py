"""The parity comparator: outputs in -> per-tensor differences and a verdict out. Pure (numpy only).

Nothing here runs a model: ``btp.benchmarks.parity`` feeds the same samples to a reference and a
test backend and hands the collected arrays to ``compare``. Four kinds of check:

- ``abs``:    max/mean |test - ref|; PASS when max <= limit.
- ``cosine``: row-wise cosine of [..., D] embeddings; PASS when min cosine >= limit.
- ``index``:  agreement of index arrays (1.0 = identical); PASS when agreement >= limit.
- ``metric``: |test - ref| of a scalar (e.g. O-AUROC); PASS when <= limit.

Tolerances are data: ``tolerances(precision, reference_outputs, cfg)`` derives them and says
why (``Tolerance.why``), so the report can print the rule next to every verdict.
"""
from __future__ import annotations

import math
from dataclasses import KW_ONLY, asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

FP16_UNIT_ROUNDOFF = 2.0 ** -11
# relative error budget for FP16 logits: unit roundoff x 16 (a chain of ~16 rounded GEMM/norm
# stages, each adding <= 1 u with linear worst-case growth); FP32 is held to the export's parity limit, 1e-4.
FP16_REL = 16 * FP16_UNIT_ROUNDOFF  # 0.0078
FP32_ABS = 1e-4


@dataclass(frozen=True)
class Tolerance:
    output: str
    _: KW_ONLY
    kind: str  # "abs" | "cosine" | "index" | "metric"
    limit: float
    why: str
    informative: bool = True  # False: the limit is so loose that a PASS would say nothing (-> SKIP)


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    output: str
    kind: str
    value: float | None  # the number held against the limit (max abs / min cos / agreement / delta)
    mean: float | None  # mean abs diff / mean cos / mean agreement
    limit: float
    passed: bool | None  # None = not checked (missing on one side), with the reason in `note`
    n: int
    why: str
    note: str = ""

    @property
    def verdict(self) -> str:
        return "SKIP" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def check(ref, test, tol: Tolerance) -> CheckResult:
    """One check of ``test`` against ``ref`` under ``tol`` (arrays of equal shape)."""
    if ref is None or test is None:
        side = "reference" if ref is None else "test backend"
        return CheckResult(output=tol.output, kind=tol.kind, value=None, mean=None, limit=tol.limit, passed=None, n=0,
                           why=tol.why,
                           note=f"not produced by the {side}")
    ref_arr, test_arr = np.asarray(ref), np.asarray(test)
    if ref_arr.shape != test_arr.shape:
        return CheckResult(output=tol.output, kind=tol.kind, value=None, mean=None, limit=tol.limit, passed=False,
                           n=int(ref_arr.size), why=tol.why,
                           note=f"shape mismatch: reference {ref_arr.shape} vs test {test_arr.shape}")
    n = int(ref_arr.size)
    if not tol.informative:
        diff = float(np.max(np.abs(test_arr.astype(np.float64) - ref_arr.astype(np.float64)))) if n else None
        return CheckResult(output=tol.output, kind=tol.kind, value=diff, mean=diff, limit=tol.limit, passed=None, n=n,
                           why=tol.why,
                           note="not informative: the reference scores are near-ties at this tolerance")
    if tol.kind in ("abs", "metric"):
        diff = np.abs(test_arr.astype(np.float64) - ref_arr.astype(np.float64))
        if n == 0 or not np.isfinite(diff).all():
            return CheckResult(output=tol.output, kind=tol.kind, value=None, mean=None, limit=tol.limit, passed=False,
                               n=n, why=tol.why,
                               note="empty or non-finite values")
        value, mean = float(diff.max()), float(diff.mean())
        return CheckResult(output=tol.output, kind=tol.kind, value=value, mean=mean, limit=tol.limit,
                           passed=value <= tol.limit, n=n, why=tol.why)
    if tol.kind == "cosine":
        a = ref_arr.reshape(-1, ref_arr.shape[-1]).astype(np.float64)
        b = test_arr.reshape(-1, test_arr.shape[-1]).astype(np.float64)
        denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cos = np.sum(a * b, axis=1) / np.maximum(denom, 1e-30)
        value = float(cos.min())
        return CheckResult(output=tol.output, kind=tol.kind, value=value, mean=float(cos.mean()), limit=tol.limit,
                           passed=value >= tol.limit, n=int(cos.size), why=tol.why)
    if tol.kind == "index":
        agree = (ref_arr == test_arr).astype(np.float64)
        value = float(agree.mean()) if n else 1.0
        return CheckResult(output=tol.output, kind=tol.kind, value=value, mean=value, limit=tol.limit,
                           passed=value >= tol.limit, n=n, why=tol.why)
    raise ValueError(f"unknown check kind {tol.kind!r}: expected abs, cosine, index or metric")


def compare(reference: Mapping[str, object], test: Mapping[str, object],
            tolerances: Sequence[Tolerance]) -> tuple[CheckResult, ...]:
    """Every tolerance's check of ``test[output]`` against ``reference[output]``."""
    return tuple(check(reference.get(t.output), test.get(t.output), t) for t in tolerances)


def sorted_index_sets(idx) -> np.ndarray:
    """Rows of an index array sorted, so that kNN index *sets* compare (ties may reorder)."""
    return np.sort(np.asarray(idx), axis=-1)


# ---- tolerances ----------------------------------------------------------------------------

def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def auroc_swap_bound(labels, scores, score_tol: float) -> float:
    """Largest AUROC change that score errors of at most ``score_tol`` can cause: the share of
    (anomalous, normal) pairs whose reference scores lie within 2 * score_tol of each other (only
    those pairs can swap order). labels [n] in {0, 1}, scores [n]; 0.0 if a class is missing."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if not len(pos) or not len(neg):
        return 0.0
    lo = np.searchsorted(neg, pos - 2 * score_tol, side="left")
    hi = np.searchsorted(neg, pos + 2 * score_tol, side="right")
    return float(np.sum(hi - lo)) / (len(pos) * len(neg))


def tolerances(precision: str, reference: Mapping[str, object], *, object_alpha: float = 0.5,
               global_temperature: float = 0.07, object_labels=None, point_labels=None) -> tuple[Tolerance, ...]:
    """The tolerance of every check for a backend running at ``precision`` ("fp32" | "fp16" | "int8").

    FP32: probabilities and scores to 1e-4 abs (the export's parity limit), patch-embedding
    cosine >= 1 - 1e-5, metric deltas <= 1e-3, indices identical.

    FP16 (and INT8, same rule, stated as such): follows from the score scale of the reference.
    A relative error r = 16 u (u = 2^-11, r = 0.0078) on a logit l moves sigmoid(l) by at most
    sigma'(l) * r * max(|l|, 1); the patch tolerance takes the max of that over the reference's
    patch logits. The global logit is (g.t_a - g.t_n) / T with cosines in [-1, 1], so its error
    is up to 2 r / T (T = 0.07 amplifies it 14x); the global tolerance is max sigma'(l_g) * 2r/T.
    object = alpha * global + (1 - alpha) * mean(top patches) inherits alpha * tol_global +
    (1 - alpha) * tol_patch; point scores (means of patch probs) inherit tol_patch. Embedding
    rows with relative error r have 1 - cos ~ r^2 / 2; allowing 4 r on an outlier row gives
    cos >= 1 - 8 r^2. Metric deltas <= 5e-3 (FP32: 1e-3), or - when labels are given - at most
    the share of (anomalous, normal) pairs whose reference scores are close enough for the
    tolerated score error to swap them (``auroc_swap_bound``), whichever is larger: near-tied
    scores (an untrained model, few objects) can move AUROC without any check being wrong; when
    a quarter or more of the pairs can swap, the check is reported as SKIP (not informative).
    Indices stay exact: preprocessing is FP32 on every backend.
    """
    checks = _score_tolerances(precision, reference, object_alpha, global_temperature)
    if reference.get("patch_point_probs") is None:  # a model with patch scores only
        checks = tuple(t for t in checks if t.output != "patch_point_probs")
    by_name = {t.output: t for t in checks}
    out = []
    for t in checks:
        if t.kind == "metric":
            level, labels = ("object_score", object_labels) if t.output == "o_auroc" else ("point_scores", point_labels)
            scores = reference.get(level)
            if labels is not None and scores is not None and np.size(labels) == np.size(scores):
                bound = auroc_swap_bound(labels, scores, by_name[level].limit)
                if bound > t.limit:
                    t = Tolerance(t.output, kind=t.kind, limit=bound,
                                  why=f"share of (anomalous, normal) pairs within 2 x tol({level}) = "
                                  f"{2 * by_name[level].limit:.1e} in the reference: swaps the tolerated score "
                                  f"error allows (> the {t.limit:g} floor)", informative=bound < 0.25)
        out.append(t)
    return tuple(out)


def _score_tolerances(precision, reference, object_alpha, global_temperature) -> tuple[Tolerance, ...]:
    if precision == "fp32":
        probs = FP32_ABS
        return (
            Tolerance("patch_probs", kind="abs", limit=probs, why="FP32: 1e-4 abs (the export's parity bar)"),
            Tolerance("patch_point_probs", kind="abs", limit=probs, why="FP32: 1e-4 abs (the export's parity bar)"),
            Tolerance("global_prob", kind="abs", limit=probs, why="FP32: 1e-4 abs"),
            Tolerance("object_score", kind="abs", limit=probs, why="FP32: 1e-4 abs"),
            Tolerance("point_scores", kind="abs", limit=probs, why="FP32: 1e-4 abs (means of patch probs)"),
            Tolerance("patch_embed", kind="cosine", limit=1 - 1e-5, why="FP32: cosine >= 1 - 1e-5"),
            Tolerance("fps_idx", kind="index", limit=1.0, why="identical FPS indices (the FPS rule)"),
            Tolerance("knn_idx", kind="index", limit=1.0, why="identical kNN index sets"),
            Tolerance("o_auroc", kind="metric", limit=1e-3, why="FP32: |delta| <= 1e-3"),
            Tolerance("p_auroc", kind="metric", limit=1e-3, why="FP32: |delta| <= 1e-3"),
        )
    if precision not in ("fp16", "int8"):
        raise ValueError(f"precision={precision!r}: expected fp32, fp16 or int8")
    r = FP16_REL
    patch_logits = reference.get("patch_logits")
    if patch_logits is None and reference.get("patch_probs") is not None:
        patch_logits = _logit(reference["patch_probs"])
    if patch_logits is not None and np.size(patch_logits):
        lg = np.asarray(patch_logits, dtype=np.float64)
        s = 1.0 / (1.0 + np.exp(-lg))
        tol_patch = float(np.max(s * (1 - s) * np.maximum(np.abs(lg), 1.0))) * r
    else:
        tol_patch = 0.25 * r
    if reference.get("global_prob") is not None and np.size(reference["global_prob"]):
        g = np.asarray(reference["global_prob"], dtype=np.float64)
        slope = float(np.max(g * (1 - g)))
    else:
        slope = 0.25
    tol_global = slope * 2 * r / global_temperature
    tol_patch = max(tol_patch, FP32_ABS)
    tol_global = max(tol_global, FP32_ABS)
    tol_object = object_alpha * tol_global + (1 - object_alpha) * tol_patch
    label = f"{precision.upper()} r=16u={r:.4f}"
    note = "" if precision == "fp16" else " (INT8 held to the FP16 rule)"
    return (
        Tolerance("patch_probs", kind="abs", limit=tol_patch,
                  why=f"{label}: max sigma'(l)*r*max(|l|,1) over the reference patch logits{note}"),
        Tolerance("patch_point_probs", kind="abs", limit=tol_patch,
                  why=f"{label}: = tol_patch (patch logit + a per-point term)"),
        Tolerance("global_prob", kind="abs", limit=tol_global,
                  why=f"{label}: max sigma'(l_g)*2r/T, T={global_temperature}"),
        Tolerance("object_score", kind="abs", limit=tol_object,
                  why=f"{label}: alpha*tol_global + (1-alpha)*tol_patch, alpha={object_alpha}"),
        Tolerance("point_scores", kind="abs", limit=tol_patch, why=f"{label}: = tol_patch (means of patch probs)"),
        Tolerance("patch_embed", kind="cosine", limit=1 - 8 * r * r,
                  why=f"{label}: 1 - cos ~ r^2/2, 4r allowed: >= 1 - 8r^2"),
        Tolerance("fps_idx", kind="index", limit=1.0, why="identical FPS indices (FP32 preprocessing everywhere)"),
        Tolerance("knn_idx", kind="index", limit=1.0, why="identical kNN index sets (FP32 preprocessing everywhere)"),
        Tolerance("o_auroc", kind="metric", limit=5e-3,
                  why=f"{precision.upper()}: |delta| <= 5e-3 (near-ties may swap)"),
        Tolerance("p_auroc", kind="metric", limit=5e-3, why=f"{precision.upper()}: |delta| <= 5e-3"),
    )


def overall(results: Sequence[CheckResult]) -> str:
    """PASS if every checked result passed, FAIL if any failed; SKIP if nothing was checked."""
    checked = [r for r in results if r.passed is not None]
    if not checked:
        return "SKIP"
    return "PASS" if all(r.passed for r in checked) else "FAIL"


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e-2 and abs(value) < 1e4:
        return f"{value:.4f}"
    return f"{value:.2e}"
