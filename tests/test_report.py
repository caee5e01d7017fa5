"""The inspection report: btp-run --report html / btp report on a batch with a good scan, a
defective one and a failed file; its structure, its assets, and (where Debian's chromium is
installed) the page in a real headless browser: loads without console errors, sorts, draws the 3D view."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.io import write_point_cloud
from btp.runtime.views import principal_axes, view_axes
from runtime_helpers import real_scan, tiny_export

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                  "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-logging=stderr", "--v=0",
                  "--virtual-time-budget=8000"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory, shapes_root):
    model = tiny_export(tmp_path_factory)[0]
    d = tmp_path_factory.mktemp("scans")
    good = real_scan(shapes_root, n=4000, seed=1)
    bad = real_scan(shapes_root, n=4000, seed=2)
    bad[np.linalg.norm(bad - bad[0], axis=1) < 0.02 * np.ptp(bad, axis=0).max()] *= 1.05  # a bulge
    write_point_cloud(d / "part_good.pcd", good)
    write_point_cloud(d / "part_dent.pcd", bad)
    (d / "broken.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\n")  # truncated header
    out = tmp_path_factory.mktemp("results")
    res = CliRunner().invoke(app, ["run", str(model), str(d), "--out", str(out), "--report", "html",
                                   "--threshold", "0.5"])
    assert res.exit_code == 1, res.output  # one file failed
    return out


def _rows(page: str) -> list[dict]:
    return json.loads(re.search(r"const ROWS = (.*);\n", page).group(1))


def test_report_lists_every_scan_and_the_failure(batch):
    page = (batch / "report.html").read_text()
    rows = {r["stem"]: r for r in _rows(page)}
    assert set(rows) == {"part_good", "part_dent", "broken"}
    assert rows["broken"]["status"] == "failed" and "broken.ply" in rows["broken"]["file"]
    assert rows["broken"]["notes"]  # the reason, as btp-run reported it
    summary = json.loads((batch / "summary.json").read_text())
    assert rows["broken"]["notes"] == summary["failed"][0]["error"]
    for stem in ("part_good", "part_dent"):
        r = rows[stem]
        assert r["status"] == "ok" and r["decision"] in ("normal", "anomalous") and 0 <= r["score"] <= 1
        assert (batch / r["image"]).is_file()  # the three-view heat map it references
        assert r["cloud"] and (batch / "report_assets" / "clouds" / f"{stem}.js").is_file()
    assert (batch / "report_assets" / "three.min.js").is_file()
    assert "MIT" in (batch / "report_assets" / "three.LICENSE.txt").read_text()
    assert "http://" not in page and "https://" not in page  # nothing fetched at view time


def test_btp_report_rebuilds_it_from_the_files(batch, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(batch, copy)
    (copy / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    rows = _rows((copy / "report.html").read_text())
    assert sorted(r["stem"] for r in rows) == ["broken", "part_dent", "part_good"]
    assert all(r["cloud"] for r in rows if r["status"] == "ok")


def test_cloud_asset_respects_the_point_budget(tmp_path, shapes_root):
    from btp.runtime.report import write_cloud_asset

    pts = real_scan(shapes_root, n=50_000, seed=3)
    path = write_cloud_asset(tmp_path / "c.js", "c", pts, np.linspace(0, 1, len(pts)), budget=5000)
    payload = json.loads(path.read_text().split("= ", 2)[-1].rstrip(";\n"))
    assert payload["n"] == 5000


def test_the_views_face_the_highest_scores(shapes_root):
    pts = real_scan(shapes_root, n=5000, seed=4)
    scores = np.zeros(len(pts))
    hot = np.argmax(pts[:, 0])
    scores[np.linalg.norm(pts - pts[hot], axis=1) < 0.05 * np.ptp(pts, axis=0).max()] = 1
    views = view_axes(pts, scores)
    toward = pts[hot] - pts.mean(axis=0)
    (_, front, *_), (_, corner, *_), (_, back, *_) = views
    assert front @ toward >= 0 and corner @ toward > 0.3 * np.linalg.norm(toward)  # the camera on the defect's side
    assert np.allclose(back, -front)
    for _, d, u, v in views:  # right-handed orthonormal frames: u x v = d
        assert np.allclose([d @ d, u @ u, v @ v], 1) and abs(d @ u) < 1e-9 and abs(d @ v) < 1e-9 and abs(u @ v) < 1e-9
        assert np.allclose(np.cross(u, v), d)


def test_no_view_of_a_flat_part_is_edge_on():
    from btp.io import load_mesh, sample_surface
    from btp.runtime import outputs

    vertices, faces = load_mesh(Path(outputs.__file__).parents[1] / "data" / "plate_holes.ply")
    pts, _ = sample_surface(vertices, faces, 8000, 0)
    pts = np.asarray(pts, dtype=np.float64)
    extent = np.sort(np.ptp(pts @ principal_axes(pts).T, axis=0))
    assert extent[0] < 0.2 * extent[2]  # it is flat: a view along its long axes would be a strip
    for name, d, u, v in view_axes(pts, np.zeros(len(pts))):
        seen = np.ptp(pts @ u) * np.ptp(pts @ v)
        assert seen > 0.4 * extent[1] * extent[2], name  # at least 40 % of the face-on area


def test_colour_bar_labels_never_overlap():
    from btp.runtime.outputs import colorbar_ticks

    for threshold in (None, 0.0, 0.37, 0.5, 0.61, 0.98, 1.0):
        ticks, labels = colorbar_ticks(threshold)
        assert len(ticks) == len(labels) and np.all(np.diff(ticks) >= 0.08 - 1e-9), (threshold, ticks)
        if threshold is not None:
            assert labels[ticks.index(threshold)].endswith("point threshold")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium(batch, tmp_path):
    url = (batch / "report.html").as_uri() + "#sort=file-asc&open=part_dent&3d=1"
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no console errors or warnings from the page
    dom = proc.stdout
    order = re.findall(r'<tr class="scan [^"]*" data-stem="([^"]+)"', dom)
    files = re.findall(r'<tr class="scan [^"]*" data-stem="[^"]+"><td>([^<]+)</td>', dom)
    assert sorted(order) == ["broken", "part_dent", "part_good"] and files == sorted(files)  # sorted by file
    assert 'class="views"' in dom and '<canvas class="cloud"' in dom  # heat map shown, 3D view drawn
    # the first screen: counts, the threshold, a histogram with its threshold line, a thumbnail per scan
    rows = _rows((batch / "report.html").read_text())
    ok = sum(r["verdict"] == "OK" for r in rows)
    assert f'<div class="count ok" data-verdict="OK"><b>{ok}</b>' in dom
    assert f'<div class="count ng" data-verdict="NG"><b>{2 - ok}</b>' in dom
    assert '<div class="count failed" data-verdict="failed"><b>1</b>' in dom
    assert "Object-score threshold: <b>0.5000</b> (--threshold)" in dom
    hists = re.findall(r'<svg class="hist" data-part="part".*?</svg>', dom)
    assert len(hists) == 1 and hists[0].count('class="bar"') >= 1 and 'class="threshold"' in hists[0]
    thumbs = re.findall(r'<div class="thumb (\w+)" data-stem="([^"]+)"', dom)
    assert [stem for _, stem in thumbs][0] == "broken" and len(thumbs) == 3  # failed first, then by score
    scores = {r["stem"]: r["score"] for r in rows}
    assert scores[thumbs[1][1]] >= scores[thumbs[2][1]]
    assert "part_dent.png" in dom and 'id="csv"' in dom


def test_report_of_a_watch_folder_reads_the_ledger(tmp_path, shapes_root, tmp_path_factory):
    """`btp report OUT` on a folder with a ledger: one entry per file (the latest), part and serial
    from the ledger, --since keeps a shift."""
    from btp.runtime.ledger import Ledger, ScanRecord

    model = tiny_export(tmp_path_factory)[0]
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    write_point_cloud(scans / "cover_0007.pcd", real_scan(shapes_root, n=3000, seed=8))
    res = CliRunner().invoke(app, ["run", str(model), str(scans), "--out", str(out), "--ledger",
                                   str(out / "ledger.sqlite"), "--heatmap", "png"])
    assert res.exit_code == 0, res.output
    with Ledger(out / "ledger.sqlite") as book:
        book.record(ScanRecord(path=str(scans / "cover_0008.pcd"), status="failed", error="ReadError: cut off",
                               part="cover", serial="0008", scored_at="2020-01-01T00:00:00.000Z"))
    res = CliRunner().invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["serial"]: r for r in _rows((out / "report.html").read_text())}
    assert set(rows) == {"0007", "0008"} and rows["0008"]["verdict"] == "FAILED"
    assert rows["0007"]["part"] == "cover" and rows["0007"]["image"] == "cover_0007.png" and rows["0007"]["cloud"]
    res = CliRunner().invoke(app, ["report", str(out), "--since", "2021-01-01"])
    assert res.exit_code == 0
    assert [r["serial"] for r in _rows((out / "report.html").read_text())] == ["0007"]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_a_shift_shows_the_highest_scores_first_and_the_rest_on_demand(tmp_path):
    """Many scans (a shift's ledger): the first screen holds the 48 highest-scoring thumbnails and a
    button for the rest; counts and histogram still cover every scan."""
    from btp.runtime.report import ReportEntry, write_report

    rng = np.random.default_rng(0)
    entries = []
    for i, score in enumerate(rng.uniform(0.3, 0.9, 60)):
        doc = {"file": f"/scans/housing_{i:04d}.pcd", "object_score": float(score),
               "decision": "anomalous" if score > 0.7 else "normal", "threshold": {"value": 0.7, "source": "test"},
               "points": 1000, "regions": [], "point_scores": {"point_threshold": 0.5, "anomalous_fraction": 0.0}}
        entries.append(ReportEntry(file=doc["file"], stem=f"housing_{i:04d}", doc=doc))
    page = write_report(tmp_path, entries)
    proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    dom = proc.stdout
    shown = re.findall(r'<div class="thumb \w+" data-stem="([^"]+)"', dom)
    best = [e.stem for e in sorted(entries, key=lambda e: -e.doc["object_score"])][:48]
    assert shown == best and "show all 60 scans" in dom
    ng = sum(e.doc["decision"] == "anomalous" for e in entries)
    assert f'data-verdict="NG"><b>{ng}</b>' in dom and f'data-verdict="OK"><b>{60 - ng}</b>' in dom
    assert "housing: object scores of 60 scan(s)" in dom


@pytest.fixture(scope="module")
def reference_batch(tmp_path_factory, shapes_root):
    """btp-run --reference refs/ --report html --ledger on a good bunny, a bunny with a bump and a
    scan no part matches (references built from shared shapes as tests/test_reference.py does)."""
    from runtime_helpers import BUNNY, PINION, build_references, turned, with_bump

    model = tiny_export(tmp_path_factory)[0]
    refs = build_references(tmp_path_factory.mktemp("references"), model, shapes_root)
    d = tmp_path_factory.mktemp("reference-scans")
    good = real_scan(shapes_root, BUNNY, n=3000, seed=40)
    write_point_cloud(d / "bunny_0001.pcd", turned(good, 41))
    write_point_cloud(d / "bunny_0002.pcd", turned(with_bump(good), 42))
    write_point_cloud(d / "gear_0003.pcd", turned(real_scan(shapes_root, PINION, n=3000, seed=60), 60))
    out = tmp_path_factory.mktemp("reference-results")
    res = CliRunner().invoke(app, ["run", str(model), str(d), "--out", str(out), "--reference", str(refs),
                                   "--report", "html", "--ledger", str(out / "ledger.sqlite")])
    assert res.exit_code == 0, res.output
    return out, good


def test_report_with_a_reference_shows_the_part_its_threshold_and_maps(reference_batch):
    out, good = reference_batch
    rows = {r["stem"]: r for r in _rows((out / "report.html").read_text())}
    bump, ok, alone = rows["bunny_0002"], rows["bunny_0001"], rows["gear_0003"]
    doc = json.loads((out / "bunny_0002.json").read_text())
    assert bump["verdict"] == "NG" and ok["verdict"] == "OK" and alone["verdict"] == "NONE"
    assert bump["threshold"] == pytest.approx(doc["reference"]["threshold"])
    assert bump["threshold_source"].startswith("reference bunny (") and bump["threshold_source"].endswith("bunny.btpref)")
    ref = bump["reference"]
    assert ref["part"] == "bunny" and ref["registered"] and ref["fitness"] > 0.9
    assert ref["zero_shot_score"] == pytest.approx(doc["zero_shot_score"]) and bump["score"] == pytest.approx(ref["object_score"])
    assert ref["fused_image"] == "bunny_0002.fused.png" and ref["deviation_image"] == "bunny_0002.deviation.png"
    assert bump["thumb"] == ref["fused_image"] and bump["hist"] and not alone["hist"]
    assert alone["reference"]["part"] is None and alone["reference"]["fused_image"] is None
    # the deviation views are in scan units: the bump's max |d| beyond 3 % of the part's size, the good scan's within
    size = float(np.linalg.norm(np.ptp(good, axis=0)))
    assert bump["deviation"] > 0.03 * size > ok["deviation"]
    from PIL import Image

    cloud = json.loads((out / "report_assets" / "clouds" / "bunny_0002.js").read_text().split("= ", 2)[-1].rstrip(";\n"))
    import base64

    fused_rgb = np.frombuffer(base64.b64decode(cloud["maps"]["fused"]), np.uint8).reshape(-1, 3)
    assert len(fused_rgb) == cloud["n"] and set(cloud["maps"]) == {"fused", "deviation"}
    assert not (fused_rgb == np.frombuffer(base64.b64decode(cloud["rgb"]), np.uint8).reshape(-1, 3)).all()
    assert "maps" not in (out / "report_assets" / "clouds" / "gear_0003.js").read_text()
    red = {}  # pixels of the views (left of the colour bar) at the red end of the scale
    for stem in ("bunny_0001", "bunny_0002"):
        for kind in ("fused", "deviation"):
            with Image.open(out / f"{stem}.{kind}.png") as im:
                assert im.size == (1350, 490)
                p = np.asarray(im.convert("RGB"), dtype=np.int16)[:, :1160]
            red[stem, kind] = int(((p[..., 0] > 150) & (p[..., 1] < 110) & (p[..., 2] < 110)).sum())
    # the bump is drawn red: far above the part's threshold (fused) and far outside the template (deviation)
    assert red["bunny_0002", "fused"] > 20 and red["bunny_0001", "fused"] < red["bunny_0002", "fused"] / 4, red
    assert red["bunny_0002", "deviation"] > 2 * red["bunny_0001", "deviation"], red


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_report_with_a_reference_in_headless_chromium(reference_batch, tmp_path):
    """btp-run's page and `btp report`'s page from the ledger: the part's threshold and source on
    the first screen, the fused thumbnail, the reference block and both maps in the opened row."""
    out, _ = reference_batch
    copy = tmp_path / "watch-folder"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(copy)])  # from the ledger, as on a btp watch folder
    assert res.exit_code == 0, res.output
    for folder in (out, copy):
        url = (folder / "report.html").as_uri() + "#open=bunny_0002&3d=1"
        proc = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / folder.name}", "--dump-dom",
                               url], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert not [line for line in proc.stderr.splitlines() if "CONSOLE" in line], proc.stderr[-2000:]
        dom = proc.stdout
        assert re.search(r"Object-score threshold: <b>[0-9.]+</b> \(reference bunny \([^)]*bunny\.btpref\)\)", dom)
        assert '<div class="count ng" data-verdict="NG"><b>1</b>' in dom
        assert '<div class="count none" data-verdict="no decision"><b>1</b>' in dom
        hists = re.findall(r'<svg class="hist" data-part="([^"$]+)"', dom)
        assert hists == ["bunny"], hists  # the unmatched gear is not on any part's scale
        svg = re.search(r'<svg class="hist" data-part="bunny".*?</svg>', dom).group(0)
        line = float(re.search(r'<line class="threshold" x1="([0-9.]+)"', svg).group(1))
        assert 30 <= line <= 372, svg  # the part's threshold line inside the plot (fused scores go beyond 1)
        labels = [float(t) for t in re.findall(r'text-anchor="(?:start|middle|end)">([0-9.-]+)</text>', svg)]
        assert len(labels) == 5 and labels == sorted(labels), labels
        assert re.search(r'<div class="thumb NG" data-stem="bunny_0002"><div class="pic"[^>]*><img [^>]*'
                         r'src="bunny_0002.fused.png"', dom)  # the thumbnail shows the map that decided
        assert "reference: part <b>bunny</b>" in dom and "registration fitness" in dom
        assert 'src="bunny_0002.fused.png"' in dom and 'src="bunny_0002.deviation.png"' in dom
        assert 'src="bunny_0002.png"' in dom  # the model's own map beside them
        assert '<canvas class="cloud"' in dom and '<select class="map">' in dom  # the 3D view, its maps to choose
