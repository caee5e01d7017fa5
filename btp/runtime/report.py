"""A browsable inspection report of one batch or one shift: ``report.html`` beside the outputs.

    btp-run model.onnx scans/ --out results/ --report html
    btp report results/                      # the same from a finished run's files
    btp report OUT/                          # a `btp watch` folder: from its ledger (e.g. a shift)

``report.html`` needs no network. Its first screen is the overview: counts (OK / NG / failed),
the object-score threshold and where it came from, a histogram of object scores per part with
the threshold line, and thumbnails of every scan sorted by score (click: its full views). Below,
a sortable table (part, serial, time, score, regions; failed files with their error) with a CSV
download; a row opens the three-view heat map (``<stem>.png``), the defect regions and an
interactive 3D view drawn with three.js (vendored under ``report_assets/``, MIT licence beside it)
that starts in the front view with the scan's axes, and the ground truth overlaid when known. A scan
checked against its part's reference (btp-run / btp watch --reference) also shows the part, its
routing rule, the registration fitness, the fused, reference and zero-shot scores, the part's
threshold, and the views of its fused map (``<stem>.fused.png``, also its thumbnail) and of its
signed deviation from the template in scan units (``<stem>.deviation.png``); its 3D view starts
coloured by the fused map, with a menu for the deviation and the zero-shot map. Each
cloud is a small script ``report_assets/clouds/<stem>.js`` (at most ``CLOUD_BUDGET`` points, evenly
strided, so a 5M-point scan stays responsive), loaded only when its 3D view is opened. The page is
``assets/report.html.template``, filled in here. Torch-free.
"""
from __future__ import annotations

import base64
import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btp.io.files import atomic_write_bytes

TEMPLATE = "report.html.template"
TRUTH_DIR = "ground_truth"  # <stem>.npy: the known defect points of a scan (1 per point), when known
MAX_LISTED_REGIONS = 20  # per scan in the page; the scan's JSON has all of them

ASSETS = Path(__file__).with_name("assets")
ASSET_DIR = "report_assets"
CLOUD_BUDGET = 20000


@dataclass(kw_only=True)
class ReportEntry:
    """One scan of the report: its btp-run JSON document (None when it failed, then ``error``);
    for the 3D view its points [M, 3] and scores [M] (either may be None); ``truth``: the known
    defect points (bool [M]) when there is a ground truth (demo, eval sets); part, serial and
    time (UTC ISO) as the ledger has them (default: from the file name, and the JSON's time);
    ``maps``: with a part's reference, {"fused", "deviation"} float32 [M] for the 3D view, and
    ``reference_threshold`` the part's threshold (the fused map's scale)."""

    file: str
    stem: str
    doc: dict[str, Any] | None = None
    error: str | None = None
    points: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)
    truth: np.ndarray | None = field(default=None, repr=False)
    part: str | None = None
    serial: str | None = None
    time: str | None = None
    maps: dict[str, np.ndarray] | None = field(default=None, repr=False)
    reference_threshold: float | None = None


def _turbo_bytes(scores: np.ndarray) -> np.ndarray:
    from btp.io import heat_colors

    return heat_colors(scores, vmin=0.0, vmax=1.0).astype(np.uint8)


