"""`btp-bench throughput`: btp-run on a folder of scans, serial loop vs reading ahead.

Writes ``files`` binary PCD scans of ``points`` points (sampled from three real meshes), then runs
``btp.runtime.run.run_files`` on them with ``prefetch=0`` (read, preprocess, engine, write one
after the other) and with ``prefetch=P`` (a reader thread prepares the next files and a writer
thread writes the last batch's outputs while the engine runs), alternating the two ``repeats``
times. Reports scans/s (median over repeats) and
checks that both modes wrote identical per-point scores.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

MESHES = ("cgal__stanford_bunny.ply", "cgal__pinion.ply", "trimesh__featuretype_block.ply")
GOAL = 1.3  # directory throughput >= 1.3x the serial loop on 2 cores


def run_throughput(model, *, files: int = 100, points: int = 40000, prefetch: int = 2, repeats: int = 3,
                   progress: Callable[[str], None] | None = None) -> dict:
    from btp.benchmarks.data import sample_cloud
    from btp.benchmarks.machine import describe_machine
    from btp.io import write_point_cloud
    from btp.runtime import Pipeline
    from btp.runtime.run import run_files

    say = progress or (lambda _msg: None)
    pipeline = Pipeline(model, preprocess="cpu")
    with tempfile.TemporaryDirectory(prefix="btp-throughput-") as tmp:
        tmp = Path(tmp)
        scans = []
        for i in range(files):
            path = tmp / "scans" / f"scan{i:03d}.pcd"
            path.parent.mkdir(exist_ok=True)
            write_point_cloud(path, sample_cloud(points, mesh=MESHES[i % len(MESHES)], seed=i))
            scans.append(path)
        say(f"{files} scans of {points} points written")
        runs: dict[str, list[float]] = {"serial": [], "prefetch": []}
        for r in range(repeats):
            for mode, depth in (("serial", 0), ("prefetch", prefetch)):
                out = tmp / f"{mode}-{r}"
                t0 = time.perf_counter()
                outcomes = run_files(pipeline, scans, out, heatmaps=("ply",), prefetch=depth)
                seconds = time.perf_counter() - t0
                failed = [o for o in outcomes if not o.ok]
                if failed:
                    raise RuntimeError(f"{len(failed)} scans failed in the {mode} run: {failed[0].error}")
                runs[mode].append(files / seconds)
                say(f"{mode} run {r + 1}: {files / seconds:.2f} scans/s")
        identical = all(np.array_equal(np.load(tmp / f"serial-0/{p.stem}.npy"), np.load(tmp / f"prefetch-0/{p.stem}.npy"))
                        for p in scans)
    serial, ahead = statistics.median(runs["serial"]), statistics.median(runs["prefetch"])
    return {"machine": describe_machine(), "model": str(model), "files": files, "points": points,
            "prefetch": prefetch, "repeats": repeats, "scans_per_s": runs,
            "median_scans_per_s": {"serial": serial, "prefetch": ahead}, "ratio": ahead / serial,
            "goal_ratio": GOAL, "met": ahead / serial >= GOAL, "outputs_identical": identical,
            "outputs": "per scan <stem>.npy, <stem>.ply, <stem>.json (btp-run's defaults)"}


def throughput_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    m = data["median_scans_per_s"]
    lines = ["# btp-run on a folder: serial loop vs reading ahead of the engine", "",
             f"- Machine: {machine_line(data['machine'])}", f"- Date (UTC): {data['machine']['date_utc']}",
             f"- Model: `{data['model']}`; {data['files']} binary PCD scans of {data['points']:,} points (three real "
             f"meshes), ORT CPU, CPU preprocessing, outputs {data['outputs']}.",
             f"- Run: `btp-bench throughput MODEL --files {data['files']} --points {data['points']} --prefetch "
             f"{data['prefetch']}`; the two modes alternated {data['repeats']} times, medians reported.", "",
             "| mode | scans/s (median) | runs |", "|---|---|---|",
             f"| serial (`--prefetch 0`) | {m['serial']:.2f} | {', '.join(f'{v:.2f}' for v in data['scans_per_s']['serial'])} |",
             f"| read ahead (`--prefetch {data['prefetch']}`) | {m['prefetch']:.2f} | "
             f"{', '.join(f'{v:.2f}' for v in data['scans_per_s']['prefetch'])} |", "",
             f"Ratio {data['ratio']:.2f}x (goal >= {data['goal_ratio']}x: **{'MET' if data['met'] else 'MISSED'}**). "
             f"Per-point scores of the two modes identical: {'yes' if data['outputs_identical'] else '**NO**'}."]
    return "\n".join(lines) + "\n"
