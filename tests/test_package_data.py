"""The package carries what it reads at run time, its default model included.

- every non-Python file under btp/ is matched by pyproject's package-data globs (so a wheel has it);
- the default model's weights and its exported ONNX are package files of at most 25 MB each, found
  through importlib.resources (btp.io.locations), and nothing in the library builds a path outside
  the package;
- the shipped ONNX is what `make packaged-model` makes from the shipped weights today: same metadata
  (but the export time), the same graph bytes where the exporter versions are the ones it records,
  and the same outputs in any case;
- `btp-run SCAN` without a model scores with that ONNX, as `btp-run MODEL.onnx SCAN` does.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.config import DEFAULT_MODEL_NAME
from btp.io import write_point_cloud
from btp.io.files import file_sha256
from btp.io.locations import LocationError, asset, model_search_paths, packaged_model, shapes_dir
from btp.runtime.metadata import META_KEY
from runtime_helpers import real_scan

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "btp"
MAX_MODEL_BYTES = 25_000_000
REGENERATE = "regenerate it with `make packaged-model` and commit it"


def package_data_globs() -> list[str]:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["btp"]


def glob_regex(pattern: str) -> re.Pattern:
    """setuptools' package-data glob (glob.glob, recursive): ``**/`` spans any folders, ``*`` and
    ``?`` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:[^/]+/)*", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(out + r"\Z")


def covered(relative: str, globs: list[str]) -> bool:
    return any(glob_regex(g).match(relative) for g in globs)


def test_the_globs_match_like_setuptools():
    globs = ["assets/**/*", "*/assets/**/*", "export/*.txt"]
    assert covered("assets/models/x.onnx", globs) and covered("runtime/assets/three.min.js", globs)
    assert covered("runtime/assets/page/report.html", globs) and covered("export/trt_onnx_ops.txt", globs)
    assert not covered("export/sub/x.txt", globs) and not covered("data/x.ply", globs)


def test_every_file_the_package_reads_is_package_data():
    globs = package_data_globs()
    files = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")]
    assert "export/trt_onnx_ops.txt" in files and f"assets/models/{DEFAULT_MODEL_NAME}.onnx" in files
    missing = sorted(f for f in files if not covered(f, globs))
    assert not missing, f"not package data (add a glob to pyproject.toml): {missing}"


def test_the_default_model_ships_with_the_package_and_is_small_enough():
    onnx_path, weights = packaged_model(), packaged_model(suffix=".safetensors")
    assert onnx_path is not None and weights is not None
    for path in (onnx_path, weights):
        assert path.parent == asset("models") and path.is_relative_to(PACKAGE)
        assert path.stat().st_size <= MAX_MODEL_BYTES, f"{path}: {path.stat().st_size / 1e6:.1f} MB > 25 MB"
    assert asset("models/learned-baseline.txt").is_file()
    assert packaged_model("no-such-model") is None


def test_model_lookup_is_the_environment_then_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("BTP_MODELS", raising=False)
    assert model_search_paths("btp-mini") == [asset("models/btp-mini.safetensors")]
    monkeypatch.setenv("BTP_MODELS", str(tmp_path))
    assert model_search_paths("btp-mini")[0] == tmp_path / "btp-mini.safetensors"


def test_the_shapes_folder_comes_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("BTP_SHAPES", raising=False)
    with pytest.raises(LocationError, match="--shapes DIR.*BTP_SHAPES"):
        shapes_dir(None)
    assert shapes_dir(tmp_path) == tmp_path
    monkeypatch.setenv("BTP_SHAPES", str(tmp_path / "env"))
    assert shapes_dir(None) == tmp_path / "env"


