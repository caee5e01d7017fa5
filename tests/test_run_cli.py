"""btp run / btp calibrate / btp demo through the CLI, on real scans and broken files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.io import write_point_cloud
from btp.runtime import Pipeline
from btp.runtime.run import expand_inputs, run_files, unique_stems
from runtime_helpers import real_scan, tiny_export


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines at the terminal width


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture()
def scan_dir(tmp_path, shapes_root):
    """One good scan, one corrupt PCD, one empty file, one NaN-laden file."""
    d = tmp_path / "scans"
    d.mkdir()
    write_point_cloud(d / "good.pcd", real_scan(shapes_root, n=1500, seed=1))
    header = ("# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
              "WIDTH 5000\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 5000\nDATA binary\n")
    (d / "corrupt.pcd").write_bytes(header.encode() + b"\x01" * 100)  # 100 of 60000 bytes
    (d / "empty.ply").write_bytes(b"")
    nan = real_scan(shapes_root, n=1000, seed=2).astype(np.float64)
    nan[20:] = np.nan  # a scanner that lost almost every return
    np.savetxt(d / "nan_laden.xyz", nan)
    return d


def test_run_one_good_three_bad(model_path, scan_dir, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(model_path), str(scan_dir), "--out", str(out)])
    text = _flat(res.output)
    assert res.exit_code == 1, res.output
    assert "1 of 4 scans scored, 3 failed" in text
    assert "corrupt.pcd: TruncatedFileError" in text
    assert "empty.ply: EmptyCloudError" in text
    assert "nan_laden.xyz: InvalidValuesError" in text and "NaN" in text
    # outputs only for the good scan, each complete; nothing half-written anywhere
    assert sorted(p.name for p in out.iterdir()) == ["good.json", "good.npy", "good.ply", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["succeeded"] == 1 and len(summary["failed"]) == 3
    assert {f["file"].rsplit("/", 1)[1] for f in summary["failed"]} == {"corrupt.pcd", "empty.ply", "nan_laden.xyz"}
    doc = json.loads((out / "good.json").read_text())
    scores = np.load(out / "good.npy")
    assert scores.dtype == np.float32 and scores.shape == (1500,) == (doc["points"],)
    direct = Pipeline(model_path)(scan_dir / "good.pcd")
    np.testing.assert_array_equal(scores, direct.point_scores)
    assert doc["object_score"] == pytest.approx(direct.object_score, abs=1e-7)
    assert doc["decision"] is None and doc["model"]["fresh_init"] is True
    assert set(doc["timings_ms"]) >= {"load", "downsample", "fps", "group", "engine", "propagate", "interpolate"}
    assert doc["point_scores"]["max"] >= doc["point_scores"]["p95"] >= doc["point_scores"]["min"]
    from btp.io import read_point_cloud

    ply = read_point_cloud(out / "good.ply")
    np.testing.assert_allclose(ply.scalars, scores)
    assert ply.colors is not None


def test_partial_nan_rows_are_dropped_with_a_warning(model_path, tmp_path, shapes_root):
    pts = real_scan(shapes_root, n=1200, seed=3).astype(np.float64)
    pts[::100] = np.nan  # 12 lost returns
    np.savetxt(tmp_path / "holes.xyz", pts)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(model_path), str(tmp_path / "holes.xyz"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "holes.json").read_text())
    assert doc["points"] == 1188 and any("dropped 12" in w for w in doc["warnings"])
    # the .npy keeps one score per input row, in input order: NaN exactly where a row was dropped
    assert doc["rows"] == 1200
    scores = np.load(out / "holes.npy")
    assert scores.shape == (1200,)
    lost = np.zeros(1200, dtype=bool)
    lost[::100] = True
    assert np.array_equal(np.isnan(scores), lost)


def test_threshold_sidecar_override_csv_and_png(model_path, scan_dir, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(model_path.read_bytes())
    good = scan_dir / "good.pcd"
    cal = CliRunner().invoke(app, ["calibrate", str(model), str(good), "--quantile", "1.0", "--margin", "0.5"])
    assert cal.exit_code == 0, cal.output
    sidecar = json.loads((tmp_path / "m.threshold.json").read_text())
    score = Pipeline(model)(good).object_score
    assert sidecar["value"] == pytest.approx(score + 0.5) and sidecar["n_scans"] == 1
    out = tmp_path / "o1"
    res = CliRunner().invoke(app, ["run", str(model), str(good), "--out", str(out), "--heatmap", "ply,png"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "good.json").read_text())
    assert doc["decision"] == "normal" and doc["threshold"]["source"].startswith("sidecar")
    assert (out / "good.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "o2"
    res = CliRunner().invoke(app, ["run", str(model), str(scan_dir / "*.pcd"), "--out", str(out2), "--threshold",
                                   "0.0", "--format", "csv", "--heatmap", "none"])
    assert res.exit_code == 1  # corrupt.pcd matched the glob too
    assert sorted(p.name for p in out2.iterdir()) == ["good.npy", "results.csv", "summary.json"]
    rows = (out2 / "results.csv").read_text().splitlines()
    assert rows[0].startswith("file,status,object_score,decision") and len(rows) == 3
    assert any(",ok," in r and ",anomalous," in r for r in rows) and any("TruncatedFileError" in r for r in rows)


def test_batched_run_matches_one_by_one(model_path, tmp_path, shapes_root):
    for i in range(3):
        write_point_cloud(tmp_path / f"s{i}.ply", real_scan(shapes_root, n=900 + 100 * i, seed=10 + i))
    runs = {}
    for batch in ("1", "2"):
        out = tmp_path / f"out{batch}"
        res = CliRunner().invoke(app, ["run", str(model_path), str(tmp_path / "s*.ply"), "--out", str(out),
                                       "--batch", batch, "--heatmap", "none"])
        assert res.exit_code == 0, res.output
        runs[batch] = {i: json.loads((out / f"s{i}.json").read_text()) for i in range(3)}
    for i in range(3):
        assert runs["2"][i]["batch_size"] == (2 if i < 2 else 1)
        assert runs["2"][i]["object_score"] == pytest.approx(runs["1"][i]["object_score"], abs=1e-5)


def test_failed_write_leaves_no_outputs_for_that_scan(model_path, scan_dir, tmp_path, monkeypatch):
    from btp.runtime import outputs

    def broken_png(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "render_views", broken_png)
    out = tmp_path / "out"
    outcomes = run_files(Pipeline(model_path), [scan_dir / "good.pcd"], out, heatmaps=("ply", "png"))
    assert not outcomes[0].ok and "No space left" in outcomes[0].error
    assert list(out.iterdir()) == []  # the npy and ply already written were removed

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs, "render_views", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_files(Pipeline(model_path), [scan_dir / "good.pcd"], out, heatmaps=("ply", "png"))
    assert list(out.iterdir()) == []


def test_expand_inputs_and_stems(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for p in ("a/x.pcd", "b/x.ply", "a/notes.md", "a/y.npy"):
        (tmp_path / p).write_bytes(b"1")
    (tmp_path / "a" / "out").mkdir()
    (tmp_path / "a" / "out" / "x.ply").write_bytes(b"1")  # an earlier run's output inside the input dir
    files = expand_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.ply"), str(tmp_path / "a" / "x.pcd"),
                           str(tmp_path / "missing.pcd")], exclude=tmp_path / "a" / "out")
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["a/x.pcd", "a/y.npy", "b/x.ply", "missing.pcd"]
    assert unique_stems(files) == ["x", "y", "x.ply", "missing"]  # the extension tells the two x apart


def test_run_refuses_a_non_model(tmp_path, scan_dir):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"nope")
    res = CliRunner().invoke(app, ["run", str(bad), str(scan_dir)])
    assert res.exit_code == 2 and "not an ONNX model" in _flat(res.output)


def test_demo_runs_offline_and_writes_heat_maps(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the demo exports the tiny model first")
    monkeypatch.setenv("BTP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BTP_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setattr("btp.cli.demo.DEMO_POINTS", 1024)
    monkeypatch.setenv("COLUMNS", "160")  # rich: one table row per line
    out = tmp_path / "demo"
    res = CliRunner().invoke(app, ["demo", "--model", "tiny", "--out", str(out), "--no-png"])
    text = _flat(res.output)
    assert res.exit_code == 0, res.output
    assert "UNTRAINED" in text and "object score" in text and "anomalous region" in text
    scans = sorted(p.name for p in (out / "scans").iterdir())
    assert len(scans) == 9 and "plate_holes_good.pcd" in scans
    results = out / "results"
    for scan in scans:
        stem = scan[:-4]
        assert (results / f"{stem}.ply").is_file() and (results / f"{stem}.npy").is_file()
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    again = CliRunner().invoke(app, ["demo", "--model", "tiny", "--out", str(out), "--no-png"])
    assert again.exit_code == 0 and "cached export" in _flat(again.output)


def test_point_summary_uses_the_models_point_threshold(tmp_path, shapes_root):
    """The 'anomalous points' count follows cfg.scoring.point_threshold from the model file."""
    from btp.config import tiny_config

    scan = tmp_path / "scan.pcd"
    write_point_cloud(scan, real_scan(shapes_root, n=1500))
    cfg = tiny_config()
    default = Pipeline(_export(cfg, tmp_path / "default.onnx"))(scan)
    cfg.scoring.point_threshold = float(np.median(default.point_scores))  # flags about half the points
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", str(_export(cfg, tmp_path / "calibrated.onnx")), str(scan), "--out", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "scan.json").read_text())["point_scores"]
    assert doc["point_threshold"] == pytest.approx(cfg.scoring.point_threshold)
    scores = np.load(out / "scan.npy")
    assert doc["anomalous_points"] == int((scores >= cfg.scoring.point_threshold).sum())
    assert 0.3 * len(scores) < doc["anomalous_points"] < 0.7 * len(scores)


def _export(cfg, path):
    pytest.importorskip("torch", reason="exporting a model with another config needs torch")
    from btp.export.onnx import export_onnx, fresh_model

    export_onnx(fresh_model(cfg, seed=0), path)
    return path


def test_the_readme_demo_table_is_what_the_default_model_gives(tmp_path):
    """README's `btp demo` table holds the object scores the packaged default model gives on the
    demo's scans today (regenerate it when the default or its rules change)."""
    import re

    from btp.cli.demo import make_samples
    from btp.io import read_point_cloud
    from btp.io.locations import packaged_model

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\w+\.pcd) \| [\w-]+ \| ([0-9.]+) \|", readme, flags=re.M))
    samples = make_samples(tmp_path)
    assert sorted(rows) == sorted(p.name for p in samples)
    if packaged_model() is None:
        pytest.skip("the package carries no exported default model (btp/assets/models/*.onnx)")
    pipe = Pipeline(packaged_model(), threads=1)
    for path in samples:
        score = pipe(read_point_cloud(path).points).object_score
        assert abs(score - float(rows[path.name])) <= 2e-4, (path.name, score, rows[path.name])
