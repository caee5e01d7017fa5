"""`btp bench whatif`: measured prototypes of runtime changes, before anyone edits btp.runtime.

Each variant runs the real ``btp.runtime.Pipeline`` (ORT CPU) in its own subprocess (thread
settings such as OMP_NUM_THREADS are read when a process starts), with the change applied as a
small, named patch. The report puts every variant's per-stage p50 next to the default, so the
runtime's owner sees what a change buys before making it. Variants:

- ``default``: the runtime as it is.
- ``omp1``: OMP_NUM_THREADS=1 (pykdtree's OpenMP kNN in group/interpolate single-threaded).
- ``nospin``: ORT session config ``session.intra_op.allow_spinning = 0`` (ORT's idle worker
  threads stop busy-waiting after a run, leaving the cores to the post-processing).
- ``omp1+nospin``: both.
- ``omp1+nospin+nearest1``: both, and the raw-scan interpolation as one plain pykdtree k=1
  query (no extra candidates, no exact tie resolution: ties at exactly equal distance have
  measure zero on real scans; where they happen the score is that of an equally near sample).
- ``ort1``: ORT with 1 intra-op thread (what a loaded / shared 2-core box may prefer).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default": {"env": {}, "spin": None, "nearest1": False, "threads": None},
    "omp1": {"env": {"OMP_NUM_THREADS": "1"}, "spin": None, "nearest1": False, "threads": None},
    "nospin": {"env": {}, "spin": "0", "nearest1": False, "threads": None},
    "omp1+nospin": {"env": {"OMP_NUM_THREADS": "1"}, "spin": "0", "nearest1": False, "threads": None},
    "omp1+nospin+nearest1": {"env": {"OMP_NUM_THREADS": "1"}, "spin": "0", "nearest1": True, "threads": None},
    "ort1": {"env": {}, "spin": None, "nearest1": False, "threads": 1},
}


def _apply(variant: dict) -> None:
    """Patch the runtime in this (child) process as the variant says."""
    if variant["spin"] is not None:
        from btp.runtime.backends import ort as ort_backend

        original = ort_backend.session_options

        def session_options(threads):
            opts = original(threads)
            opts.add_session_config_entry("session.intra_op.allow_spinning", variant["spin"])
            return opts

        ort_backend.session_options = session_options
    if variant["nearest1"]:
        import numpy as np
        from pykdtree.kdtree import KDTree

        from btp.runtime import stages

        exact = stages.interpolate

        def interpolate(sampled_scores, prep, cfg):
            if cfg.scoring.raw_interpolation != "nearest" or len(prep.sample_idx) == len(prep.raw_points):
                return exact(sampled_scores, prep, cfg)
            raw = prep.raw_points
            _, idx = KDTree(np.ascontiguousarray(raw[prep.sample_idx])).query(raw, k=1)
            return np.asarray(sampled_scores, dtype=np.float32)[idx.reshape(-1)]

        stages.interpolate = interpolate


def _child(model: str, name: str, points: list[int], warmup: float, duration: float, threads: int | None) -> dict:
    variant = VARIANTS[name]
    _apply(variant)
    from btp.benchmarks.latency import bench_one, make_scans
    from btp.runtime import Pipeline

    pipe = Pipeline(model, backend="ort-cpu", threads=variant["threads"] or threads)
    rows = []
    for n in points:
        stats, iters = bench_one(pipe, make_scans(n, 1), warmup_s=warmup, duration_s=duration)
        rows.append({"points": n, "iterations": iters, "stages": {k: v.to_dict() for k, v in stats.items()}})
    return {"variant": name, "rows": rows}


def run_whatif(model, *, variants=tuple(VARIANTS), points=(2048, 400000), warmup: float = 0.5,
               duration: float = 3.0, threads: int | None = None, progress=None) -> dict:
    from btp.benchmarks.machine import describe_machine

    out = {"machine": describe_machine(), "model": str(model), "points": list(points),
           "settings": {"warmup_s": warmup, "duration_s": duration, "threads": threads}, "variants": []}
    for name in variants:
        if progress:
            progress(f"variant {name}")
        env = dict(os.environ, **VARIANTS[name]["env"])
        args = [sys.executable, "-m", "btp.benchmarks.whatif", str(model), name, ",".join(map(str, points)),
                str(warmup), str(duration), str(threads or 0)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out["variants"].append({"variant": name, "error": proc.stderr.strip().splitlines()[-1:]})
            continue
        out["variants"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def whatif_markdown(data: dict) -> str:
    from btp.benchmarks.report import _header, _ordered_stages

    lines = _header("btp-bench whatif: measured prototypes of runtime changes (ORT CPU)", data["machine"])
    lines += [f"- Model: `{data['model']}`; settings {data['settings']}; one subprocess per variant.",
              "- Variants (see btp/benchmarks/whatif.py): " + "; ".join(VARIANTS), ""]
    for n in data["points"]:
        rows = [(v["variant"], next(r for r in v["rows"] if r["points"] == n)) for v in data["variants"] if "rows" in v]
        if not rows:
            continue
        stages = _ordered_stages({k for _, r in rows for k in r["stages"]})
        base = rows[0][1]["stages"]["end_to_end"]["p50"]
        lines += [f"## {n} points (p50 ms per stage)", "",
                  "| variant | e2e p50 | vs default | pre+post share | " + " | ".join(stages) + " |",
                  "|---|---|---|---|" + "---|" * len(stages)]
        for name, r in rows:
            e2e = r["stages"]["end_to_end"]["p50"]
            eng = r["stages"].get("engine", {}).get("p50", 0.0)
            cells = " | ".join(f"{r['stages'][s]['p50']:.2f}" if s in r["stages"] else "-" for s in stages)
            lines.append(f"| {name} | {e2e:.2f} | {e2e / base:.2f}x | {(e2e - eng) / e2e:.0%} | {cells} |")
        lines.append("")
    for v in data["variants"]:
        if "error" in v:
            lines.append(f"- {v['variant']}: failed: {v['error']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    model_arg, name_arg, points_arg, warm_arg, dur_arg, threads_arg = sys.argv[1:7]
    result = _child(model_arg, name_arg, [int(p) for p in points_arg.split(",")], float(warm_arg), float(dur_arg),
                    int(threads_arg) or None)
    print(json.dumps(result))