def write_cloud_asset(path: Path, stem: str, points: np.ndarray, scores: np.ndarray, budget: int = CLOUD_BUDGET,
                      truth: np.ndarray | None = None, maps: dict[str, np.ndarray] | None = None,
                      reference_threshold: float | None = None) -> Path:
    """``window.BTP_CLOUDS[stem] = {n, xyz (float32 base64), rgb (uint8 base64), axes, truth}``: the
    points centered, turned into the frame of the first view of ``btp.runtime.views.view_axes``
    (right, up, towards the camera: a camera on +z sees that view) and scaled to unit radius -
    display only; ``axes``: the scan's x, y, z unit vectors in that frame; ``truth``: one byte per
    point, 1 for a known defect point (only with ``truth``); ``maps``: {"fused": rgb, "deviation": rgb}
    (base64 uint8) of a scan checked against its part (``maps`` and ``reference_threshold`` given),
    coloured as its fused and deviation views (btp.runtime.views.fused_scale, deviation_scale)."""
    from btp.runtime.views import deviation_scale, fused_scale, map_colors, view_axes

    pts = np.asarray(points, dtype=np.float32)
    sc = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0)
    gt = None if truth is None else np.asarray(truth, dtype=bool)
    if len(pts) > budget:
        keep = np.linspace(0, len(pts) - 1, budget).astype(np.int64)
        pts, sc = pts[keep], sc[keep]
        gt = None if gt is None else gt[keep]
        maps = None if maps is None else {k: np.asarray(v)[keep] for k, v in maps.items()}
    centered = (pts - pts.mean(axis=0)).astype(np.float64)
    _, d, u, v = view_axes(pts, sc)[0]
    frame = np.stack([u, v, d], axis=1)  # columns: display x, y, z
    shown = centered @ frame
    radius = float(np.linalg.norm(shown, axis=1).max()) or 1.0
    xyz = (shown / radius).astype("<f4")
    payload = {"n": int(len(xyz)), "xyz": base64.b64encode(xyz.tobytes()).decode(),
               "rgb": base64.b64encode(_turbo_bytes(sc).tobytes()).decode(),
               "axes": [[round(float(c), 6) for c in row] for row in frame]}
    if maps is not None and reference_threshold is not None:
        colours = {"fused": map_colors(maps["fused"], fused_scale(reference_threshold)),
                   "deviation": map_colors(maps["deviation"], deviation_scale(maps["deviation"]))}
        payload["maps"] = {k: base64.b64encode(np.ascontiguousarray(v).tobytes()).decode() for k, v in colours.items()}
    if gt is not None:
        payload["truth"] = base64.b64encode(gt.astype(np.uint8).tobytes()).decode()
    text = f"window.BTP_CLOUDS = window.BTP_CLOUDS || {{}};\nwindow.BTP_CLOUDS[{json.dumps(stem)}] = {json.dumps(payload)};\n"
    return atomic_write_bytes(path, text.encode())


VERDICTS = {"normal": "OK", "anomalous": "NG"}


def _row(entry: ReportEntry, out_dir: Path) -> dict[str, Any]:
    from btp.runtime.ledger import part_and_serial

    part, serial = part_and_serial(entry.file)
    common = {"stem": entry.stem, "file": entry.file, "part": entry.part or part, "serial": entry.serial or serial,
              "time": entry.time}
    d = entry.doc
    if d is None:
        return {**common, "status": "failed", "verdict": "FAILED", "score": None, "decision": None, "threshold": None,
                "threshold_source": None, "fraction": None, "points": None, "ms": None,
                "notes": entry.error or "failed", "image": None, "thumb": None, "cloud": False, "regions": None,
                "truth": None, "reference": None}
    ps = d.get("point_scores") or {}
    image = _image(d, out_dir, entry.stem, "png")
    threshold = d.get("threshold") or {}
    ref = _reference(d, out_dir, entry.stem)
    if ref is not None and ref["part"] and not entry.part:
        common["part"] = ref["part"]
    regions = d.get("regions", [])
    truth = None
    if entry.truth is not None and entry.scores is not None and len(entry.truth) == len(entry.scores):
        gt = np.asarray(entry.truth, dtype=bool)
        hot = np.nan_to_num(np.asarray(entry.scores, dtype=np.float64), nan=-1.0) >= ps.get("point_threshold", 0.5)
        truth = {"points": int(gt.sum()), "found": float((gt & hot).sum() / gt.sum()) if gt.any() else None}
    return {**common, "status": "ok", "verdict": VERDICTS.get(d.get("decision") or "", "NONE"),
            "score": d.get("object_score"), "decision": d.get("decision"), "threshold": threshold.get("value"),
            "threshold_source": threshold.get("source"), "fraction": ps.get("anomalous_fraction"),
            "points": d.get("points"), "ms": d.get("total_ms"), "notes": "; ".join(d.get("warnings", [])),
            "image": image, "point_threshold": ps.get("point_threshold"), "reference": ref,
            "thumb": (ref or {}).get("fused_image") or image,
            # a scan not checked against its part (no part matched, not registered) carries the
            # model's own score: it stays out of the part's histogram, whose threshold is the part's
            "hist": ref is None or ref["decision"] in VERDICTS,
            "zero_shot": d.get("zero_shot_score"), "fitness": (ref or {}).get("fitness"),
            "deviation": ((ref or {}).get("deviation") or {}).get("max_abs"),
            "cloud": entry.points is not None and entry.scores is not None,
            "regions": regions[:MAX_LISTED_REGIONS], "regions_left": max(len(regions) - MAX_LISTED_REGIONS, 0),
            "truth": truth}


