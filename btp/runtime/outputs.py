"""Everything btp-run writes, from ``ScanOutcome`` values (btp.runtime.outcome); every file atomically
(temp file in the same folder + os.replace). Per scan (``write_scan``):

    <stem>.npy   float32 [R]: one score per row of the file, in its order (NaN for dropped rows)
    <stem>.ply   the scan with an ``anomaly`` scalar and turbo heat colours (btp.io.write_point_cloud)
    <stem>.png   three views of the anomaly map (matplotlib Agg, no display; ``render_views``)
    <stem>.reference.npy  with --reference, a registered scan: float32 [R, 2] per file row: the fused
                 map (0 = a typical good point, 1 = the good scans' 99th percentile) and the signed
                 deviation from the template in the scan's units (NaN for dropped rows)
    <stem>.fused.ply  with --reference and ply heat maps, a registered scan: the fused map as its
                 ``anomaly`` scalar, coloured from 0 to twice the part's threshold (the threshold
                 mid-scale)
    <stem>.fused.png, <stem>.deviation.png  with --reference and png heat maps, a registered scan:
                 three views of the fused map (``fused_scale``: 0 to twice the part's threshold) and of
                 the signed deviation from the template in scan units (``deviation_scale``: blue inside,
                 red outside), both facing the fused map's highest values
    <stem>.json  ``ScanOutcome.document()``: object score, decision, point-score summary, timings
                 (written last: its presence means the scan's outputs are complete)

Per run: ``results.csv`` (``write_csv``, one row per scan, CSV_FIELDS), ``summary.json``
(``write_summary``), ``report.html`` (``write_report``, via btp.runtime.report).

Torch-free. A crash or Ctrl-C leaves complete files or none (a stray ``.<name>.*.tmp`` at most
during the write, removed on any exception).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from btp.errors import BTPError
from btp.io.files import atomic_write_bytes
from btp.runtime.outcome import ScanOutcome
from btp.runtime.strict_json import finite, jsonable
from btp.runtime.views import MapScale, deviation_scale, fused_scale, view_axes

CSV_FIELDS = ("file", "status", "object_score", "decision", "threshold", "points", "anomalous_points",
              "anomalous_fraction", "score_max", "score_mean", "total_ms", "error")


class OutputPlaceError(BTPError, OSError):
    """The output folder cannot take btp-run's files (the message says why)."""


def check_output_dir(out: str | Path, flag: str = "--out") -> Path:
    """Create ``out`` if needed and prove a file can be written there (before any scan is scored),
    or OutputPlaceError naming ``flag`` (the option or argument that gave the folder): an existing
    file, a device such as /dev/null, a read-only mount."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputPlaceError(f"{flag} {out} exists and is not a folder; give a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".btp-write-check", b"")
        (out / ".btp-write-check").unlink()
    except OSError as exc:
        raise OutputPlaceError(f"{flag} {out}: cannot write there ({exc.strerror or exc}); choose a writable folder") from None
    return out


def write_json(path: str | Path, doc: Any) -> Path:
    """Strict JSON (RFC 8259): a NaN or infinite number is written as null, never as NaN/Infinity."""
    text = json.dumps(finite(doc), indent=2, sort_keys=False, default=jsonable, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode())


def write_npy(path: str | Path, scores: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(scores, dtype=np.float32))
    return atomic_write_bytes(path, buf.getvalue())


def write_heatmap_ply(path: str | Path, points: np.ndarray, scores: np.ndarray) -> Path:
    """Colours on a fixed 0..1 scale (probabilities), so maps of different scans compare."""
    from btp.io import heat_colors, write_point_cloud

    return write_point_cloud(path, points, scalars=scores, colors=heat_colors(scores, vmin=0.0, vmax=1.0))


def _front_surface(x: np.ndarray, y: np.ndarray, depth: np.ndarray, extent: float, cells: int = 160) -> np.ndarray:
    """Indices of the points on the visible side: per cell of a cells x cells grid over the view,
    those within 3 % of the part's extent of the nearest point (a coarse depth buffer)."""
    cell = max(float(np.ptp(x)), float(np.ptp(y)), 1e-30) / cells
    ix = np.minimum(((x - x.min()) / cell).astype(np.int64), cells)
    iy = np.minimum(((y - y.min()) / cell).astype(np.int64), cells)
    key = ix * (cells + 1) + iy
    nearest = np.full((cells + 1) ** 2, -np.inf)
    np.maximum.at(nearest, key, depth)
    return np.flatnonzero(depth >= nearest[key] - 0.03 * extent)


