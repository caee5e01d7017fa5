"""What btp-run writes per scan, every file atomically (temp file in the same folder + os.replace):

    <stem>.npy   float32 [M]: one score per point of the scan, in the file's point order
    <stem>.ply   the scan with an ``anomaly`` scalar and turbo heat colours (btp.io.write_point_cloud)
    <stem>.png   offscreen render of the anomaly map (matplotlib Agg, no display)
    <stem>.json  object score, decision, point-score summary, timings (written last: its presence
                 means the scan's outputs are complete)

Torch-free. A crash or Ctrl-C leaves complete files or none (a stray ``.<name>.*.tmp`` at most
during the write, removed on any exception).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from btp.io.files import atomic_write_bytes

POINT_THRESHOLD = 0.5  # default only: run summaries use the model's cfg.scoring.point_threshold
CSV_FIELDS = ("file", "status", "object_score", "decision", "threshold", "points", "anomalous_points",
              "anomalous_fraction", "score_max", "score_mean", "total_ms", "error")


def write_json(path: str | Path, doc: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def write_npy(path: str | Path, scores: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(scores, dtype=np.float32))
    return atomic_write_bytes(path, buf.getvalue())


def write_heatmap_ply(path: str | Path, points: np.ndarray, scores: np.ndarray) -> Path:
    """Colours on a fixed 0..1 scale (probabilities), so maps of different scans compare."""
    from btp.io import heat_colors, write_point_cloud

    return write_point_cloud(path, points, scalars=scores, colors=heat_colors(scores, vmin=0.0, vmax=1.0))


def render_png(path: str | Path, points: np.ndarray, scores: np.ndarray, title: str = "",
               max_points: int = 30000) -> Path:
    """Offscreen 3D scatter (Agg canvas, no pyplot state, no display), turbo colours on 0..1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = np.asarray(points, dtype=np.float32)
    sc = np.asarray(scores, dtype=np.float32)
    if len(pts) > max_points:  # evenly strided subset: deterministic, keeps the map readable
        keep = np.linspace(0, len(pts) - 1, max_points).astype(np.int64)
        pts, sc = pts[keep], sc[keep]
    order = np.argsort(sc, kind="stable")  # draw anomalous points last (on top)
    fig = Figure(figsize=(6, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(projection="3d")
    art = ax.scatter(pts[order, 0], pts[order, 1], pts[order, 2], c=sc[order], cmap="turbo", vmin=0.0, vmax=1.0,
                     s=1.5, linewidths=0)
    span = (pts.max(axis=0) - pts.min(axis=0)).max() / 2 or 1.0
    mid = (pts.max(axis=0) + pts.min(axis=0)) / 2
    ax.set_xlim(mid[0] - span, mid[0] + span)
    ax.set_ylim(mid[1] - span, mid[1] + span)
    ax.set_zlim(mid[2] - span, mid[2] + span)
    ax.set_axis_off()
    fig.colorbar(art, ax=ax, shrink=0.6, label="anomaly score")
    if title:
        ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def point_summary(scores: np.ndarray, point_threshold: float = POINT_THRESHOLD) -> dict[str, float]:
    s = np.asarray(scores, dtype=np.float64)
    anomalous = int((s >= point_threshold).sum())
    return {
        "min": float(s.min()), "max": float(s.max()), "mean": float(s.mean()),
        "p50": float(np.percentile(s, 50)), "p95": float(np.percentile(s, 95)), "p99": float(np.percentile(s, 99)),
        "point_threshold": point_threshold,
        "anomalous_points": anomalous,
        "anomalous_fraction": anomalous / max(len(s), 1),
    }


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_bytes(path, buf.getvalue().encode())


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