def _image(doc: dict[str, Any], out_dir: Path, stem: str, kind: str) -> str | None:
    """The file name of a scan's image ``kind`` (png, fused_png, deviation_png) beside the report, if it is there."""
    suffix = {"png": ".png", "fused_png": ".fused.png", "deviation_png": ".deviation.png"}[kind]
    path = Path((doc.get("outputs") or {}).get(kind, out_dir / f"{stem}{suffix}"))
    return path.name if (out_dir / path.name).is_file() else None


def _reference(doc: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Any] | None:
    """The page's view of a scan's reference block (btp-run / btp watch --reference), or None."""
    ref = doc.get("reference")
    if not ref:
        return None
    keys = ("part", "route", "file", "decision", "registered", "fitness", "rmse", "object_score", "reference_score",
            "threshold", "deviation")
    return {**{k: ref.get(k) for k in keys}, "zero_shot_score": doc.get("zero_shot_score", ref.get("zero_shot_score")),
            "fused_image": _image(doc, out_dir, stem, "fused_png"),
            "deviation_image": _image(doc, out_dir, stem, "deviation_png")}


def write_report(out_dir: str | Path, entries: list[ReportEntry], *, title: str = "btp-edge inspection report",
                 model: str = "") -> Path:
    """Write ``out_dir/report.html`` (+ ``report_assets/``) for ``entries``; returns its path."""
    from datetime import datetime, timezone

    out_dir = Path(out_dir)
    assets = out_dir / ASSET_DIR
    (assets / "clouds").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ASSETS / "three.min.js", assets / "three.min.js")
    shutil.copyfile(ASSETS / "three.LICENSE.txt", assets / "three.LICENSE.txt")
    rows = []
    for entry in entries:
        row = _row(entry, out_dir)
        if row["cloud"]:
            write_cloud_asset(assets / "clouds" / f"{entry.stem}.js", entry.stem, entry.points, entry.scores,
                              truth=entry.truth, maps=entry.maps, reference_threshold=entry.reference_threshold)
        rows.append(row)
    thresholds = {}
    for r in rows:
        if r["threshold"] is not None:
            thresholds.setdefault((r["threshold"], r["threshold_source"]), None)
    point_thresholds = [r["point_threshold"] for r in rows if r.get("point_threshold") is not None]
    info = {"thresholds": [{"value": v, "source": src} for v, src in thresholds],
            "point_threshold": point_thresholds[0] if point_thresholds else None}
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (ASSETS / TEMPLATE).read_text()
    for key, value in (("__TITLE__", html.escape(title)), ("__MODEL__", html.escape(model)),
                       ("__GENERATED__", generated), ("__ROWS__", _script_json(rows)), ("__INFO__", _script_json(info))):
        page = page.replace(key, value)
    return atomic_write_bytes(out_dir / "report.html", page.encode())


def _script_json(value) -> str:
    """JSON safe inside a <script> element (no "</" to close it early; NaN as null)."""
    from btp.runtime.strict_json import finite

    return json.dumps(finite(value), allow_nan=False).replace("</", "<\\/")


def entries_from_outcomes(outcomes, truths=None) -> list[ReportEntry]:
    """ScanOutcome values of a run -> entries (points and scores from memory); ``truths``: the
    known defect points (bool per point) by stem, where there is a ground truth (the demo)."""
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    truths = truths or {}
    entries = []
    for oc in outcomes:
        entry = ReportEntry(file=str(oc.file), stem=oc.stem, doc=oc.document() if oc.ok else None, error=oc.error,
                            points=oc.result.points if oc.ok else None,
                            scores=oc.result.point_scores if oc.ok else None, truth=truths.get(oc.stem), time=now)
        guided = oc.result.reference if oc.ok else None
        if guided is not None and guided.scores is not None and guided.scores.registered:
            entry.maps = {"fused": guided.scores.fused, "deviation": guided.scores.deviation}
            entry.reference_threshold = guided.threshold
        entries.append(entry)
    return entries


def _attach_cloud(entry: ReportEntry, results_dir: Path) -> None:
    """The 3D view's points from ``<stem>.ply`` (or the source file) with the scores of ``<stem>.npy``,
    and the ground truth of ``TRUTH_DIR/<stem>.npy`` (one 0/1 per point) when there is one."""
    from btp.io import read_point_cloud

    npy = results_dir / f"{entry.stem}.npy"
    ply = results_dir / f"{entry.stem}.ply"
    try:
        scores = np.load(npy)
        scores = scores[np.isfinite(scores)]  # rows the reader dropped (NaN) have no point
        source = ply if ply.is_file() else Path(entry.file)
        points = read_point_cloud(source).points
        if len(points) == len(scores):
            entry.points, entry.scores = points, scores
            truth = results_dir / TRUTH_DIR / f"{entry.stem}.npy"
            if truth.is_file():
                mask = np.load(truth).astype(bool)
                entry.truth = mask if len(mask) == len(scores) else None
            _attach_maps(entry, results_dir)
    except Exception:  # the 3D view is optional: a missing or changed file only drops it
        pass


