"""Cost of reference-guided inspection (``btp-bench reference``): build time, file size, the time
reference scoring adds to btp-run's end to end, and the bank's kNN library measured.

    4 good scans (a real mesh, random rotations) -> build_from_files -> PART.btpref (s, MB)
    per scan size M: Pipeline(model) vs Pipeline(model, reference=PART.btpref) on the same scan,
                     ``repeats`` warm calls each, interleaved (A B A B): medians, the median of
                     the paired ratios, and the 1-minute load average before and after
    bank kNN: numpy brute force vs pykdtree vs scipy cKDTree on the reference's own bank
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

GOALS = {"overhead": "<= 30 % of btp-run's end to end at 40k and 400k points", "build": "<= 15 s for 4 scans",
         "size": "<= 50 MB"}


def _turned(points: np.ndarray, seed: int) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return (points @ Rotation.random(random_state=seed).as_matrix().T).astype(np.float32)


def run_reference_bench(model: Path, *, sizes=(40_000, 400_000), build_points: int = 40_000, repeats: int = 7,
                        mesh: str | None = None, embeddings: bool = False, log=print) -> dict:
    """``embeddings``: the reference holds the model's patch embeddings (a second engine pass per scan)."""
    from btp.benchmarks.data import sample_cloud
    from btp.io import write_point_cloud
    from btp.runtime.guided import EMBEDDING_SETTINGS, Settings
    from btp.runtime.pipeline import Pipeline
    from btp.runtime.refbuild import build_from_files

    data: dict = {"model": str(model), "mesh": mesh or "default benchmark mesh", "goals": GOALS, "rows": [],
                  "embeddings": embeddings}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for i in range(4):
            files.append(tmp / f"good{i}.pcd")
            write_point_cloud(files[-1], _turned(sample_cloud(build_points, seed=100 + i), 100 + i))
        plain = Pipeline(model)
        t0 = time.perf_counter()
        ref = build_from_files(model, files, tmp / "part.btpref", pipeline=plain,
                               settings=EMBEDDING_SETTINGS if embeddings else Settings())
        data["build"] = {"scans": 4, "points_per_scan": build_points, "seconds": time.perf_counter() - t0,
                         "file_mb": (tmp / "part.btpref").stat().st_size / 1e6,
                         "bank": list(ref.arrays["bank"].shape), "template_points": int(len(ref.arrays["template"]))}
        log(f"build: {data['build']['seconds']:.1f} s, {data['build']['file_mb']:.2f} MB")
        guided = Pipeline(model, reference=tmp / "part.btpref")
        for n in sizes:
            scan = _turned(sample_cloud(n, seed=7), 7)
            plain(scan), guided(scan)  # warm-up
            times: dict[str, list[float]] = {"plain": [], "reference": []}
            stages: dict[str, list[float]] = {}
            registered = True
            load = [os.getloadavg()[0]]
            for _ in range(repeats):
                for name, pipe in (("plain", plain), ("reference", guided)):
                    t0 = time.perf_counter()
                    res = pipe(scan)
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    if name == "reference":
                        registered &= res.reference.scores.registered
                        for k, v in res.reference.scores.timings.items():
                            stages.setdefault(k, []).append(v)
            load.append(os.getloadavg()[0])
            # each reference call is paired with the plain call just before it: the median of the
            # pairs' ratios is steadier than the ratio of medians on a machine shared with other jobs
            pairs = np.asarray(times["reference"]) / np.asarray(times["plain"])
            row = {"points": n, "plain_ms": float(np.median(times["plain"])),
                   "reference_ms": float(np.median(times["reference"])), "calls": repeats,
                   "paired_overhead": float(np.median(pairs)) - 1.0, "registered": bool(registered),
                   "reference_stages_ms": {k: float(np.median(v)) for k, v in stages.items()},
                   "load_1min": [round(x, 1) for x in load]}
            row["overhead"] = row["reference_ms"] / row["plain_ms"] - 1.0
            data["rows"].append(row)
            log(f"{n} points: {row['plain_ms']:.0f} ms -> {row['reference_ms']:.0f} ms (+{100 * row['overhead']:.0f} %, "
                f"paired +{100 * row['paired_overhead']:.0f} %; load {load[0]:.1f} -> {load[1]:.1f})")
        data["knn"] = _knn(ref.arrays["bank"], guided)
    return data


def _knn(bank: np.ndarray, guided) -> list[dict]:
    """The bank's nearest-neighbour query, three libraries, on descriptors of a fresh scan."""
    from pykdtree.kdtree import KDTree
    from scipy.spatial import cKDTree

    from btp.benchmarks.data import sample_cloud
    from btp.runtime.guided import _features, _nearest_dist

    rs = guided.references.scorer(next(iter(guided.references.refs)))
    _, queries = _features(sample_cloud(40_000, seed=9), rs.template.mean(axis=0), rs.units, rs.settings)
    exact = cKDTree(bank).query(queries, k=1)[0]
    rows = []
    for name, fn in (("numpy brute force (float32 BLAS blocks)", lambda: _nearest_dist(bank, queries)),
                     ("pykdtree", lambda: KDTree(bank).query(queries, k=1)[0]),
                     ("scipy cKDTree", lambda: cKDTree(bank).query(queries, k=1)[0])):
        ts, got = [], None
        for _ in range(3):
            t0 = time.perf_counter()
            got = fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        rows.append({"library": name, "ms": float(np.median(ts)), "max_abs_error": float(np.abs(got - exact).max()),
                     "bank": list(bank.shape), "queries": int(len(queries))})
    return rows


def markdown(data: dict, machine_line: str, date: str) -> str:
    b = data["build"]
    lines = ["# Reference-guided inspection: cost", "", f"- Machine: {machine_line}", f"- Date (UTC): {date}",
             f"- Model: {data['model']}; scans sampled from {data['mesh']}, turned by random rotations",
             "- Reference: " + ("with the model's patch embeddings (`btp reference build --embeddings`: a second "
                                "engine pass per scan, in the template's frame)" if data.get("embeddings")
                                else "geometry and the zero-shot map (the default build)"),
             "- Run: `btp-bench reference`; medians of warm calls, the two pipelines interleaved (A B A B); "
             "paired overhead = median over the (A, B) pairs of B / A - 1", "",
             f"Build (4 scans of {b['points_per_scan']:,} points): {b['seconds']:.1f} s (goal {GOALS['build']}); "
             f"file {b['file_mb']:.2f} MB (goal {GOALS['size']}); bank {b['bank']}, template {b['template_points']:,} "
             "points.", "", "| points | calls | btp-run e2e ms | with reference ms | overhead | paired overhead | "
             "reference stages ms (median) | load (1 min) before -> after |", "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["reference_stages_ms"].items() if isinstance(v, float))
        load = " -> ".join(f"{x:.1f}" for x in r.get("load_1min", []))
        lines.append(f"| {r['points']:,} | {r.get('calls', '')} | {r['plain_ms']:.0f} | {r['reference_ms']:.0f} | "
                     f"+{100 * r['overhead']:.0f} % | +{100 * r.get('paired_overhead', r['overhead']):.0f} % | "
                     f"{stages} | {load} |")
    lines += ["", f"Goal: {GOALS['overhead']}.", "", "Nearest bank descriptor (99-d multi-scale FPFH):", "",
              "| library | ms | max abs error vs cKDTree | bank | queries |", "|---|---|---|---|---|"]
    for r in data["knn"]:
        lines.append(f"| {r['library']} | {r['ms']:.1f} | {r['max_abs_error']:.1e} | {r['bank']} | {r['queries']} |")
    return "\n".join(lines) + "\n"
