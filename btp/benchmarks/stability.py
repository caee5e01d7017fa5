"""`btp-bench stability`: how far a scan's object score moves when nothing but its sampling changes.

For every test scan of the given sets (``<set>/<class>/test/*``, e.g. ``btp data eval-sets``) the
same points are scored as they are, in ``permutations`` random row orders, with ``drop_share`` of
the points dropped at random (``drops`` times), and turned about their centroid by a random axis
and an angle of up to ``pose_deg`` degrees (``poses`` times: the same part placed a little
differently on the line), all in one batched engine call per scan. Per scan: the standard
deviation of the object score over the permutations, over the drops and over the poses (numpy's
population std), and the largest difference from the unchanged file over the first two (a turned
scan is another scan of the part, not the same points). The goal (``GOAL_STD``) is one tenth of
the smallest defect signal measured on the demo's bottle; it is asked of the permutations and
drops.

Every sampling order (``preprocess.sampling_order``: "input", "canonical") runs on the same
variants of the same scans, and the end-to-end time of one scan at batch 1 is measured for each
order in alternating turns (A B A B) on the first scans, so the cost ratio comes from one run.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np

GOAL_STD = 0.003
SCAN_SUFFIXES = (".pcd", ".ply", ".npy", ".npz", ".xyz", ".txt", ".csv")


def test_scans(roots, limit: int | None = None) -> list[Path]:
    """The test scans of each set root (``<root>/<class>/test/*``), sorted; ``limit`` per root,
    spread evenly over the sorted list."""
    files: list[Path] = []
    for root in roots:
        found = sorted(p for p in Path(root).glob("*/test/*") if p.suffix.lower() in SCAN_SUFFIXES)
        if limit and len(found) > limit:
            found = [found[i] for i in np.linspace(0, len(found) - 1, limit).round().astype(int)]
        files += found
    return files


def variants(points: np.ndarray, permutations: int, drops: int, drop_share: float,
             rng: np.random.Generator, poses: int = 0, pose_deg: float = 10.0) -> list[np.ndarray]:
    """[the scan, its rows permuted ``permutations`` times, ``drops`` copies with ``drop_share`` of
    the rows removed at random (at least one), ``poses`` copies turned about the centroid by a
    uniformly random axis and an angle uniform in [0, ``pose_deg``] degrees]."""
    from scipy.spatial.transform import Rotation

    m = len(points)
    keep = m - max(1, int(round(drop_share * m)))
    out = [points]
    out += [points[rng.permutation(m)] for _ in range(permutations)]
    out += [points[np.sort(rng.choice(m, keep, replace=False))] for _ in range(drops)]
    center = points.mean(axis=0, dtype=np.float64)
    for _ in range(poses):
        axis = rng.normal(size=3)
        angle = np.deg2rad(rng.uniform(0.0, pose_deg))
        turn = Rotation.from_rotvec(axis / np.linalg.norm(axis) * angle).as_matrix()
        out.append(((points - center) @ turn.T + center).astype(points.dtype))
    return out


def run_stability(model, files, *, orders=("input", "canonical"), permutations: int = 8, drops: int = 8,
                  drop_share: float = 0.001, poses: int = 8, pose_deg: float = 10.0, seed: int = 0,
                  downsample: str = "auto", timing_scans: int = 4, timing_turns: int = 5,
                  progress: Callable[[str], None] | None = None) -> dict:
    from btp.benchmarks.machine import describe_machine
    from btp.io import read_point_cloud
    from btp.runtime.pipeline import Pipeline

    pipes = {}
    for order in orders:
        pipe = Pipeline(model, downsample=downsample)
        pipe.cfg.preprocess.sampling_order = order
        pipes[order] = pipe
    rows = []
    for i, path in enumerate(files):
        points = read_point_cloud(path).points
        scans = variants(points, permutations, drops, drop_share, np.random.default_rng([seed, i]), poses, pose_deg)
        row = {"file": str(path), "points": int(len(points))}
        same = 1 + permutations + drops  # the variants holding the same points
        for order, pipe in pipes.items():
            scores = np.array([r.object_score for r in pipe.run_batch(scans)])
            perm, drop, pose = scores[1:1 + permutations], scores[1 + permutations:same], scores[same:]
            row[order] = {"score": float(scores[0]), "perm_std": float(perm.std()), "drop_std": float(drop.std()),
                          "pose_std": float(pose.std()) if poses else None,
                          "max_diff": float(np.abs(scores[1:same] - scores[0]).max())}
        rows.append(row)
        if progress:
            progress(f"[{i + 1}/{len(files)}] {path.parent.parent.name}/{path.name}: " + ", ".join(
                f"{o} perm {row[o]['perm_std']:.4f} drop {row[o]['drop_std']:.4f}"
                + (f" pose {row[o]['pose_std']:.4f}" if poses else "") for o in orders))
    summary = {order: _summary([r[order] for r in rows]) for order in orders}
    return {"machine": describe_machine(), "model": str(model), "downsample": downsample, "orders": list(orders),
            "permutations": permutations, "drops": drops, "drop_share": drop_share, "poses": poses,
            "pose_deg": pose_deg, "seed": seed, "goal_std": GOAL_STD, "summary": summary,
            "timing": _timing(pipes, files[:timing_scans], timing_turns), "scans": rows}


def _summary(entries: list[dict]) -> dict:
    out = {}
    for key in ("perm_std", "drop_std", "pose_std", "max_diff"):
        if entries and entries[0].get(key) is None:
            continue
        values = np.array([e[key] for e in entries])
        out[key] = {"median": float(np.median(values)), "max": float(values.max()),
                    "share_within_goal": float((values <= GOAL_STD).mean()) if key != "max_diff" else None}
    return out


def _timing(pipes: dict, files, turns: int) -> dict:
    """Median end-to-end ms of one scan at batch 1 (file already read) per order, A B A B."""
    from btp.io import read_point_cloud

    clouds = [read_point_cloud(f).points for f in files]
    times: dict[str, list[float]] = {order: [] for order in pipes}
    for points in clouds:
        for pipe in pipes.values():  # warm-up
            pipe(points)
    for _ in range(turns):
        for order, pipe in pipes.items():
            for points in clouds:
                t0 = time.perf_counter()
                pipe(points)
                times[order].append((time.perf_counter() - t0) * 1e3)
    medians = {order: statistics.median(v) for order, v in times.items()}
    return {"scans": [str(f) for f in files], "median_ms": medians, "calls": {o: len(v) for o, v in times.items()}}


def stability_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    orders = data["orders"]
    poses = data.get("poses", 0)
    lines = ["# Object-score stability (`btp-bench stability`)", "",
             f"- Machine: {machine_line(data['machine'])}",
             f"- Model: `{data['model']}`; downsampling rule `{data['downsample']}`; {len(data['scans'])} scans",
             f"- Per scan: {data['permutations']} random row orders and {data['drops']} random drops of "
             f"{data['drop_share']:.1%} of the points"
             + (f", and {poses} poses (turned about the centroid by up to {data['pose_deg']:g} degrees)" if poses
                else "")
             + f" (seed {data['seed']}); std = population std of the object score; goal <= {data['goal_std']} "
             "on every scan for the row orders and drops", "",
             "| sampling order | perm std median | perm std max | within goal | drop std median | drop std max "
             "| within goal | max diff from file |" + (" pose std median | pose std max |" if poses else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if poses else "")]
    for order in orders:
        s = data["summary"][order]
        lines.append(f"| {order} | {s['perm_std']['median']:.4f} | {s['perm_std']['max']:.4f} | "
                     f"{s['perm_std']['share_within_goal']:.0%} | {s['drop_std']['median']:.4f} | "
                     f"{s['drop_std']['max']:.4f} | {s['drop_std']['share_within_goal']:.0%} | "
                     f"{s['max_diff']['max']:.4f} |"
                     + (f" {s['pose_std']['median']:.4f} | {s['pose_std']['max']:.4f} |" if poses else ""))
    timing = data["timing"]
    base = timing["median_ms"][orders[0]]
    lines += ["", f"End to end at batch 1 (median over {timing['calls'][orders[0]]} calls per order, "
              f"alternating turns, {len(timing['scans'])} scans):", "", "| sampling order | ms | vs "
              f"{orders[0]} |", "|---|---|---|"]
    lines += [f"| {o} | {timing['median_ms'][o]:.1f} | {timing['median_ms'][o] / base:.2f}x |" for o in orders]
    cell = "score / perm std / drop std" + (" / pose std" if poses else "")
    lines += ["", "| scan | points | " + " | ".join(f"{o} {cell}" for o in orders) + " |",
              "|---|---|" + "---|" * len(orders)]
    for r in data["scans"]:
        name = "/".join(Path(r["file"]).parts[-3:])
        cells = [f"{r[o]['score']:.3f} / {r[o]['perm_std']:.4f} / {r[o]['drop_std']:.4f}"
                 + (f" / {r[o]['pose_std']:.4f}" if poses else "") for o in orders]
        lines.append(f"| {name} | {r['points']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