def _attach_maps(entry: ReportEntry, results_dir: Path) -> None:
    """The fused and deviation maps of ``<stem>.reference.npy`` (rows of the file; the rows the
    reader dropped are NaN there as in ``<stem>.npy``) and the part's threshold, for the 3D view."""
    threshold = ((entry.doc or {}).get("reference") or {}).get("threshold")
    path = results_dir / f"{entry.stem}.reference.npy"
    if threshold is None or not path.is_file():
        return
    rows = np.load(path)
    rows = rows[np.isfinite(rows).all(axis=1)]
    if rows.ndim == 2 and rows.shape[1] == 2 and len(rows) == len(entry.scores):
        entry.maps = {"fused": rows[:, 0], "deviation": rows[:, 1]}
        entry.reference_threshold = float(threshold)


def _utc_mtime(path: Path) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def entries_from_results(results_dir: str | Path, since: str | None = None, *, ledger: str | None = None,
                         station: str | None = None) -> tuple[list[ReportEntry], str]:
    """A finished btp-run or btp watch folder -> (entries, model name). With a ledger
    (``ledger``, else the folder's ``ledger.sqlite``) its rows - the latest of each file, scored at or
    after ``since``, of ``station`` if given (a shared PostgreSQL ledger: default this host's) - with
    each scan's ``<stem>.json``; without, every ``<stem>.json`` and the failures listed in
    ``summary.json``. Points and scores of the 3D views from the files beside them."""
    from btp.runtime.ledger import LEDGER_NAME

    results_dir = Path(results_dir)
    if ledger is not None or (results_dir / LEDGER_NAME).is_file():
        return _entries_from_ledger(results_dir, since, ledger, station)
    summary_path = results_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    entries = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name == "summary.json":
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(doc, dict) or "object_score" not in doc or "file" not in doc:
            continue
        entry = ReportEntry(file=doc["file"], stem=path.stem, doc=doc, time=_utc_mtime(path))
        _attach_cloud(entry, results_dir)
        entries.append(entry)
    for failed in summary.get("failed", []):
        entries.append(ReportEntry(file=failed["file"], stem=Path(failed["file"]).stem, error=failed.get("error")))
    return entries, Path(str(summary.get("model", ""))).name


def _entries_from_ledger(results_dir: Path, since: str | None, ledger: str | None,
                         station: str | None) -> tuple[list[ReportEntry], str]:
    from btp.runtime.ledger import is_url, open_existing

    with open_existing(ledger or results_dir) as book:
        rows = book.rows(since)
        if station is None and ledger is not None and is_url(ledger):
            station = book.station
    if station is not None:
        rows = [row for row in rows if row["station"] == station]
    latest = {row["path"]: row for row in rows}  # oldest first: the last one of a path wins
    entries, models = [], set()
    for row in latest.values():
        stem = row["stem"] or Path(row["path"]).stem
        time = (row["scored_at"] or "").replace("T", " ").rstrip("Z")[:19]
        common = dict(file=row["path"], stem=stem, part=row["part"], serial=row["serial"], time=time)
        models.add(Path(row["model"] or "").name)
        if row["status"] != "ok":
            entries.append(ReportEntry(error=row["error"], **common))
            continue
        doc = None
        path = results_dir / f"{stem}.json"
        try:
            doc = json.loads(path.read_text())
            if doc.get("file") != row["path"]:
                doc = None
        except (OSError, ValueError):
            pass
        if doc is None:  # the outputs are gone: what the ledger holds
            doc = {"file": row["path"], "object_score": row["object_score"], "decision": row["decision"],
                   "threshold": None if row["threshold"] is None else {"value": row["threshold"],
                                                                       "source": row["threshold_source"]},
                   "points": row["points"], "regions": row["regions"] or [], "total_ms": row["total_ms"],
                   "reference": row.get("reference")}
        entry = ReportEntry(doc=doc, **common)
        _attach_cloud(entry, results_dir)
        entries.append(entry)
    return entries, ", ".join(sorted(m for m in models if m))
