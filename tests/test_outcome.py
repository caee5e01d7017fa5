"""ScanOutcome: the typed per-scan outcome btp-run writes, on a real scan through the tiny model."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from btp.io import write_point_cloud
from btp.runtime import Pipeline, outputs
from btp.runtime.outcome import ScanOutcome, optional
from btp.runtime.run import run_files
from runtime_helpers import real_scan, tiny_export


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture()
def scans(tmp_path, shapes_root):
    d = tmp_path / "scans"
    d.mkdir()
    points = real_scan(shapes_root, n=1500, seed=3).astype(np.float64)
    points[7] = np.nan  # one row btp.io drops: 1499 points scored of 1500 rows
    np.savetxt(d / "good.xyz", points)
    (d / "empty.ply").write_bytes(b"")
    return d


def test_the_scan_json_is_the_outcome_document_and_reads_back(model_path, scans, tmp_path):
    out = tmp_path / "out"
    pipe = Pipeline(model_path)
    failed, good = run_files(pipe, sorted(scans.iterdir()), out, threshold=0.25, threshold_source="--threshold")
    assert good.ok and good.file == scans / "good.xyz" and good.stem == "good"
    doc = json.loads((out / "good.json").read_text())
    expected = good.document()
    if np.isnan(expected["global_prob"]):  # a graph without a global head: strict JSON has null
        expected["global_prob"] = None
    assert doc == json.loads(json.dumps(expected))
    assert doc["points"] == 1499 and doc["rows"] == 1500
    # every point at or above the point threshold is in exactly one region
    assert sum(r["points"] for r in doc["regions"]) == doc["point_scores"]["anomalous_points"]
    assert doc["decision"] == ("anomalous" if good.object_score > 0.25 else "normal")
    assert doc["threshold"] == {"value": 0.25, "source": "--threshold"}
    assert doc["outputs"] == {"npy": str(out / "good.npy"), "ply": str(out / "good.ply")}
    assert "error" not in doc  # an optional field, unset
    scores = np.load(out / "good.npy")
    assert doc["point_scores"]["max"] == pytest.approx(float(np.nanmax(scores)))
    assert doc["point_scores"]["anomalous_points"] == int(np.sum(scores >= doc["point_scores"]["point_threshold"]))
    again = ScanOutcome.from_document(doc, stem="good")
    assert again.document() == doc and again.point_scores == good.point_scores and again.model == good.model
    assert again.result is None and again.ok

    assert not failed.ok and failed.object_score is None and "EmptyCloudError" in failed.error
    assert failed.document()["error"] == failed.error and failed.document()["file"] == str(scans / "empty.ply")
    assert not (out / "empty.json").exists()
    summary = json.loads(outputs.write_summary(out, [failed, good], model_path).read_text())
    assert summary["succeeded"] == 1 and summary["failed"] == [{"file": str(failed.file), "error": failed.error}]
    assert summary["object_scores"] == {str(good.file): pytest.approx(good.object_score)}


def test_the_csv_rows_come_from_the_outcomes(model_path, scans, tmp_path):
    out = tmp_path / "out"
    outcomes = run_files(Pipeline(model_path), sorted(scans.iterdir()), out, fmt="csv", heatmaps=("none",))
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["error", "ok"] and rows[0]["error"] == outcomes[0].error
    assert float(rows[1]["object_score"]) == pytest.approx(outcomes[1].object_score, abs=1e-6)
    assert int(rows[1]["anomalous_points"]) == outcomes[1].point_scores.anomalous_points
    assert rows[1]["decision"] == "" and rows[1]["threshold"] == ""  # no threshold: no decision
    assert sorted(p.name for p in out.iterdir()) == ["good.npy", "results.csv"]


def test_an_added_optional_field_is_written_only_when_set(model_path, scans):
    """How a mode extends the outcome: an ``optional()`` field leaves the plain documents unchanged."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class WithReference(ScanOutcome):
        reference_score: float | None = optional()

    plain = run_files(Pipeline(model_path), [scans / "good.xyz"], scans, write=False)[0]
    extended = WithReference(**{f.name: getattr(plain, f.name) for f in dataclasses.fields(ScanOutcome)})
    assert extended.document() == plain.document()
    scored = dataclasses.replace(extended, reference_score=0.125)
    doc = scored.document()
    assert doc["reference_score"] == 0.125 and list(doc)[-1] == "reference_score"
    assert WithReference.from_document(doc).reference_score == 0.125
    with pytest.raises(dataclasses.FrozenInstanceError):
        scored.reference_score = 0.5
    with pytest.raises(TypeError):
        ScanOutcome(scans / "good.xyz")  # keyword-only