def _nice_step(span: float, count: int = 5) -> float:
    """The smallest of 1, 2, 5 x 10^k that is at least span / count."""
    raw = max(span / count, 1e-12)
    power = 10.0 ** np.floor(np.log10(raw))
    return float(next(m * power for m in (1.0, 2.0, 5.0, 10.0) if m * power >= raw * (1 - 1e-9)))


def colorbar_ticks(mark: float | None, step: float | None = None, gap: float | None = None, *, vmin: float = 0.0,
                   vmax: float = 1.0, mark_label: str = "point threshold") -> tuple[list, list]:
    """(positions, labels) on a colour bar from ``vmin`` to ``vmax``: every ``step`` (default: a
    round step, 0.2 on 0..1), ``mark`` (e.g. the point threshold) as its own tick labelled
    ``mark_label``, and no two ticks closer than ``gap`` (default 8 % of the range; the regular
    ones near the mark are dropped), so labels never overlap."""
    span = vmax - vmin
    step = _nice_step(span) if step is None else step
    gap = 0.08 * span if gap is None else gap
    first = np.ceil(vmin / step - 1e-9) * step
    ticks = [round(float(t), 6) + 0.0 for t in np.arange(first, vmax + 1e-9 * span, step)]
    if mark is None or not vmin <= mark <= vmax:
        return ticks, [f"{t:g}" for t in ticks]
    kept = [t for t in ticks if abs(t - mark) >= gap]
    pos = sorted(kept + [mark])
    return pos, [f"{t:.3g} {mark_label}" if t == mark else f"{t:g}" for t in pos]


MAX_DRAWN_REGIONS = 9


