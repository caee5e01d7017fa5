"""A browsable inspection report of one batch: ``report.html`` beside the run's outputs.

    btp-run model.onnx scans/ --out results/ --report html
    btp report results/                      # the same from a finished run's files

``report.html`` needs no network: a sortable table of every scan (file, object score, decision,
anomalous share, points, time, warnings; failed files with their error), the three-view heat map
of each (``<stem>.png``), and an interactive 3D view of the heat-mapped cloud drawn with three.js
(vendored under ``report_assets/``, MIT licence beside it). Each cloud is a small script
``report_assets/clouds/<stem>.js`` (at most ``CLOUD_BUDGET`` points, evenly strided, so a
5M-point scan stays responsive), loaded only when its 3D view is opened. Torch-free.
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

ASSETS = Path(__file__).with_name("assets")
ASSET_DIR = "report_assets"
CLOUD_BUDGET = 20000


@dataclass
class ReportEntry:
    """One scan of the report: its btp-run JSON document (None when it failed) and, for the 3D view,
    its points [M, 3] and scores [M] (either may be None)."""

    file: str
    stem: str
    doc: dict[str, Any] | None = None
    error: str | None = None
    points: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)


def _turbo_bytes(scores: np.ndarray) -> np.ndarray:
    from btp.io import heat_colors

    return heat_colors(scores, vmin=0.0, vmax=1.0).astype(np.uint8)


def write_cloud_asset(path: Path, stem: str, points: np.ndarray, scores: np.ndarray, budget: int = CLOUD_BUDGET) -> Path:
    """``window.BTP_CLOUDS[stem] = {n, xyz (float32 base64), rgb (uint8 base64)}``: the points centred,
    turned to their principal axes (longest across the view) and scaled to unit radius - display only."""
    pts = np.asarray(points, dtype=np.float32)
    sc = np.nan_to_num(np.asarray(scores, dtype=np.float32), nan=0.0)
    if len(pts) > budget:
        keep = np.linspace(0, len(pts) - 1, budget).astype(np.int64)
        pts, sc = pts[keep], sc[keep]
    centred = (pts - pts.mean(axis=0)).astype(np.float64)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    centred = centred @ vecs[:, ::-1]  # the longest extent across the view, the next one up
    radius = float(np.linalg.norm(centred, axis=1).max()) or 1.0
    xyz = (centred / radius).astype("<f4")
    payload = {"n": int(len(xyz)), "xyz": base64.b64encode(xyz.tobytes()).decode(),
               "rgb": base64.b64encode(_turbo_bytes(sc).tobytes()).decode()}
    text = f"window.BTP_CLOUDS = window.BTP_CLOUDS || {{}};\nwindow.BTP_CLOUDS[{json.dumps(stem)}] = {json.dumps(payload)};\n"
    return atomic_write_bytes(path, text.encode())


def _row(entry: ReportEntry, out_dir: Path) -> dict[str, Any]:
    d = entry.doc
    if d is None:
        return {"stem": entry.stem, "file": entry.file, "status": "failed", "score": None, "decision": "failed",
                "fraction": None, "points": None, "ms": None, "notes": entry.error or "failed", "image": None,
                "cloud": False}
    ps = d.get("point_scores", {})
    image = Path(d.get("outputs", {}).get("png", out_dir / f"{entry.stem}.png"))
    return {"stem": entry.stem, "file": entry.file, "status": "ok", "score": d.get("object_score"),
            "decision": d.get("decision") or "no threshold", "fraction": ps.get("anomalous_fraction"),
            "points": d.get("points"), "ms": d.get("total_ms"), "notes": "; ".join(d.get("warnings", [])),
            "image": image.name if image.is_file() else None, "threshold": ps.get("point_threshold"),
            "cloud": entry.points is not None and entry.scores is not None}


def write_report(out_dir: str | Path, entries: list[ReportEntry], *, title: str = "btp-edge inspection report",
                 model: str = "") -> Path:
    """Write ``out_dir/report.html`` (+ ``report_assets/``) for ``entries``; returns its path."""
    out_dir = Path(out_dir)
    assets = out_dir / ASSET_DIR
    (assets / "clouds").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ASSETS / "three.min.js", assets / "three.min.js")
    shutil.copyfile(ASSETS / "three.LICENSE.txt", assets / "three.LICENSE.txt")
    rows = []
    for entry in entries:
        row = _row(entry, out_dir)
        if row["cloud"]:
            write_cloud_asset(assets / "clouds" / f"{entry.stem}.js", entry.stem, entry.points, entry.scores)
        rows.append(row)
    ok = [r for r in rows if r["status"] == "ok"]
    counts = {"scans": len(rows), "failed": len(rows) - len(ok),
              "anomalous": sum(r["decision"] == "anomalous" for r in ok)}
    page = _PAGE.replace("__TITLE__", html.escape(title)).replace("__MODEL__", html.escape(model))
    page = page.replace("__COUNTS__", html.escape(
        f"{counts['scans']} scans: {counts['anomalous']} anomalous, {counts['failed']} failed"
        + ("" if any(r["decision"] in ("anomalous", "normal") for r in ok) else
           " (no object-score threshold: run `btp calibrate` for decisions)")))
    page = page.replace("__ROWS__", json.dumps(rows).replace("</", "<\\/"))
    return atomic_write_bytes(out_dir / "report.html", page.encode())


def entries_from_outcomes(outcomes) -> list[ReportEntry]:
    """ScanOutcome values of a run -> entries (points and scores from memory)."""
    return [ReportEntry(str(oc.file), oc.stem, oc.document() if oc.ok else None, oc.error,
                        oc.result.points if oc.ok else None, oc.result.point_scores if oc.ok else None)
            for oc in outcomes]


def entries_from_results(results_dir: str | Path) -> tuple[list[ReportEntry], str]:
    """A finished btp-run folder -> entries: every ``<stem>.json`` scan document, the failures listed
    in ``summary.json``; the 3D view's points from ``<stem>.ply`` (or the source file) with the
    scores of ``<stem>.npy``."""
    from btp.io import read_point_cloud

    results_dir = Path(results_dir)
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
        entry = ReportEntry(doc["file"], path.stem, doc)
        npy = results_dir / f"{path.stem}.npy"
        ply = results_dir / f"{path.stem}.ply"
        try:
            scores = np.load(npy)
            scores = scores[np.isfinite(scores)]  # rows the reader dropped (NaN) have no point
            source = ply if ply.is_file() else Path(doc["file"])
            points = read_point_cloud(source).points
            if len(points) == len(scores):
                entry.points, entry.scores = points, scores
        except Exception:  # the 3D view is optional: a missing or changed file only drops it
            pass
        entries.append(entry)
    for failed in summary.get("failed", []):
        entries.append(ReportEntry(failed["file"], Path(failed["file"]).stem, None, failed.get("error")))
    return entries, Path(str(summary.get("model", ""))).name


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.2em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em} .sub{color:#555;margin-bottom:1em}
table{border-collapse:collapse;width:100%} th,td{padding:.35em .6em;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f3f3f3;user-select:none;white-space:nowrap} th.asc:after{content:" \\25B2"} th.desc:after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.failed td{color:#a00} tr.anomalous td.dec{color:#c40;font-weight:600} tr.scan{cursor:pointer} tr.scan:hover{background:#fafafa}
tr.detail td{background:#fcfcfc} img.views{max-width:100%;border:1px solid #ddd}
canvas.cloud{width:100%;height:420px;border:1px solid #ddd;display:block;margin-top:.5em;background:#fff}
button{margin:.4em .4em .4em 0}
</style></head><body>
<h1>__TITLE__</h1><div class="sub">__COUNTS__ &middot; model: __MODEL__ &middot; click a header to sort, a row for its heat map</div>
<table id="scans"><thead><tr>
<th data-key="file">file</th><th data-key="score" data-num="1">object score</th><th data-key="decision">decision</th>
<th data-key="fraction" data-num="1">anomalous points</th><th data-key="points" data-num="1">points</th>
<th data-key="ms" data-num="1">time ms</th><th data-key="notes">warnings / errors</th></tr></thead><tbody></tbody></table>
<script src="report_assets/three.min.js"></script>
<script>
const ROWS = __ROWS__;
const tbody = document.querySelector("#scans tbody");
const fmt = (v, d) => v === null || v === undefined ? "" : Number(v).toFixed(d);
function esc(s){return String(s ?? "").replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\\"":"&quot;"}[c]));}
function render(){
  tbody.innerHTML = "";
  for (const r of ROWS){
    const tr = document.createElement("tr");
    tr.className = "scan " + (r.status === "failed" ? "failed" : r.decision);
    tr.dataset.stem = r.stem;
    tr.innerHTML = `<td>${esc(r.file)}</td><td class="num">${fmt(r.score,4)}</td><td class="dec">${esc(r.decision)}</td>`
      + `<td class="num">${r.fraction === null ? "" : (100*r.fraction).toFixed(2)+" %"}</td><td class="num">${r.points ?? ""}</td>`
      + `<td class="num">${fmt(r.ms,1)}</td><td>${esc(r.notes)}</td>`;
    tr.addEventListener("click", () => toggle(tr, r));
    tbody.appendChild(tr);
  }
}
function toggle(tr, r){
  const next = tr.nextElementSibling;
  if (next && next.classList.contains("detail")){ next.remove(); return; }
  const d = document.createElement("tr"); d.className = "detail";
  const td = document.createElement("td"); td.colSpan = 7; d.appendChild(td);
  if (r.status === "failed"){ td.textContent = "not scored: " + r.notes; }
  else {
    td.innerHTML = (r.image ? `<img class="views" alt="heat map of ${esc(r.file)}" src="${encodeURI(r.image)}">` : "<p>no heat-map image (run with --heatmap png)</p>")
      + (r.cloud ? `<br><button>3D view</button>` : "");
    const b = td.querySelector("button");
    if (b) b.addEventListener("click", ev => { ev.stopPropagation(); b.remove(); openCloud(td, r.stem); });
  }
  tr.after(d);
}
function openCloud(td, stem){
  const s = document.createElement("script");
  s.src = "report_assets/clouds/" + encodeURIComponent(stem) + ".js";
  s.onload = () => draw(td, window.BTP_CLOUDS[stem]);
  s.onerror = () => td.appendChild(document.createTextNode(" (cloud file missing)"));
  document.body.appendChild(s);
}
function bytes(b64){ const s = atob(b64); const a = new Uint8Array(s.length); for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i); return a; }
function draw(td, cloud){
  const canvas = document.createElement("canvas"); canvas.className = "cloud"; td.appendChild(canvas);
  const renderer = new THREE.WebGLRenderer({canvas, antialias: true});
  renderer.setClearColor(0xffffff); renderer.setPixelRatio(window.devicePixelRatio);
  const w = canvas.clientWidth, h = canvas.clientHeight; renderer.setSize(w, h, false);
  const scene = new THREE.Scene(); const camera = new THREE.PerspectiveCamera(40, w / h, 0.01, 100); camera.position.set(0, 0, 2.6);
  const geom = new THREE.BufferGeometry();
  geom.setAttribute("position", new THREE.BufferAttribute(new Float32Array(bytes(cloud.xyz).buffer), 3));
  geom.setAttribute("color", new THREE.BufferAttribute(bytes(cloud.rgb), 3, true));
  const pts = new THREE.Points(geom, new THREE.PointsMaterial({size: 0.02, vertexColors: true}));
  scene.add(pts);
  let drag = null;
  canvas.addEventListener("pointerdown", e => { drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointerup", () => { drag = null; });
  canvas.addEventListener("pointermove", e => { if (!drag) return;
    pts.rotation.y += (e.clientX - drag[0]) * 0.01; pts.rotation.x += (e.clientY - drag[1]) * 0.01; drag = [e.clientX, e.clientY]; paint(); });
  canvas.addEventListener("wheel", e => { e.preventDefault(); camera.position.z = Math.min(10, Math.max(0.5, camera.position.z * (e.deltaY > 0 ? 1.1 : 0.9))); paint(); }, {passive: false});
  const paint = () => renderer.render(scene, camera); paint();
}
function sortBy(key, dir){
  const th = document.querySelector(`th[data-key="${key}"]`); if (!th) return;
  const num = th.dataset.num === "1", sign = dir === "asc" ? 1 : -1;
  ROWS.sort((a, b) => { const x = a[key], y = b[key];
    if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
    return sign * (num ? x - y : String(x).localeCompare(String(y))); });
  document.querySelectorAll("th").forEach(t => t.classList.remove("asc", "desc")); th.classList.add(dir);
  render();
}
document.querySelectorAll("th").forEach(th => th.addEventListener("click", () =>
  sortBy(th.dataset.key, th.classList.contains("desc") ? "asc" : "desc")));
// URL hash options (links, screenshots, checks): #sort=KEY-asc|desc&open=STEM&3d=1
const hash = new URLSearchParams(location.hash.slice(1));
const m = (hash.get("sort") || "").match(/^(\\w+)-(asc|desc)$/);
render(); if (m) sortBy(m[1], m[2]); else sortBy("score", "desc");
if (hash.get("open")){
  const tr = [...tbody.querySelectorAll("tr.scan")].find(t => t.dataset.stem === hash.get("open"));
  if (tr){ tr.click(); const b = tr.nextElementSibling.querySelector("button"); if (b && hash.get("3d") === "1") b.click(); }
}
</script></body></html>
"""
