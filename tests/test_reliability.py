"""Reliability: one bad file never costs the others, and no silent wrong answers.

One test per numbered case of the reliability issue, then a generated (fuzz) suite over every
class of hostile input: each asserts the error type, the exit code, and that the good files of
the same batch are bit-identical to a solo run. ``BTP_FUZZ_LONG=1`` runs the longer fuzz.
"""
from __future__ import annotations

import json
import re
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.io import read_point_cloud, write_point_cloud
from btp.io.errors import FileTooLargeError, InvalidValuesError, MalformedFileError, TruncatedFileError
from btp.runtime import Pipeline
from runtime_helpers import REAL_SHAPES, real_scan, tiny_export

RUN = CliRunner()


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def good_points(shapes_root):
    return [real_scan(shapes_root, REAL_SHAPES[i % 3], 1200 + 100 * (i % 4), seed=i) for i in range(6)]


def _pcd_header(n, data="binary", width=None):
    width = n if width is None else width
    return (f"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {width}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n").encode()


def _ply(lines, body=b""):
    return ("ply\n" + "\n".join(lines) + "\nend_header\n").encode() + body


XYZ = ["property float x", "property float y", "property float z"]


def hostile_files(pts: np.ndarray) -> dict[str, tuple[bytes | None, str]]:
    """name -> (file bytes, the error type expected in the summary), one per class of case."""
    rng = np.random.default_rng(0)
    n = len(pts)
    npy = {}
    for name, array in (("huge.npy", pts * np.float32(1e30)), ("tiny_scale.npy", pts.astype(np.float64) * 1e-30),
                        ("structured.npy", np.zeros(n, dtype=[("a", "f4"), ("b", "f4")])),
                        ("strings.npy", np.array([["a", "b", "c"]] * n))):
        from io import BytesIO

        buf = BytesIO()
        np.save(buf, array)
        npy[name] = buf.getvalue()
    return {
        "random_payload.pcd": (_pcd_header(n) + rng.bytes(n * 12), "InvalidValuesError"),
        "big_endian.pcd": (_pcd_header(n) + pts.astype(">f4").tobytes(), "InvalidValuesError"),
        "huge.npy": (npy["huge.npy"], "InvalidValuesError"),
        "tiny_scale.npy": (npy["tiny_scale.npy"], "InvalidValuesError"),
        "structured.npy": (npy["structured.npy"], "MalformedFileError"),
        "strings.npy": (npy["strings.npy"], "MalformedFileError"),
        "prop_noname.ply": (_ply(["format binary_little_endian 1.0", f"element vertex {n}", "property float"],
                                 pts.tobytes()), "MalformedFileError"),
        "bare_prop.ply": (_ply(["format binary_little_endian 1.0", f"element vertex {n}", "property"], pts.tobytes()),
                          "MalformedFileError"),
        "format_noarg.ply": (_ply(["format", f"element vertex {n}", *XYZ], pts.tobytes()), "MalformedFileError"),
        "neg_count.ply": (_ply(["format binary_little_endian 1.0", "element vertex -5", *XYZ], pts.tobytes()),
                          "MalformedFileError"),
        "trailing.ply": (_ply(["format binary_little_endian 1.0", f"element vertex {n}", *XYZ],
                              pts.tobytes() + b"\0" * 100000), "MalformedFileError"),
        "points_mismatch.pcd": (_pcd_header(n // 2) + pts.tobytes(), "MalformedFileError"),
        "points_neg.pcd": (_pcd_header(-1) + pts.tobytes(), "MalformedFileError"),
        "truncated.pcd": (_pcd_header(n) + pts.tobytes()[: n * 6], "TruncatedFileError"),
        "identical.npy": (None, "DegenerateCloudError"),  # written below: one point repeated
    }


def write_hostile(d, pts) -> dict[str, str]:
    d.mkdir(parents=True, exist_ok=True)
    expected = {}
    for name, (payload, error) in hostile_files(pts).items():
        if payload is None:
            np.save(d / name, np.repeat(pts[:1], len(pts), axis=0))
        else:
            (d / name).write_bytes(payload)
        expected[name] = error
    return expected


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


# ---- case 1: one bad file never aborts the batch ---------------------------------------------------

def test_case1_hostile_files_are_contained_and_good_ones_equal_solo_runs(model_path, good_points, tmp_path):
    d = tmp_path / "scans"
    expected = write_hostile(d, good_points[0])
    for i, pts in enumerate(good_points[:3]):
        np.save(d / f"good{i}.npy", pts)
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none", "--batch", "3"])
    assert result.exit_code == 1, result.output
    summary = _summary(out)
    errors = {os.path.basename(f["file"]): f["error"] for f in summary["failed"]}
    assert set(errors) == set(expected)
    for name, error in expected.items():
        assert errors[name].startswith(error), (name, errors[name])
        assert "internal error" not in errors[name]
    pipe = Pipeline(model_path)
    for i, pts in enumerate(good_points[:3]):
        solo = pipe(d / f"good{i}.npy")
        np.testing.assert_array_equal(np.load(out / f"good{i}.npy"), solo.scores_per_row())


def test_case1_an_unexpected_exception_is_an_internal_error_of_that_file(model_path, good_points, tmp_path,
                                                                          monkeypatch):
    from btp.runtime import pipeline as pipeline_mod

    d = tmp_path / "scans"
    d.mkdir()
    np.save(d / "a.npy", good_points[0])
    np.save(d / "b.npy", good_points[1])
    real_load = pipeline_mod.load

    def load(source, cfg):
        if str(source).endswith("a.npy"):
            raise KeyError("boom")  # nothing in btp raises this on purpose
        return real_load(source, cfg)

    monkeypatch.setattr(pipeline_mod, "load", load)
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none", "--debug"])
    assert result.exit_code == 1
    failed = _summary(out)["failed"]
    assert len(failed) == 1 and "internal error (KeyError" in failed[0]["error"] and "--debug" in failed[0]["error"]
    assert "Traceback" in result.output  # --debug prints it
    assert (out / "b.npy").is_file()


def test_case1_calibrate_and_eval_contain_bad_files(model_path, good_points, tmp_path):
    d = tmp_path / "good"
    d.mkdir()
    np.save(d / "g0.npy", good_points[0])
    (d / "bad.ply").write_bytes(_ply(["format", "element vertex 3", *XYZ]))
    side = tmp_path / "t.json"
    result = RUN.invoke(app, ["calibrate", str(model_path), str(d), "-o", str(side)])
    assert result.exit_code == 1 and side.is_file() and "MalformedFileError" in _flat(result.output)


# ---- case 2: NaN / inf thresholds ------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_case2_non_finite_thresholds_are_refused(model_path, good_points, tmp_path, value):
    d = tmp_path / "good"
    d.mkdir()
    np.save(d / "g0.npy", good_points[0])
    result = RUN.invoke(app, ["calibrate", str(model_path), str(d), "-m", value, "-o", str(tmp_path / "t.json")])
    assert result.exit_code == 2 and "finite" in _flat(result.output)
    assert not (tmp_path / "t.json").exists()
    result = RUN.invoke(app, ["run", str(model_path), str(d), "-t", value, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "finite" in _flat(result.output)


def test_case2_sidecars_are_strict_json_and_validated_on_read(model_path, good_points, tmp_path):
    from btp.runtime.calibration import CalibrationError, read_threshold

    d = tmp_path / "good"
    d.mkdir()
    np.save(d / "g0.npy", good_points[0])
    side = tmp_path / "t.json"
    assert RUN.invoke(app, ["calibrate", str(model_path), str(d), "-o", str(side)]).exit_code == 0
    doc = json.loads(side.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    doc["value"] = None
    side.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError):
        read_threshold(side)
    out = tmp_path / "o"
    RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none"])
    for f in out.glob("*.json"):  # NaN values (e.g. a graph without a global head) are written as null
        json.loads(f.read_text(), parse_constant=lambda c: pytest.fail(f"{f.name}: non-strict JSON {c}"))


# ---- case 3: output names ----------------------------------------------------------------------------

def test_case3_output_names_never_collide(model_path, good_points, tmp_path):
    from btp.runtime.run import unique_stems

    d = tmp_path / "scans"
    d.mkdir()
    names = ["a.pcd", "a.ply", "a-2.pcd", "summary.pcd", "results.npy", "A.npy"]
    for i, name in enumerate(names):
        write_point_cloud(d / name, good_points[i % 6]) if name.endswith((".pcd", ".ply")) else \
            np.save(d / name, good_points[i % 6])
    stems = unique_stems(sorted(d.iterdir()))
    assert len({s.casefold() for s in stems}) == len(stems)
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none"])
    assert result.exit_code == 0, result.output
    docs = [json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "summary.json"]
    assert sorted(os.path.basename(doc["file"]) for doc in docs) == sorted(names)
    assert _summary(out)["succeeded"] == len(names)
    pipe = Pipeline(model_path)
    for doc in docs:
        assert np.array_equal(np.load(doc["outputs"]["npy"]), pipe(doc["file"]).scores_per_row())


# ---- case 4: truncation and header/data mismatch ------------------------------------------------------

def test_case4_header_and_data_must_agree(good_points, tmp_path):
    pts = good_points[0]
    cases = {"short.pcd": (_pcd_header(len(pts)) + pts.tobytes()[:-100], TruncatedFileError),
             "long.pcd": (_pcd_header(len(pts) // 2) + pts.tobytes(), MalformedFileError),
             "neg.pcd": (_pcd_header(-1, width=-1) + pts.tobytes(), MalformedFileError),
             "wh.pcd": (_pcd_header(len(pts), width=7) + pts.tobytes(), MalformedFileError),
             "neg.ply": (_ply(["format binary_little_endian 1.0", "element vertex -3", *XYZ]), MalformedFileError),
             "tail.ply": (_ply(["format binary_little_endian 1.0", f"element vertex {len(pts)}", *XYZ],
                               pts.tobytes() + b"\0" * 12), MalformedFileError)}
    faces_first = _ply(["format binary_little_endian 1.0", "element face 2", "property list uchar int vertex_indices",
                        f"element vertex {len(pts)}", *XYZ],
                       b"\x03" + struct.pack("<3i", 0, 1, 2) + b"\x03" + struct.pack("<3i", 1, 2, 3) + pts.tobytes())
    cases["cut_in_faces.ply"] = (faces_first[:len(faces_first) // 3], TruncatedFileError)
    cases["cut_in_vertices.ply"] = (faces_first[:-20], TruncatedFileError)  # faces complete, vertices short
    (tmp_path / "whole.ply").write_bytes(faces_first)
    np.testing.assert_array_equal(read_point_cloud(tmp_path / "whole.ply").points, pts)
    for name, (payload, error) in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(error):
            read_point_cloud(tmp_path / name)


# ---- case 5: large global coordinates ---------------------------------------------------------------

def test_case5_a_part_far_from_the_origin_scores_as_at_the_origin(model_path, good_points, tmp_path):
    part = good_points[0].astype(np.float64) * 50.0  # millimetres
    far = part + np.array([5.0e6, 4.2e6, 1.3e5])  # a UTM-like offset
    np.save(tmp_path / "origin.npy", part)
    np.save(tmp_path / "far.npy", far)
    pipe = Pipeline(model_path)
    a, b = pipe(tmp_path / "origin.npy"), pipe(tmp_path / "far.npy")
    assert abs(a.object_score - b.object_score) <= 1e-5
    assert np.abs(a.point_scores - b.point_scores).max() <= 1e-5
    assert b.offset is not None and np.allclose(b.points.astype(np.float64) + b.offset, far, atol=1e-3)
    c = pipe(far)  # an array handed in directly gets the same treatment
    assert np.abs(c.point_scores - b.point_scores).max() <= 1e-5
    out = tmp_path / "out"
    RUN.invoke(app, ["run", str(model_path), str(tmp_path / "far.npy"), "--out", str(out)])
    written = read_point_cloud(out / "far.ply").points  # the heat map is in the scan's own frame
    assert np.allclose(written, far, atol=1.0)


# ---- case 6: unusable output places ------------------------------------------------------------------

def test_case6_output_places_that_cannot_take_outputs_exit_2(model_path, good_points, tmp_path):
    np.save(tmp_path / "g.npy", good_points[0])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(stat.S_IRUSR | stat.S_IXUSR)
    places = [a_file, "/dev/null"] + ([read_only] if os.geteuid() != 0 else [])  # root writes anywhere
    for place in places:
        result = RUN.invoke(app, ["run", str(model_path), str(tmp_path / "g.npy"), "--out", str(place)])
        assert result.exit_code == 2, (place, result.output)
        assert "--out" in _flat(result.output)
    result = RUN.invoke(app, ["calibrate", str(model_path), str(tmp_path / "g.npy"), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "is a directory" in _flat(result.output)


def test_case6_disk_full_while_writing_the_summary(model_path, good_points, tmp_path, monkeypatch):
    from btp.runtime import outputs

    np.save(tmp_path / "g.npy", good_points[0])
    real = outputs.atomic_write_bytes

    def full(path, payload):
        if str(path).endswith("summary.json"):
            raise OSError(28, "No space left on device")
        return real(path, payload)

    monkeypatch.setattr(outputs, "atomic_write_bytes", full)
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(tmp_path / "g.npy"), "--out", str(out)])
    assert result.exit_code == 2 and "No space left" in _flat(result.output)
    assert (out / "g.npy").is_file() and (out / "g.json").is_file()


# ---- case 7: metadata checked against the graph -----------------------------------------------------------

def test_case7_metadata_that_does_not_fit_the_graph_is_refused_with_exit_2(model_path, good_points, tmp_path):
    import onnx

    np.save(tmp_path / "g.npy", good_points[0])
    proto = onnx.load(str(model_path))
    doc = json.loads(next(p.value for p in proto.metadata_props if p.key == "btp"))
    variants = {}
    wrong_g = json.loads(json.dumps(doc))
    wrong_g["config"]["encoder"]["num_group"] = 16
    variants["wrong_g"] = wrong_g
    null_model = json.loads(json.dumps(doc))
    null_model["model"] = None
    variants["null_model"] = null_model
    for name, meta in variants.items():
        m = onnx.load(str(model_path))
        next(p for p in m.metadata_props if p.key == "btp").value = json.dumps(meta)
        onnx.save(m, str(tmp_path / f"{name}.onnx"))
    other_outputs = onnx.load(str(model_path))
    for o in other_outputs.graph.output:
        o.name = "renamed_" + o.name
    for node in other_outputs.graph.node:
        node.output[:] = ["renamed_" + x if x in ("patch_probs", "object_score", "patch_logits", "global_prob")
                          else x for x in node.output]
    onnx.save(other_outputs, str(tmp_path / "other_outputs.onnx"))
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07" + os.urandom(200))
    for name, expect in (("wrong_g", "G=16"), ("other_outputs", "no output 'patch_probs'"),
                         ("garbage", "not an ONNX model")):
        result = RUN.invoke(app, ["run", str(tmp_path / f"{name}.onnx"), str(tmp_path / "g.npy"),
                                  "--out", str(tmp_path / name)])
        assert result.exit_code == 2, (name, result.output)
        assert expect in _flat(result.output), (name, result.output)
    result = RUN.invoke(app, ["run", str(tmp_path / "null_model.onnx"), str(tmp_path / "g.npy"),
                              "--out", str(tmp_path / "nm")])
    assert result.exit_code == 0, result.output  # "model": null is read as no model info, not a crash


# ---- case 8: thread counts ------------------------------------------------------------------------------

def test_case8_threads_are_bounded(model_path, good_points, tmp_path):
    np.save(tmp_path / "g.npy", good_points[0])
    for value in ("0", "-3", "100000"):
        result = RUN.invoke(app, ["run", str(model_path), str(tmp_path / "g.npy"), "--threads", value,
                                  "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and "--threads" in _flat(result.output), value
    assert not (tmp_path / "o").exists()


# ---- case 9: CSV written as it goes; stale outputs removed ------------------------------------------------

def test_case9_csv_is_written_after_every_batch_and_stale_outputs_go(model_path, good_points, tmp_path, monkeypatch):
    from btp.runtime import run as run_mod

    d = tmp_path / "scans"
    d.mkdir()
    for i in range(4):
        np.save(d / f"s{i}.npy", good_points[i])
    out = tmp_path / "out"
    seen = []
    real = run_mod.outputs.write_csv

    def spy(path, rows):
        seen.append(len(rows))
        return real(path, rows)

    monkeypatch.setattr(run_mod.outputs, "write_csv", spy)
    assert RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "-f", "csv"]).exit_code == 0
    assert seen == [1, 2, 3, 4]  # a kill after scan k leaves a complete results.csv of k rows
    assert (out / "s1.npy").is_file()
    (d / "s1.npy").write_bytes(b"\x93NUMPY broken")  # the same stem fails on a re-run
    assert RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "-f", "csv"]).exit_code == 1
    assert not (out / "s1.npy").exists() and not (out / "s1.ply").exists()


# ---- case 10: resource exhaustion -------------------------------------------------------------------------

def test_case10_lzf_stops_at_the_declared_size():
    from btp.io.pcd import lzf_decompress

    bomb = b"\x00a" + b"\xe0\xff\x00" * 2000  # one literal, then back-references of 264 bytes each
    with pytest.raises(ValueError, match="declared size"):
        lzf_decompress(bomb, 1000)


def test_case10_sizes_are_checked_before_reading(tmp_path, monkeypatch):
    sparse = tmp_path / "sparse.npy"
    with open(sparse, "wb") as fh:
        fh.truncate(64 << 20)
    monkeypatch.setenv("BTP_MAX_FILE_BYTES", str(32 << 20))
    with pytest.raises(FileTooLargeError, match="BTP_MAX_FILE_BYTES"):
        read_point_cloud(sparse)
    monkeypatch.delenv("BTP_MAX_FILE_BYTES")
    monkeypatch.setenv("BTP_MAX_POINTS", "1000000")
    huge = tmp_path / "zeros.npz"
    np.savez_compressed(huge, points=np.zeros((2_000_000, 3), np.float32))  # ~24 MB of zeros, ~30 KB on disk
    with pytest.raises(FileTooLargeError, match="2000000 points"):
        read_point_cloud(huge)
    (tmp_path / "fifo.pcd").unlink(missing_ok=True)
    os.mkfifo(tmp_path / "fifo.pcd")
    from btp.io.errors import MissingFileError

    with pytest.raises(MissingFileError, match="not a regular file"):
        read_point_cloud(tmp_path / "fifo.pcd")


def test_case10_identical_points_are_refused_at_once(model_path, tmp_path):
    from btp.geometry.errors import DegenerateCloudError

    pipe = Pipeline(model_path)
    with pytest.raises(DegenerateCloudError, match="coincide"):
        pipe(np.ones((2_000_000, 3), np.float32))  # O(M) check before any FPS


# ---- case 11: messages ----------------------------------------------------------------------------------

def test_case11_messages_say_what_is_wrong(model_path, good_points, tmp_path):
    pipe = Pipeline(model_path)
    tiny = good_points[0] * np.float32(1e-30)
    with pytest.raises(InvalidValuesError, match="rescale"):
        pipe(tiny)
    np.savez(tmp_path / "objects.npz", points=np.array([object()] * 3000), allow_pickle=True)
    with pytest.raises(MalformedFileError, match="Python objects"):
        read_point_cloud(tmp_path / "objects.npz")
    np.save(tmp_path / "few.npy", good_points[0][:10])
    with pytest.raises(Exception) as err:
        pipe(tmp_path / "few.npy")
    assert "few.npy" in str(err.value)


def test_case11_eval_lists_bad_samples_and_labels_outside_0_1(tmp_path, shapes_root):
    from btp.config import PreprocessConfig
    from btp.eval.evaluate import evaluate
    from btp.train.synth import SynthConfig, SynthPlan, write_dataset

    root = tmp_path / "ds"
    write_dataset(shapes_root, root, ["spot"], SynthPlan(per_class_train=0, per_class_test_good=2,
                                                         per_class_test_bad=2, seed=1), SynthConfig(num_points=1024))
    victim = sorted((root / "spot" / "GT").glob("*.txt"))[0]
    rows = np.loadtxt(victim)
    rows[:, -1] = 7  # a label that is neither 0 nor 1
    np.savetxt(victim, rows)
    report = evaluate(root, preprocess=PreprocessConfig(num_points=256))
    failed = report["data"]["failed"]
    assert len(failed) == 1 and "outside {0, 1}" in failed[0]["error"], failed
    assert sum(c["good"] + c["bad"] for c in report["data"]["samples"].values()) == 3


# ---- fuzz ------------------------------------------------------------------------------------------------

def _mutations(pts: np.ndarray, rng: np.random.Generator, n: int):
    """Generated hostile inputs of every class above: cuts, header lines missing words, counts that
    disagree with the data, trailing bytes, absurd magnitudes, odd dtypes, junk text, bad LZF; and of
    the second pass: the reader classes of ``second_pass_files``, scans without a surface, binary
    files ending in a newline."""
    m = len(pts)
    ply_lines = ["format binary_little_endian 1.0", f"element vertex {m}", *XYZ]
    for i in range(n):
        kind = i % 11
        if kind == 8:  # a reader class of the second pass
            cases = second_pass_files(pts, rng)
            name = sorted(cases)[int(rng.integers(0, len(cases)))]
            yield name[name.rindex("."):], cases[name][0]
            continue
        if kind == 9:  # no surface
            arrays = surfaceless_arrays(pts, rng)
            yield ".npy", _npy(arrays[sorted(arrays)[int(rng.integers(0, len(arrays)))]][0])
            continue
        if kind == 10:  # a binary file ending in a newline
            body = _pcd_header(m) + pts.tobytes() if rng.random() < 0.5 else _ply(ply_lines, pts.tobytes())
            yield (".pcd" if body.startswith(b"#") else ".ply"), body + bytes(rng.choice([b"\n", b"\r\n"]))
            continue
        if kind == 0:  # cut anywhere
            base = _pcd_header(m) + pts.tobytes() if rng.random() < 0.5 else _ply(ply_lines, pts.tobytes())
            yield (".pcd" if base.startswith(b"#") else ".ply"), base[:int(rng.integers(1, len(base)))]
        elif kind == 1:  # a header line loses its last word(s)
            lines = list(ply_lines)
            j = int(rng.integers(0, len(lines)))
            lines[j] = " ".join(lines[j].split()[:int(rng.integers(0, len(lines[j].split())))])
            yield ".ply", _ply(lines, pts.tobytes())
        elif kind == 2:  # counts that disagree with the data
            count = int(rng.choice([-1, 0, m // 3, m + 7, 2 ** 40]))
            if rng.random() < 0.5:
                yield ".pcd", _pcd_header(count) + pts.tobytes()
            else:
                yield ".ply", _ply(["format binary_little_endian 1.0", f"element vertex {count}", *XYZ], pts.tobytes())
        elif kind == 3:  # trailing bytes
            yield ".ply", _ply(ply_lines, pts.tobytes() + rng.bytes(int(rng.integers(1, 5000))))
        elif kind == 4:  # absurd magnitudes (float32 overflow / underflow of distances)
            scale = 10.0 ** float(rng.choice([-36, -30, -20, 20, 30, 37]))
            yield ".npy", _npy((pts.astype(np.float64) * scale).astype(rng.choice([np.float32, np.float64])))
        elif kind == 5:  # odd dtypes
            odd = [np.zeros(m, dtype=[("a", "f4"), ("b", "f4")]), np.array([["1", "2", "3"]] * m),
                   (pts * 1j).astype(np.complex64)]
            yield ".npy", _npy(odd[int(rng.integers(0, len(odd)))])
        elif kind == 6:  # text with junk
            lines = [" ".join(str(v) for v in row) for row in pts[:int(rng.integers(1, 600))]]
            lines.insert(int(rng.integers(0, len(lines))), str(rng.choice(["nan nan", "1 2 x", "", "1e999 0 0"])))
            yield ".xyz", "\n".join(lines).encode()
        else:  # compressed PCD with a corrupt block
            payload = zlib.compress(pts.tobytes())[:100]
            header = _pcd_header(m, data="binary_compressed")
            yield ".pcd", header + struct.pack("<II", len(payload), m * 12) + payload


def _npy(array: np.ndarray) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("count", [60] + ([600] if os.environ.get("BTP_FUZZ_LONG") else []))
def test_fuzz_every_generated_file_is_contained(model_path, good_points, tmp_path, count):
    rng = np.random.default_rng(count)
    d = tmp_path / "scans"
    d.mkdir()
    for i, (suffix, payload) in enumerate(_mutations(good_points[1], rng, count)):
        (d / f"fuzz{i:04d}{suffix}").write_bytes(payload)
    for i in range(3):
        np.save(d / f"zz_good{i}.npy", good_points[i])
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none", "--batch", "4"])
    assert result.exit_code in (0, 1), result.output
    summary = _summary(out)
    assert summary["files"] == count + 3
    assert all("internal error" not in f["error"] for f in summary["failed"]), summary["failed"]
    pipe = Pipeline(model_path)
    for i in range(3):
        np.testing.assert_array_equal(np.load(out / f"zz_good{i}.npy"), pipe(d / f"zz_good{i}.npy").scores_per_row())


def test_two_hundred_scans_with_ten_hostile_ones(model_path, shapes_root, tmp_path):
    """The acceptance run: 190 good scans are scored as in solo runs, the 10 hostile ones listed, exit 1."""
    d = tmp_path / "scans"
    pts = real_scan(shapes_root, REAL_SHAPES[0], 1200, seed=0)
    expected = write_hostile(tmp_path / "hostile", pts)
    hostile = sorted(expected)[:10]
    for name in hostile:
        d.mkdir(exist_ok=True)
        (tmp_path / "hostile" / name).rename(d / name)
    goods = []
    for i in range(190):
        name = f"part{i:03d}.npy"
        np.save(d / name, real_scan(shapes_root, REAL_SHAPES[i % 3], 600 + (i % 7) * 50, seed=100 + i))
        goods.append(name)
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none", "--batch", "8"])
    assert result.exit_code == 1, result.output
    summary = _summary(out)
    assert summary["succeeded"] == 190 and sorted(os.path.basename(f["file"]) for f in summary["failed"]) == hostile
    assert all(f["error"] for f in summary["failed"])
    pipe = Pipeline(model_path)
    for name in goods:
        np.testing.assert_array_equal(np.load(out / name.replace(".npy", ".npy")), pipe(d / name).scores_per_row())


# ---- reading ahead of the engine ------------------------------------------------------------------------

def test_prefetch_gives_the_serial_outputs_in_input_order(model_path, good_points, tmp_path):
    from btp.runtime.run import run_files

    d = tmp_path / "scans"
    write_hostile(d, good_points[0])
    for i, pts in enumerate(good_points):
        np.save(d / f"good{i}.npy", pts)
    files = sorted(d.iterdir())
    pipe = Pipeline(model_path)
    serial = run_files(pipe, files, tmp_path / "serial", heatmaps=(), prefetch=0, batch=2)
    ahead = run_files(pipe, files, tmp_path / "ahead", heatmaps=(), prefetch=3, batch=2)
    assert [o.file for o in ahead] == files == [o.file for o in serial]
    assert [o.error for o in ahead] == [o.error for o in serial]
    for o in serial:
        if o.ok:
            np.testing.assert_array_equal(np.load(tmp_path / "ahead" / f"{o.stem}.npy"),
                                          np.load(tmp_path / "serial" / f"{o.stem}.npy"))


def test_bench_throughput_reports_both_modes(model_path, tmp_path):
    result = RUN.invoke(app, ["bench", "throughput", str(model_path), "--files", "4", "--points", "1500",
                              "--repeats", "1", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(next(tmp_path.glob("throughput-*.json")).read_text())
    assert data["outputs_identical"] and data["median_scans_per_s"]["serial"] > 0 and data["ratio"] > 0
    assert "scans/s" in next(tmp_path.glob("throughput-*.md")).read_text()


# ==== second pass: the hostile inputs that got through the first one ====================================

# phrases of library internals that must never reach a user
RAW_PHRASES = ("allow_pickle", "negative dimensions", "all input arrays", "occurs more than once",
               "read_point_cloud", "verify_gt", "layout=", "<array>")


def _pcd_fields(n, fields, sizes, types, counts, data="binary"):
    return (f"VERSION 0.7\nFIELDS {fields}\nSIZE {sizes}\nTYPE {types}\nCOUNT {counts}\nWIDTH {n}\nHEIGHT 1\n"
            f"POINTS {n}\nDATA {data}\n").encode()


def surfaceless_arrays(pts: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (points, a word the refusal must contain): scans that have no surface."""
    m = len(pts)
    direction = rng.normal(size=3)
    line = (rng.random(m)[:, None] * direction + rng.normal(size=3)).astype(np.float32)
    scale = float(rng.uniform(2.0, 20.0))
    offset = float(rng.choice([1e7, 3e7, -2e7]))
    collapsed = (pts.astype(np.float64) / np.ptp(pts) * scale + offset).astype(np.float32)
    few = np.repeat(pts[:int(rng.integers(2, 6))], m // 2, axis=0)[:m]
    return {"line.npy": (line, "line"), "collapsed.npy": (collapsed, "float64"), "few.npy": (few, "distinct")}


def second_pass_files(pts: np.ndarray, rng: np.random.Generator) -> dict[str, tuple[bytes, str, str]]:
    """name -> (file bytes, the error type, a word its message must contain): one per reader class."""
    n = len(pts)
    with_i = np.concatenate([pts, rng.random((n, 1), dtype=np.float32)], axis=1)
    vector_x = np.concatenate([pts, rng.random((n, 2), dtype=np.float32)], axis=1)
    dup = rng.choice(["x", "y", "z"])
    big = pts.astype(np.float64)
    big[int(rng.integers(0, n)), int(rng.integers(0, 3))] = float(rng.choice([1e39, -1e300, 5e307]))
    npz_buf = __import__("io").BytesIO()
    np.savez(npz_buf, points=np.arange(3 * n).astype("datetime64[s]").reshape(n, 3))
    return {
        "count0.pcd": (_pcd_fields(n, "x y z i", "4 4 4 4", "F F F F", "1 1 1 0") + with_i.tobytes(),
                       "MalformedFileError", "COUNT"),
        "vector_x.pcd": (_pcd_fields(n, "x y z", "4 4 4", "F F F", "3 1 1") + vector_x.tobytes(),
                         "MalformedFileError", "COUNT 1"),
        "dup_property.ply": (_ply(["format binary_little_endian 1.0", f"element vertex {n}", *XYZ,
                                   f"property float {dup}"], with_i.tobytes()), "MalformedFileError", "twice"),
        "transposed.npy": (_npy(np.ascontiguousarray(pts.T)), "MalformedFileError", "transposed"),
        "not_zip.npz": (rng.bytes(int(rng.integers(20, 400))), "MalformedFileError", "np.savez"),
        "npy_as.npz": (_npy(pts), "MalformedFileError", "rename it to .npy"),
        "datetime.npz": (npz_buf.getvalue(), "MalformedFileError", "dtype"),
        "float32_overflow.npy": (_npy(big), "InvalidValuesError", "units"),
    }


def test_pass2_item1_scans_without_a_surface_are_refused_and_the_batch_goes_on(model_path, good_points, tmp_path):
    d = tmp_path / "scans"
    d.mkdir()
    cases = surfaceless_arrays(good_points[0], np.random.default_rng(1))
    for name, (points, _) in cases.items():
        np.save(d / name, points)
    np.save(d / "good.npy", good_points[1])
    out = tmp_path / "out"
    result = RUN.invoke(app, ["run", str(model_path), str(d), "--out", str(out), "--heatmap", "none", "--batch", "2"])
    assert result.exit_code == 1, result.output
    summary = _summary(out)
    errors = {os.path.basename(f["file"]): f["error"] for f in summary["failed"]}
    assert set(errors) == set(cases)
    for name, (_, word) in cases.items():
        assert errors[name].startswith("DegenerateCloudError") and word in errors[name], errors[name]
    np.testing.assert_array_equal(np.load(out / "good.npy"), Pipeline(model_path)(d / "good.npy").scores_per_row())


def test_pass2_item1_a_thin_part_and_a_flat_plate_are_still_surfaces(model_path, good_points):
    pipe = Pipeline(model_path)
    thin = good_points[0] * np.array([1.0, 1e-3, 1e-3], np.float32)  # a wire-like part, 1000:1
    plate = good_points[0] * np.array([1.0, 1.0, 0.0], np.float32)  # a flat plate
    far = good_points[0].astype(np.float64) * 50.0 + 1e5  # float64 far from the origin: centered, kept
    for points in (thin, plate, far):
        assert np.isfinite(pipe(points).object_score)


def test_pass2_item1_the_voxel_grid_stays_finite_on_repeated_points(good_points):
    from btp.geometry.sampling import voxel_map

    two = np.repeat(good_points[0][:2], 5000, axis=0)
    vmap = voxel_map(two, 12288)  # the sizing loop refines the grid while only 2 cells ever fill
    assert len(vmap.cell_rep) == 2 and vmap.cell_of_raw.shape == (10000,)


def test_pass2_item2_arrays_that_are_not_numbers_are_refused_by_their_dtype(model_path, good_points):
    pipe = Pipeline(model_path)
    n = len(good_points[0])
    for array in (np.arange(3 * n).astype("datetime64[s]").reshape(n, 3), np.ones((n, 3), bool),
                  (good_points[0] * 1j).astype(np.complex64), np.array([["1", "2", "3"]] * n),
                  np.array([[object()] * 3] * n)):
        with pytest.raises(InvalidValuesError, match=re.escape(f"dtype {array.dtype}")):
            pipe(array)


def test_pass2_item2_reader_errors_are_ours(good_points, tmp_path):
    from btp.io.errors import PointCloudError

    for name, (payload, error, word) in second_pass_files(good_points[0], np.random.default_rng(2)).items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(PointCloudError) as err:
            read_point_cloud(tmp_path / name)
        message = str(err.value)
        assert type(err.value).__name__ == error and word in message, (name, message)
        assert str(tmp_path / name) in message and not any(p in message for p in RAW_PHRASES), (name, message)


def test_pass2_item3_binary_files_may_end_in_a_newline(good_points, tmp_path):
    pts = good_points[0]
    for suffix in (".pcd", ".ply"):
        write_point_cloud(tmp_path / f"clean{suffix}", pts)
        payload = (tmp_path / f"clean{suffix}").read_bytes()
        for tail in (b"\n", b"\r\n", b" \n"):
            (tmp_path / f"tail{suffix}").write_bytes(payload + tail)
            np.testing.assert_array_equal(read_point_cloud(tmp_path / f"tail{suffix}").points, pts)
        for tail in (b"\n" * 40, b"1.0 2.0\n", b"\0"):  # more than a little whitespace is extra data
            (tmp_path / f"extra{suffix}").write_bytes(payload + tail)
            with pytest.raises(MalformedFileError):
                read_point_cloud(tmp_path / f"extra{suffix}")


def _with_config(model_path, out, section: str, key: str, value):
    import onnx

    proto = onnx.load(str(model_path))
    prop = next(p for p in proto.metadata_props if p.key == "btp")
    doc = json.loads(prop.value)
    doc["config"][section][key] = value
    prop.value = json.dumps(doc)
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize("section,key,value", [("preprocess", "num_points", 1e9), ("preprocess", "num_points", 10**9),
                                               ("preprocess", "voxel_reps", 0), ("preprocess", "rgb_fill", float("nan")),
                                               ("scoring", "top_ratio", 7.0), ("encoder", "num_group", 32.5)])
def test_pass2_item4_metadata_numbers_are_range_checked(model_path, good_points, tmp_path, section, key, value):
    np.save(tmp_path / "g.npy", good_points[0])
    bad = _with_config(model_path, tmp_path / "bad.onnx", section, key, value)
    result = RUN.invoke(app, ["run", str(bad), str(tmp_path / "g.npy"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    text = _flat(result.output)
    assert f"{section}.{key}" in text and "btp-export" in text and str(bad) in text


@pytest.mark.parametrize("key,value", [("format_version", "1"), ("format_version", 1.5)])
def test_pass2_item4_the_metadata_format_version_is_checked(model_path, good_points, tmp_path, key, value):
    import onnx

    np.save(tmp_path / "g.npy", good_points[0])
    proto = onnx.load(str(model_path))
    prop = next(p for p in proto.metadata_props if p.key == "btp")
    doc = json.loads(prop.value)
    doc[key] = value
    prop.value = json.dumps(doc)
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    result = RUN.invoke(app, ["run", str(tmp_path / "bad.onnx"), str(tmp_path / "g.npy"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and key in _flat(result.output) and "btp-export" in _flat(result.output), result.output


def test_pass2_item5_scans_in_flight_are_bounded_whatever_batch_says(model_path, good_points, tmp_path, monkeypatch):
    from btp.runtime import run as run_mod

    d = tmp_path / "scans"
    d.mkdir()
    for i in range(9):
        np.save(d / f"s{i}.npy", good_points[i % 6])
    pipe = Pipeline(model_path)
    budget = 3 * run_mod.scan_bytes(pipe.cfg, pipe.cfg.preprocess.num_points) * 2  # two scans per stage
    assert run_mod.in_flight_cap(pipe.cfg, budget, pipe.cfg.preprocess.num_points) == 2
    seen, depths = [], []
    real_infer, real_prefetch = Pipeline.infer, run_mod._Prefetch.__init__

    def infer(self, jobs, batch_size=None):
        seen.append(len(jobs))
        return real_infer(self, jobs, batch_size)

    def prefetch(self, pipeline, paths, depth):
        depths.append(depth)
        real_prefetch(self, pipeline, paths, depth)

    monkeypatch.setattr(Pipeline, "infer", infer)
    monkeypatch.setattr(run_mod._Prefetch, "__init__", prefetch)
    outcomes = run_mod.run_files(pipe, sorted(d.iterdir()), tmp_path / "out", batch=1_000_000, heatmaps=(),
                                 memory_budget=budget)
    assert all(o.ok for o in outcomes) and max(seen) <= 2 and sum(seen) == 9 and depths == [2]
    for o in outcomes:  # the same scores as without a bound
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{o.stem}.npy"), pipe(o.file).scores_per_row())
    help_text = _flat(RUN.invoke(app, ["run", "--help"], env={"COLUMNS": "400"}).output)
    assert "--max-memory" in help_text and "whatever --batch says" in help_text


def test_pass2_item6_other_commands_check_their_output_place(model_path, good_points, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file / "model.onnx", tmp_path / "folder_not_file", Path("/proc/btp-cannot-write/model.onnx")):
        if out.name == "folder_not_file":
            out.mkdir()
        result = RUN.invoke(app, ["export", "--model", "tiny", "--out", str(out)])
        assert result.exit_code == 2 and isinstance(result.exception, (SystemExit, type(None))), result.output
        assert "--out" in _flat(result.output), result.output
    result = RUN.invoke(app, ["export", "--model", "tiny", "--format", "triton", "--out", str(a_file)])
    assert result.exit_code == 2 and "--out" in _flat(result.output), result.output
    # btp report: RESULTS whose report_assets place is taken by a file
    np.save(tmp_path / "g.npy", good_points[0])
    results = tmp_path / "results"
    assert RUN.invoke(app, ["run", str(model_path), str(tmp_path / "g.npy"), "--out", str(results)]).exit_code == 0
    (results / "report_assets").write_text("not a folder")
    result = RUN.invoke(app, ["report", str(results)])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "RESULTS" in _flat(result.output) or "report_assets" in _flat(result.output)
    if os.geteuid() != 0:
        results.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            result = RUN.invoke(app, ["report", str(results)])
            assert result.exit_code == 2 and "RESULTS" in _flat(result.output), result.output
        finally:
            results.chmod(stat.S_IRWXU)
    # btp demo: an output place that cannot be a folder, refused before any export
    monkeypatch.setenv("BTP_CACHE", str(tmp_path / "cache"))
    result = RUN.invoke(app, ["demo", "--model", "tiny", "--out", str(a_file), "--no-png"])
    assert result.exit_code == 2 and "--out" in _flat(result.output), result.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("value", ["-5", "1.5", "-0.01", "1e308"])
def test_pass2_item7_thresholds_outside_0_1_are_refused(model_path, good_points, tmp_path, value):
    np.save(tmp_path / "g.npy", good_points[0])
    result = RUN.invoke(app, ["run", str(model_path), str(tmp_path / "g.npy"), "-t", value, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "[0, 1]" in _flat(result.output), result.output
    assert not (tmp_path / "o").exists()


def test_pass2_item7_calibration_margins_and_sidecars_stay_in_0_1(model_path, good_points, tmp_path):
    from btp.runtime.calibration import CalibrationError, read_threshold

    np.save(tmp_path / "g.npy", good_points[0])
    side = tmp_path / "t.json"
    for margin in ("1e308", "-2", "0.99"):  # 0.99: the good score + 0.99 leaves [0, 1]
        result = RUN.invoke(app, ["calibrate", str(model_path), str(tmp_path / "g.npy"), "-m", margin, "-o", str(side)])
        assert result.exit_code == 2 and "[0, 1]" in _flat(result.output), (margin, result.output)
        assert max(len(word) for word in result.output.split()) < 60 and not side.exists()
    assert RUN.invoke(app, ["calibrate", str(model_path), str(tmp_path / "g.npy"), "-o", str(side)]).exit_code == 0
    doc = json.loads(side.read_text())
    doc["value"] = 1.5
    side.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError, match=r"\[0, 1\]"):
        read_threshold(side)


def test_pass2_item8_calibrate_warns_when_the_good_scans_are_of_different_parts(model_path, shapes_root, tmp_path):
    mixed, one = tmp_path / "mixed", tmp_path / "one"
    mixed.mkdir()
    one.mkdir()
    for i, shape in enumerate(REAL_SHAPES):
        np.save(mixed / f"{i}.npy", real_scan(shapes_root, shape, 1500, seed=i))
        np.save(one / f"{i}.npy", real_scan(shapes_root, REAL_SHAPES[0], 1500 + 100 * i, seed=10 + i))
    result = RUN.invoke(app, ["calibrate", str(model_path), str(mixed), "-o", str(tmp_path / "m.json")])
    text = _flat(result.output)
    assert result.exit_code == 0 and "different parts" in text and "calibrate each part type separately" in text
    result = RUN.invoke(app, ["calibrate", str(model_path), str(one), "-o", str(tmp_path / "o.json")])
    assert result.exit_code == 0 and "different parts" not in _flat(result.output)


def test_pass2_item9_eval_says_what_it_leaves_out(shapes_root, tmp_path):
    from btp.config import PreprocessConfig
    from btp.eval.evaluate import evaluate
    from btp.train.synth import SynthConfig, SynthPlan, write_dataset

    root = tmp_path / "ds"
    write_dataset(shapes_root, root, ["spot"], SynthPlan(per_class_train=0, per_class_test_good=2,
                                                         per_class_test_bad=2, seed=1), SynthConfig(num_points=1024))
    write_dataset(shapes_root, root, ["cow"], SynthPlan(per_class_train=0, per_class_test_good=2,
                                                        per_class_test_bad=0, seed=2), SynthConfig(num_points=1024))
    (root / "empty_class").mkdir()
    (root / "no_scans" / "test").mkdir(parents=True)
    line = sorted((root / "spot" / "test").glob("*positive*.pcd"))[0]  # a normal scan whose points lie on a line
    write_point_cloud(line, np.linspace(0, 1, 1024)[:, None].astype(np.float32) * np.float32([1, 2, 3]))
    victim = sorted((root / "spot" / "GT").glob("*.txt"))[0]
    rows = np.loadtxt(victim)
    rows[:, :3] += 0.5  # a GT whose points are not its scan's
    np.savetxt(victim, rows)
    report = evaluate(root, preprocess=PreprocessConfig(num_points=256))
    data = report["data"]
    assert set(data["empty_classes"]) == {"empty_class", "no_scans"}
    errors = {os.path.basename(f["file"]): f["error"] for f in data["failed"]}
    assert errors[line.name].startswith("DegenerateCloudError") and "<array>" not in errors[line.name]
    gt_error = errors[victim.stem + ".pcd"]
    assert "--trust-gt" in gt_error and not any(p in gt_error for p in RAW_PHRASES), gt_error
    trusted = evaluate(root, preprocess=PreprocessConfig(num_points=256), verify_gt=False)
    assert [f["file"] for f in trusted["data"]["failed"]] == [str(line)]
    result = RUN.invoke(app, ["eval", "--data", str(root), "--no-model", "--trust-gt"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "1 test samples could not be scored" in _flat(result.output), result.output
    result = RUN.invoke(app, ["eval", "--data", str(root), "--no-model"], env={"COLUMNS": "200"})
    text = _flat(result.output)
    assert "class empty_class left out" in text and "class no_scans left out" in text, text
    assert "cow: o_auroc" in text and "only normal" in text, text
    assert "<array>" not in text and "verify_gt" not in text


def test_pass2_item10_stale_temp_files_go_and_warnings_reach_the_console(model_path, good_points, tmp_path):
    import signal
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    killed = ("import os, signal, sys\nfrom btp.io import files\n"
              "os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
              "files.atomic_write_bytes(sys.argv[1], b'file,status\\n' * 1000)\n")
    proc = subprocess.run([sys.executable, "-c", killed, str(out / "results.csv")], env=dict(os.environ),
                          capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].name.startswith(".results.csv.")
    live = out / f".summary.json.{os.getpid()}-abcdefgh.tmp"  # a writer that still runs: not ours to delete
    live.write_bytes(b"")
    (out / ".notes.tmp").write_text("someone else's file")
    np.save(tmp_path / "few.npy", good_points[0][:300])  # fewer points than the model's N = 512
    nan = good_points[1].copy()
    nan[:5] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    result = RUN.invoke(app, ["run", str(model_path), str(tmp_path / "few.npy"), str(tmp_path / "nan.npy"),
                              "--out", str(out), "-f", "csv"])
    assert result.exit_code == 0, result.output
    assert not left[0].exists() and live.exists() and (out / ".notes.tmp").exists()
    text = _flat(result.output)
    assert "removed 1 temporary file" in text
    assert "few.npy: scan has 300 points, fewer than the model's N = 512" in text
    assert "nan.npy" in text and "dropped 5 of" in text


# ---- fuzz, second pass -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounds", [2] + ([20] if os.environ.get("BTP_FUZZ_LONG") else []))
def test_fuzz_second_pass_classes_fail_typed(model_path, good_points, tmp_path, rounds):
    """Every class of the second pass, generated ``rounds`` times with fresh random parameters, read
    and scored: a typed error that names the file and no library internals; good files unharmed."""
    from btp.geometry.errors import DegenerateCloudError
    from btp.io.errors import PointCloudError

    pipe = Pipeline(model_path)
    for r in range(rounds):
        rng = np.random.default_rng(1000 + r)
        pts = good_points[r % 6]
        d = tmp_path / f"round{r}"
        d.mkdir()
        for name, (payload, error, word) in second_pass_files(pts, rng).items():
            (d / name).write_bytes(payload)
            with pytest.raises(PointCloudError) as err:
                pipe(d / name)
            assert type(err.value).__name__ == error and word in str(err.value) and name in str(err.value)
            assert not any(p in str(err.value) for p in RAW_PHRASES), str(err.value)
        for name, (points, word) in surfaceless_arrays(pts, rng).items():
            np.save(d / name, points)
            with pytest.raises(DegenerateCloudError, match=word):
                pipe(d / name)
        for suffix in (".pcd", ".ply"):  # benign trailing whitespace: read like the clean file
            write_point_cloud(d / f"clean{suffix}", pts)
            tail = bytes(rng.choice([b"\n", b"\r\n", b" \n", b"\t\n"]))
            (d / f"tail{suffix}").write_bytes((d / f"clean{suffix}").read_bytes() + tail)
            np.testing.assert_array_equal(pipe(d / f"tail{suffix}").point_scores, pipe(d / f"clean{suffix}").point_scores)