def render_views(path: str | Path, points: np.ndarray, scores: np.ndarray, *, title: str = "",
                 point_threshold: float | None = None, max_points: int = 30000,
                 regions: list[dict] | None = None, scale: MapScale | None = None,
                 facing: np.ndarray | None = None) -> Path:
    """One PNG with three views of the heat-mapped scan from its principal axes (``view_axes``;
    Agg canvas, no display).

    Each view is an orthographic projection filling its panel, points drawn far to near so the
    visible surface is on top, coloured by ``scale`` (default: turbo on a fixed 0..1 scale with
    ``point_threshold`` as its mark); points at or above the mark get a black rim and the mark is
    a labelled tick of the colour bar. ``facing``: the map the views face the highest values of
    (default ``scores``; the fused map for the fused and deviation views, so that they match).
    ``regions`` (btp.runtime.regions as dicts, ``center`` in the frame of ``points``): the first
    MAX_DRAWN_REGIONS outlined by a circle and numbered 1, 2, ... as in the scan's JSON.
    Deterministic: an evenly strided subset of at most ``max_points`` points.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle

    scale = MapScale(mark=point_threshold) if scale is None else scale
    pts = np.asarray(points, dtype=np.float32)
    sc = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0)
    face = sc if facing is None else np.nan_to_num(np.asarray(facing, dtype=np.float32), nan=0.0)
    if len(pts) > max_points:
        keep = np.linspace(0, len(pts) - 1, max_points).astype(np.int64)
        pts, sc, face = pts[keep], sc[keep], face[keep]
    fig = Figure(figsize=(13.5, 4.9), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, gridspec_kw={"wspace": 0.02, "left": 0.01, "right": 0.86, "top": 0.86, "bottom": 0.02})
    art = None
    colour = dict(cmap=scale.cmap, vmin=scale.vmin, vmax=scale.vmax)
    hot_mask = sc >= scale.mark if scale.mark is not None else np.zeros(len(sc), bool)
    extent = float(np.ptp(pts, axis=0).max()) or 1.0
    for ax, (name, d, u, v) in zip(axes, view_axes(pts, face)):
        x, y, depth = pts @ u, pts @ v, pts @ d
        front = _front_surface(x, y, depth, extent)  # what an opaque part would show
        order = front[np.argsort(depth[front], kind="stable")]  # far first
        size = max(0.6, min(8.0, 12000.0 / max(len(order), 1)))
        art = ax.scatter(x[order], y[order], c=sc[order], s=size, linewidths=0, **colour)
        hot = order[hot_mask[order]]
        if len(hot):
            ax.scatter(x[hot], y[hot], c=sc[hot], s=size * 2.5, edgecolors="black", linewidths=0.3, **colour)
        for k, region in enumerate((regions or [])[:MAX_DRAWN_REGIONS], start=1):
            c = np.asarray(region["center"], dtype=np.float64)
            radius = max(0.5 * float(np.linalg.norm(region["extent"])), 0.02 * extent)
            ax.add_patch(Circle((c @ u, c @ v), radius, fill=False, edgecolor="black", linewidth=1.0))
            ax.annotate(str(k), (c @ u + radius * 0.72, c @ v + radius * 0.72), fontsize=8, fontweight="bold",
                        color="black", backgroundcolor=(1, 1, 1, 0.7))
        pad_x, pad_y = 0.03 * (np.ptp(x) or 1.0), 0.03 * (np.ptp(y) or 1.0)
        ax.set_xlim(x.min() - pad_x, x.max() + pad_x)
        ax.set_ylim(y.min() - pad_y, y.max() + pad_y)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    cax = fig.add_axes([0.875, 0.1, 0.012, 0.7])
    bar = fig.colorbar(art, cax=cax, label=scale.label)
    ticks, labels = colorbar_ticks(scale.mark, vmin=scale.vmin, vmax=scale.vmax, mark_label=scale.mark_label)
    bar.set_ticks(ticks, labels=labels, fontsize=7)
    if scale.mark is not None:
        bar.ax.axhline(scale.mark, color="black", linewidth=1.5)
    if title:
        fig.suptitle(title, fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return atomic_write_bytes(path, buf.getvalue())


SCAN_SUFFIXES = (".npy", ".reference.npy", ".ply", ".fused.ply", ".png", ".fused.png", ".deviation.png",
                 ".json")  # every file write_scan may leave for one scan


def write_scan(out_dir: Path, outcome: ScanOutcome, heatmaps: tuple[str, ...], *,
               json_file: bool = True) -> ScanOutcome:
    """A scored scan's files - npy, then the heat maps asked for (ply, png), then the JSON last (its
    presence marks a complete set) - and the outcome with their paths in ``outputs``."""
    r = outcome.result

    def place(suffix: str) -> Path:  # the stem may hold a dot (a.ply): append, never replace a suffix
        return Path(out_dir) / f"{outcome.stem}{suffix}"

    files = {"npy": write_npy(place(".npy"), r.scores_per_row())}
    guided = r.reference.scores if r.reference is not None else None
    if guided is not None and guided.registered:
        maps = np.stack([guided.fused, guided.deviation], axis=1)  # [M, 2]
        if r.row_mask is not None:
            rows = np.full((len(r.row_mask), 2), np.nan, dtype=np.float32)
            rows[r.row_mask] = maps
            maps = rows
        files["reference"] = write_npy(place(".reference.npy"), maps)
    if "ply" in heatmaps:
        points = r.points if r.offset is None else r.points.astype(np.float64) + r.offset  # the scan's own frame
        files["ply"] = write_heatmap_ply(place(".ply"), points, r.point_scores)
        if guided is not None and guided.registered:
            from btp.io import heat_colors, write_point_cloud

            top = fused_scale(r.reference.threshold).vmax
            files["fused_ply"] = write_point_cloud(place(".fused.ply"), points, scalars=guided.fused,
                                                   colors=heat_colors(guided.fused, vmin=0.0, vmax=top))
    if "png" in heatmaps:
        decision = f" - {outcome.decision}" if outcome.decision else ""
        title = f"{outcome.file.name}: object score {r.object_score:.3f}{decision}"
        if r.reference is not None:  # the decision is the part's (fused views); this map is the model's own
            title = f"{outcome.file.name}: zero-shot map, the model's object score {r.object_score:.3f}"
        shift = np.zeros(3) if r.offset is None else np.asarray(r.offset, dtype=np.float64)  # regions: scan frame
        drawn = [dict(reg, center=list(np.asarray(reg["center"]) - shift)) for reg in outcome.regions]
        fused = guided is not None and guided.registered  # then the regions are the fused map's: drawn there
        files["png"] = render_views(place(".png"), r.points, r.point_scores, title=title,
                                    point_threshold=outcome.point_scores.point_threshold,
                                    regions=None if fused else drawn)
        if fused:
            part = r.reference.part
            files["fused_png"] = render_views(
                place(".fused.png"), r.points, guided.fused, scale=fused_scale(r.reference.threshold), regions=drawn,
                title=f"{outcome.file.name}: part {part}, fused score {guided.object_score:.3f}{decision}")
            dev = np.abs(guided.deviation)
            files["deviation_png"] = render_views(
                place(".deviation.png"), r.points, guided.deviation, scale=deviation_scale(guided.deviation),
                facing=guided.fused, title=f"{outcome.file.name}: deviation from the template of {part} "
                                           f"(max |d| {dev.max():.4g}, p99 {np.quantile(dev, 0.99):.4g} scan units)")
    outcome = dataclasses.replace(outcome, outputs=files)
    if json_file:
        write_json(place(".json"), outcome.document())
    return outcome


def remove_scan(out_dir: Path, stem: str) -> None:
    """Delete every output file of one scan (a scan has a complete set of outputs or none)."""
    for suffix in SCAN_SUFFIXES:
        (Path(out_dir) / f"{stem}{suffix}").unlink(missing_ok=True)


def csv_row(outcome: ScanOutcome) -> dict[str, Any]:
    """One line of results.csv (CSV_FIELDS)."""
    if not outcome.ok:
        return {"file": str(outcome.file), "status": "error", "error": outcome.error}
    ps = outcome.point_scores
    return {"file": str(outcome.file), "status": "ok", "object_score": f"{outcome.object_score:.6f}",
            "decision": outcome.decision or "",
            "threshold": "" if outcome.threshold is None else outcome.threshold.value, "points": outcome.points,
            "anomalous_points": ps.anomalous_points, "anomalous_fraction": f"{ps.anomalous_fraction:.6f}",
            "score_max": f"{ps.max:.6f}", "score_mean": f"{ps.mean:.6f}", "total_ms": outcome.total_ms, "error": ""}


def write_csv(path: str | Path, outcomes: list[ScanOutcome]) -> Path:
    """results.csv: a header and one ``csv_row`` per outcome."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for outcome in outcomes:
        writer.writerow(csv_row(outcome))
    return atomic_write_bytes(path, buf.getvalue().encode())