def test_no_library_path_reaches_outside_the_package():
    """No ``Path(__file__).parents[2]`` (the checkout) or ``shared/data`` default in library code;
    the one exception is the Triton stage's import root, the folder that holds the package itself."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and \
                    node.value.attr == "parents" and isinstance(node.slice, ast.Constant) and node.slice.value >= 2:
                line = text.splitlines()[node.lineno - 1]
                if not line.startswith("PACKAGE_HOME = "):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {line.strip()}")
        if "REPO_ROOT" in text or '"shared" / "data"' in text or 'Path("../shared' in text:
            bad.append(f"{path.relative_to(ROOT)}: a checkout path (REPO_ROOT or a ../shared default)")
    assert not bad, bad


def _meta(proto) -> dict:
    return json.loads(next(p.value for p in proto.metadata_props if p.key == META_KEY))


def test_the_shipped_onnx_is_the_export_of_the_shipped_weights(tmp_path):
    """Export the shipped weights as `make packaged-model` does and compare with the shipped ONNX."""
    pytest.importorskip("torch", reason="exporting needs torch")
    import onnx

    from btp.export.onnx import export_onnx, load_model, onnx_outputs
    from btp.export.samples import parity_inputs

    shipped_path, weights = packaged_model(), packaged_model(suffix=".safetensors")
    shipped = onnx.load(str(shipped_path))
    meta = _meta(shipped)
    assert meta["model"]["weights_sha256"] == file_sha256(weights), \
        f"{shipped_path} was exported from other weights than {weights.name}: {REGENERATE}"
    assert meta["model"]["name"] == DEFAULT_MODEL_NAME and not meta["model"]["fresh_init"]

    loaded = load_model(weights)
    fresh = onnx.load(str(export_onnx(loaded, tmp_path / "again.onnx", parity_scans=1).path))
    again = _meta(fresh)
    for doc in (meta, again):
        doc["export"].pop("exported_at")
    assert again == meta, f"{shipped_path}: its metadata is not what the export writes today: {REGENERATE}"
    versions = {k: meta["export"][k] for k in ("torch", "onnx", "onnxslim")}
    del shipped.metadata_props[:], fresh.metadata_props[:]
    if versions == {k: again["export"][k] for k in versions}:
        assert shipped.SerializeToString() == fresh.SerializeToString(), \
            f"{shipped_path}: the same exporter versions give another graph: {REGENERATE}"
    neighborhood, center = parity_inputs(loaded.model.cfg, 2, seed=3)
    got = onnx_outputs(str(shipped_path), neighborhood, center, None)
    want = onnx_outputs(str(tmp_path / "again.onnx"), neighborhood, center, None)
    for name, value in want.items():
        assert np.max(np.abs(got[name] - value)) <= 1e-6, name


def test_btp_run_without_a_model_scores_with_the_shipped_onnx(tmp_path, shapes_root):
    scan = write_point_cloud(tmp_path / "bunny.pcd", real_scan(shapes_root, n=5000, seed=2))
    runner = CliRunner()
    default = runner.invoke(app, ["run", str(scan), "--out", str(tmp_path / "default"), "--heatmap", "none"])
    assert default.exit_code == 0, default.output
    named = runner.invoke(app, ["run", str(packaged_model()), str(scan), "--out", str(tmp_path / "named"),
                                "--heatmap", "none"])
    assert named.exit_code == 0, named.output
    a, b = (json.loads((tmp_path / d / "bunny.json").read_text()) for d in ("default", "named"))
    assert a["object_score"] == b["object_score"] and 0.0 < a["object_score"] < 1.0
    assert np.array_equal(np.load(tmp_path / "default" / "bunny.npy"), np.load(tmp_path / "named" / "bunny.npy"))
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert DEFAULT_MODEL_NAME in json.dumps(summary)


def test_btp_run_needs_inputs_after_the_model(tmp_path):
    res = CliRunner().invoke(app, ["run", str(packaged_model()), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no inputs" in res.output


def test_btp_train_without_a_shapes_folder_says_how_to_name_one(tmp_path, monkeypatch):
    monkeypatch.delenv("BTP_SHAPES", raising=False)
    res = CliRunner().invoke(app, ["train", "--recipe", "tiny", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "BTP_SHAPES" in res.output and "--shapes" in res.output
    assert not (tmp_path / "run").exists()
