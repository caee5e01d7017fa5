"""The performance goals, evaluated from one run's measurements. Pure (dicts in, Goals out).

1. ORT CPU end-to-end >= 2x faster than PyTorch eager (default model, 2048-point scan, batch 1).
2. Pre- + post-processing <= 10% of end-to-end (ORT CPU, 2048 points): (e2e - engine) / e2e.
3. A 400k-point raw scan with full-resolution output <= 1.5x the 2048-point end-to-end time.
4. Our CPU FPS and kNN within 1.2x of the best library (or faster), every measured (N, G).
5. Encoder achieved GFLOP/s next to the measured matmul peak (reported, no target).

All times are p50 (median) end-to-end / stage milliseconds from the latency rows.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True, kw_only=True)
class Goal:
    name: str
    target: str
    measured: str
    value: float | None  # the ratio / fraction held against the limit
    limit: float | None
    met: bool | None  # None = informational or not measurable in this run
    detail: str = ""

    @property
    def verdict(self) -> str:
        return "n/a" if self.met is None else ("MET" if self.met else "MISSED")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["verdict"] = self.verdict
        return d


def _row(results: Sequence[dict], backend: str, points: int, batch: int = 1) -> dict | None:
    return next((r for r in results if r["backend"] == backend and r["points"] == points and r["batch"] == batch),
                None)


def _p50(row: dict, stage: str) -> float | None:
    s = row["stages"].get(stage)
    return None if s is None else float(s["p50"])


def evaluate_goals(latency: dict, ops_summary: Sequence[dict] | None = None, flops: dict | None = None,
                   peak: dict | None = None, *, small: int = 2048, large: int = 400000) -> list[Goal]:
    """``latency`` = LatencyReport.to_dict(); ``ops_summary`` = ops.ops_summary(); ``flops`` =
    FlopCount.to_dict() at batch 1; ``peak`` = MatmulPeak.to_dict()."""
    results = latency.get("results", [])
    goals: list[Goal] = []
    ort_small = _row(results, "ort-cpu", small)
    torch_small = _row(results, "torch", small)

    # 1. ORT vs torch
    if ort_small and torch_small:
        o, t = _p50(ort_small, "end_to_end"), _p50(torch_small, "end_to_end")
        speedup = t / o
        goals.append(Goal(name="ORT CPU vs PyTorch eager (e2e, 2048 pts)", target=">= 2.00x",
                          measured=f"{t:.1f} ms / {o:.1f} ms = {speedup:.2f}x", value=speedup, limit=2.0,
                          met=speedup >= 2.0,
                          detail="" if speedup >= 2.0 else
                          f"short by {2.0 / speedup:.2f}x: ORT e2e must reach {t / 2:.1f} ms"))
    else:
        goals.append(Goal(name="ORT CPU vs PyTorch eager (e2e, 2048 pts)", target=">= 2.00x", measured="not measured",
                          value=None, limit=2.0, met=None,
                          detail="needs ort-cpu and torch rows at 2048 points, batch 1"))

    # 2. pre+post share
    if ort_small and _p50(ort_small, "engine") is not None:
        e2e, engine = _p50(ort_small, "end_to_end"), _p50(ort_small, "engine")
        share = (e2e - engine) / e2e
        goals.append(Goal(name="pre+post share of e2e (ORT CPU, 2048 pts)", target="<= 10%",
                          measured=f"({e2e:.2f} - {engine:.2f}) / {e2e:.2f} ms = {share:.1%}", value=share, limit=0.10,
                          met=share <= 0.10,
                          detail="" if share <= 0.10 else
                          f"over by {share / 0.10:.2f}x: pre+post {e2e - engine:.2f} ms, allowed {engine / 9:.2f} ms"))
    else:
        goals.append(Goal(name="pre+post share of e2e (ORT CPU, 2048 pts)", target="<= 10%", measured="not measured",
                          value=None, limit=0.10, met=None,
                          detail="needs an ort-cpu row at 2048 points with an 'engine' stage"))

    # 3. 400k scan vs 2048
    ort_large = _row(results, "ort-cpu", large)
    if ort_small and ort_large:
        a, b = _p50(ort_small, "end_to_end"), _p50(ort_large, "end_to_end")
        ratio = b / a
        goals.append(Goal(name=f"{large // 1000}k-point scan vs 2048 (ORT CPU e2e)", target="<= 1.50x",
                          measured=f"{b:.1f} ms / {a:.1f} ms = {ratio:.2f}x", value=ratio, limit=1.5, met=ratio <= 1.5,
                          detail="" if ratio <= 1.5 else f"over by {ratio / 1.5:.2f}x: the {large}-point scan must "
                                                  f"take <= {1.5 * a:.1f} ms"))
    else:
        goals.append(Goal(name=f"{large // 1000}k-point scan vs 2048 (ORT CPU e2e)", target="<= 1.50x",
                          measured="not measured", value=None,
                          limit=1.5, met=None, detail=f"needs ort-cpu rows at {small} and {large} points"))

    # 3b. the 5M-point scan: time and memory (only when the run has that size)
    huge = 5_000_000
    ort_huge = _row(results, "ort-cpu", huge)
    if ort_small and ort_huge:
        a, b = _p50(ort_small, "end_to_end"), _p50(ort_huge, "end_to_end")
        ratio = b / a
        goals.append(Goal(name="5M-point scan vs 2048 (ORT CPU e2e)", target="<= 8.00x",
                          measured=f"{b:.0f} ms / {a:.1f} ms = {ratio:.1f}x",
                          value=ratio, limit=8.0, met=ratio <= 8.0,
                          detail="" if ratio <= 8.0 else f"over by {ratio / 8.0:.2f}x: must take <= {8 * a:.0f} ms"))
        rss = ort_huge.get("peak_rss_mb")
        if rss is not None:
            goals.append(Goal(name="5M-point scan peak RSS (ORT CPU, the benchmark process)", target="<= 1024 MB",
                              measured=f"{rss:.0f} MB",
                              value=rss, limit=1024.0, met=rss <= 1024.0,
                              detail="process peak while the row ran, the model and the 5M-point scan included"))

    # 4. FPS / kNN vs the best library
    for op in ("fps", "knn"):
        rows = [s for s in (ops_summary or []) if s["op"] == op]
        label = f"our CPU {op.upper()} vs best library"
        if not rows:
            goals.append(Goal(name=label, target="<= 1.20x", measured="not measured", value=None, limit=1.2, met=None,
                              detail="run with --ops"))
            continue
        worst = max(rows, key=lambda s: s["ratio_vs_best"])
        met = all(s["meets_goal"] for s in rows)
        exact = [s["ratio_vs_best_exact"] for s in rows if s.get("ratio_vs_best_exact") is not None]
        detail = (f"worst at N={worst['n_points']}, G={worst['n_groups']} vs {worst['best_library']}"
                  + (f"; vs the best library with the identical output: worst {max(exact):.2f}x" if exact else ""))
        goals.append(Goal(name=label, target="<= 1.20x",
                          measured=f"{min(s['ratio_vs_best'] for s in rows):.2f}x .. {worst['ratio_vs_best']:.2f}x "
                          f"over {len(rows)} sizes", value=worst["ratio_vs_best"], limit=1.2, met=met, detail=detail))

    # 5. GFLOP/s vs peak
    if flops and ort_small and _p50(ort_small, "engine") and peak:
        engine_s = _p50(ort_small, "engine") / 1e3
        achieved = flops["total"] / engine_s / 1e9
        goals.append(Goal(name="encoder achieved GFLOP/s (ORT CPU, batch 1)", target="report vs matmul peak",
                          measured=f"{flops['gflop']:.2f} GFLOP / {engine_s * 1e3:.2f} ms = {achieved:.0f} GFLOP/s "
                          f"= {achieved / peak['gflops']:.0%} of {peak['gflops']:.0f} GFLOP/s peak",
                          value=achieved / peak["gflops"], limit=None, met=None,
                          detail="FLOPs of MatMul/Gemm/Conv counted from the ONNX graph; peak = best float32 GEMM "
                          "(numpy/torch) on this machine"))
    else:
        goals.append(Goal(name="encoder achieved GFLOP/s (ORT CPU, batch 1)", target="report vs matmul peak",
                          measured="not measured",
                          value=None, limit=None, met=None,
                          detail="needs FLOPs, the matmul peak and an ort-cpu row at 2048 points"))
    return goals