def summary_document(outcomes: list[ScanOutcome], model_path: str | Path) -> dict[str, Any]:
    """summary.json: counts, every failure with its error, the object scores, the median time."""
    ok = [o for o in outcomes if o.ok]
    return {
        "model": str(model_path),
        "files": len(outcomes),
        "succeeded": len(ok),
        "failed": [{"file": str(o.file), "error": o.error} for o in outcomes if not o.ok],
        "object_scores": {str(o.file): o.object_score for o in ok},
        "median_total_ms": float(np.median([o.total_ms for o in ok])) if ok else None,
    }


def write_summary(out_dir: str | Path, outcomes: list[ScanOutcome], model_path: str | Path) -> Path:
    return write_json(Path(out_dir) / "summary.json", summary_document(outcomes, model_path))


def write_report(out_dir: str | Path, outcomes: list[ScanOutcome], *, model: str, title: str | None = None,
                 truths: dict[str, np.ndarray] | None = None) -> Path:
    """report.html (+ report_assets/) of the run: btp.runtime.report draws it from the outcomes
    (``truths``: the known defect points by stem, overlaid where there is a ground truth)."""
    from btp.runtime import report

    kwargs = {} if title is None else {"title": title}
    return report.write_report(out_dir, report.entries_from_outcomes(outcomes, truths), model=model, **kwargs)
