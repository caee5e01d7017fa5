"""The edge side runs without torch: a subprocess with ``sys.modules['torch'] = None`` (any
``import torch`` raises ModuleNotFoundError) imports btp.runtime, btp.io, btp.geometry, btp.kernels and
btp.cli, prints `btp run --help`, and scores a real scan with an exported model."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np

from btp.config import DEFAULT_MODEL_NAME
from btp.io import write_point_cloud
from runtime_helpers import real_scan, tiny_export

BLOCK_TORCH = "import sys; sys.modules['torch'] = None\n"


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_blocking_really_blocks(tmp_path):
    proc = _run("import torch\n", tmp_path)
    assert proc.returncode != 0 and "import of torch halted" in proc.stderr


def test_edge_modules_import_and_help_without_torch(tmp_path):
    proc = _run("""
        import importlib
        for name in ("btp.runtime", "btp.runtime.pipeline", "btp.runtime.device", "btp.runtime.metadata",
                     "btp.runtime.backends", "btp.runtime.backends.ort", "btp.runtime.run", "btp.runtime.outputs",
                     "btp.runtime.calibration", "btp.cli.run", "btp.cli.demo",
                     "btp.export.samples", "btp.export.formats",
                     "btp.io", "btp.geometry", "btp.geometry.prepare", "btp.kernels", "btp.kernels.devices",
                     "btp.kernels.cuda_python", "btp.kernels.cuda_bindings", "btp.metrics", "btp.cli"):
            importlib.import_module(name)
        from btp.runtime import Pipeline, Result  # the lazy exports resolve too
        from typer.main import get_command
        from btp.cli import app
        get_command(app).main(["run", "--help"], prog_name="btp", standalone_mode=False)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Score point clouds" in proc.stdout and "--heatmap" in proc.stdout


def test_pipeline_and_btp_run_score_a_scan_without_torch(tmp_path_factory, tmp_path, shapes_root):
    model, _ = tiny_export(tmp_path_factory)  # exported here, with torch
    scan = write_point_cloud(tmp_path / "bunny.pcd", real_scan(shapes_root, n=1500, seed=5))
    out = tmp_path / "out"
    proc = _run(f"""
        import json
        from btp.runtime import Pipeline
        r = Pipeline({str(model)!r})({str(scan)!r})
        print(json.dumps({{"score": r.object_score, "n": len(r.point_scores)}}))
        from typer.main import get_command
        from btp.cli import app
        try:
            get_command(app).main(["run", {str(model)!r}, {str(scan)!r}, "--out", {str(out)!r}],
                                  prog_name="btp", standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, exc.code
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads(proc.stdout.splitlines()[0])
    assert first["n"] == 1500 and 0.0 < first["score"] < 1.0
    assert np.load(out / "bunny.npy").shape == (1500,)


def test_demo_runs_without_torch_on_an_exported_model(tmp_path_factory, tmp_path):
    model, _ = tiny_export(tmp_path_factory)
    out = tmp_path / "demo"
    proc = _run(f"""
        import btp.cli.demo as demo
        demo.DEMO_POINTS = 1024
        code = demo.run_demo(__import__("pathlib").Path({str(out)!r}), model={str(model)!r}, png=False)
        assert code == 0, code
        try:
            demo.cached_onnx("tiny", None)  # exporting would need torch: a clear error, no traceback
        except demo.DemoError as exc:
            print("DEMO-ERROR", exc)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "DEMO-ERROR" in proc.stdout and "needs torch" in proc.stdout
    assert len(list((out / "results").glob("*.npy"))) == 9
    # the demo knows where its defects are: the report overlays them (3D view, share found per row)
    page = (out / "results" / "report.html").read_text()
    rows = json.loads(page.split("const ROWS = ", 1)[1].split(";\n", 1)[0])
    truths = {r["stem"]: r["truth"] for r in rows}
    assert truths["fuze_bottle_good"]["points"] == 0
    defective = [t for stem, t in truths.items() if not stem.endswith("_good")]
    assert len(defective) == 6 and all(t["points"] > 0 and 0.0 <= t["found"] <= 1.0 for t in defective)
    assert all((out / "results" / "ground_truth" / f"{stem}.npy").is_file() for stem in truths)


def test_btp_run_scores_with_the_packaged_default_model_without_torch(tmp_path, shapes_root):
    """`btp-run SCAN` with no model argument: the ONNX the package carries, no torch needed."""
    scan = write_point_cloud(tmp_path / "pinion.pcd", real_scan(shapes_root, "cgal__pinion.ply", n=5000, seed=1))
    out = tmp_path / "out"
    proc = _run(f"""
        from typer.main import get_command
        from btp.cli import app
        try:
            get_command(app).main(["run", {str(scan)!r}, "--out", {str(out)!r}, "--heatmap", "none"],
                                  prog_name="btp", standalone_mode=False)
        except SystemExit as exc:
            assert not exc.code, exc.code
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "pinion.json").read_text())
    assert 0.0 < doc["object_score"] < 1.0 and np.load(out / "pinion.npy").shape == (5000,)
    assert DEFAULT_MODEL_NAME in (out / "summary.json").read_text()
