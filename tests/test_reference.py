"""Reference-guided inspection: `btp reference build` + `btp-run --reference` on real shapes.

Good scans are sampled from the shared meshes and turned by random rotations (any angle); a
defect is a bump pushed out of the surface. The model is the tiny, freshly initialised export
(its zero-shot map is noise): what is asserted is the reference's work - registration in any
orientation, routing, refusals - and that a real bump outscores the good scans.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.cli import app
from btp.io import read_point_cloud, write_point_cloud
from btp.runtime.outcome import ScanOutcome
from btp.runtime.reference import ReferenceError, read_reference, route
from runtime_helpers import BLOCK, BUNNY, PINION, build_references, real_scan, tiny_export, turned, with_bump

N = 3000


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return tiny_export(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def refs(tmp_path_factory, shapes_root, model_path):
    """bunny.btpref and block.btpref, each built from 3 good scans in random poses, via the CLI."""
    return build_references(tmp_path_factory.mktemp("refs"), model_path, shapes_root, n=N)


def _run(model_path, inputs, out, reference, heatmap: str = "none") -> dict:
    res = CliRunner().invoke(app, ["run", str(model_path), *map(str, inputs), "--out", str(out),
                                   "--reference", str(reference), "--heatmap", heatmap])
    assert res.exit_code == 0, res.output
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "summary"}


def test_build_and_run_any_orientation(refs, model_path, shapes_root, tmp_path):
    ref = read_reference(refs / "bunny.btpref")
    assert ref.name == "bunny" and len(ref.header["sources"]) == 3
    assert all(len(s["sha256"]) == 64 for s in ref.header["sources"])
    assert ref.header["threshold"]["value"] >= max(ref.header["threshold"]["leave_one_out_scores"])
    scans = tmp_path / "scans"
    scans.mkdir()
    good = real_scan(shapes_root, BUNNY, n=N, seed=40)
    write_point_cloud(scans / "good.pcd", turned(good, 41))
    write_point_cloud(scans / "bump.pcd", turned(with_bump(good), 42))
    docs = _run(model_path, [scans], tmp_path / "out", refs / "bunny.btpref", heatmap="ply")
    for stem in ("good", "bump"):
        r = docs[stem]["reference"]
        assert r["registered"] and r["fitness"] > 0.9, r
        assert r["part"] == "bunny" and "deviation" in r
    assert docs["good"]["decision"] == "normal", docs["good"]["reference"]
    assert docs["bump"]["decision"] == "anomalous", docs["bump"]["reference"]
    assert docs["bump"]["object_score"] > docs["good"]["object_score"]
    assert docs["bump"]["zero_shot_score"] != docs["bump"]["object_score"]
    assert docs["bump"]["threshold"]["value"] == pytest.approx(ref.threshold)
    maps = np.load(tmp_path / "out" / "bump.reference.npy")  # [rows, 2]: fused, signed deviation
    assert maps.shape == (N, 2)
    assert np.abs(maps[:, 1]).max() == pytest.approx(docs["bump"]["reference"]["deviation"]["max_abs"], rel=1e-5)
    fused = read_point_cloud(tmp_path / "out" / "bump.fused.ply")
    np.testing.assert_allclose(fused.scalars, maps[:, 0], rtol=1e-5, atol=1e-6)
    assert docs["bump"]["outputs"]["fused_ply"].endswith("bump.fused.ply")
    back = ScanOutcome.from_document(docs["bump"])
    assert back.reference.part == "bunny" and back.reference.decision == "anomalous"
    # the bump stands out of the surface by up to 6 % of the size: the deviation sees it in scan units
    size = float(np.linalg.norm(np.ptp(good, axis=0)))
    assert docs["bump"]["reference"]["deviation"]["max_abs"] > 0.03 * size
    assert docs["good"]["reference"]["deviation"]["max_abs"] < 0.03 * size


def test_routing_by_folder_and_file_name(refs, model_path, shapes_root, tmp_path):
    scans = tmp_path / "line"
    (scans / "bunny").mkdir(parents=True)
    write_point_cloud(scans / "bunny" / "part7.pcd", turned(real_scan(shapes_root, BUNNY, n=N, seed=50), 50))
    write_point_cloud(scans / "block_0001.pcd", turned(real_scan(shapes_root, BLOCK, n=N, seed=51), 51))
    write_point_cloud(scans / "unknown.pcd", turned(real_scan(shapes_root, BLOCK, n=N, seed=52), 52))
    docs = _run(model_path, [scans], tmp_path / "out", refs)
    assert docs["part7"]["reference"]["part"] == "bunny" and docs["part7"]["reference"]["route"] == "folder bunny"
    assert docs["block_0001"]["reference"]["part"] == "block"
    assert docs["block_0001"]["reference"]["registered"]
    assert docs["unknown"]["reference"]["part"] is None and docs["unknown"]["decision"] == "no reference"
    assert route("x/BUNNY/a.pcd", ["bunny", "block"]).part == "bunny"
    assert route("blockade.pcd", ["bunny", "block"]).part is None  # a name must end at a separator


def test_scan_that_does_not_register_is_flagged(refs, model_path, shapes_root, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    write_point_cloud(scans / "gear.pcd", turned(real_scan(shapes_root, PINION, n=N, seed=60), 60))
    doc = _run(model_path, [scans], tmp_path / "out", refs / "bunny.btpref")["gear"]
    assert doc["reference"]["registered"] is False and doc["decision"] == "not registered"
    assert doc["reference"]["fitness"] < 0.6
    assert doc["threshold"] is None and any("does not register" in w for w in doc["warnings"])


def test_reference_for_another_model_refused(refs, model_path, tmp_path, shapes_root):
    import onnx

    other = tmp_path / "other.onnx"
    proto = onnx.load(str(model_path))
    proto.doc_string = "another build of the model"
    onnx.save(proto, str(other))
    write_point_cloud(tmp_path / "a.pcd", real_scan(shapes_root, BUNNY, n=N, seed=3))
    res = CliRunner().invoke(app, ["run", str(other), str(tmp_path / "a.pcd"), "--out", str(tmp_path / "out"),
                                   "--reference", str(refs / "bunny.btpref")])
    assert res.exit_code == 2
    assert "built for another model" in " ".join(res.output.split())


def test_tampered_reference_refused(refs, tmp_path):
    data = bytearray((refs / "bunny.btpref").read_bytes())
    body = tmp_path / "payload.btpref"
    body.write_bytes(bytes(data[:-200]) + bytes(b ^ 0xFF for b in data[-200:-100]) + bytes(data[-100:]))
    with pytest.raises(ReferenceError, match="does not match its sha256"):
        read_reference(body)
    head = tmp_path / "threshold.btpref"
    value = read_reference(refs / "bunny.btpref").threshold
    digits = json.dumps(value)
    first = next(i for i, c in enumerate(digits) if c in "123456789")  # same length: the header still parses
    raised = digits[:first] + str(int(digits[first]) % 9 + 1) + digits[first + 1:]
    text = bytes(data).replace(digits.encode(), raised.encode(), 1)
    assert text != bytes(data)
    head.write_bytes(text)
    with pytest.raises(ReferenceError, match="does not match its sha256"):
        read_reference(head)
    (tmp_path / "junk.btpref").write_bytes(b"PK\x03\x04 not a reference")
    with pytest.raises(ReferenceError, match="not a btp reference"):
        read_reference(tmp_path / "junk.btpref")


def test_no_pickle_loaded(refs, tmp_path, monkeypatch):
    """An object array is refused even with a matching sha256, and reading never unpickles."""
    import io
    import struct

    from btp.runtime import reference as refmod

    ref = read_reference(refs / "bunny.btpref")
    buf = io.BytesIO()
    np.savez(buf, **ref.arrays, evil=np.array([{"a": 1}], dtype=object))
    payload = buf.getvalue()
    header = dict(ref.header)
    header["arrays"] = {**header["arrays"], "evil": {"shape": [1], "dtype": "object"}}
    header["sha256"] = refmod.content_sha256(header, payload)
    head = json.dumps(header).encode()
    (tmp_path / "evil.btpref").write_bytes(refmod.MAGIC + struct.pack("<Q", len(head)) + head + payload)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a reference file was unpickled")

    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(ReferenceError, match="plain arrays"):
        read_reference(tmp_path / "evil.btpref")
    assert read_reference(refs / "block.btpref").name == "block"


def test_reference_with_the_models_embeddings(shapes_root, tmp_path_factory, tmp_path):
    """--embeddings: the model's patch embeddings of the good scans in the template's frame are
    banked; a scan is run through the model again in that frame and its embedding map fused. A
    model file without the patch_embed output is refused for it, and works without it."""
    from btp.runtime.guided import EMBEDDING, ReferenceScorer
    from btp.runtime.pipeline import Pipeline

    embed_model = tiny_export(tmp_path_factory, patch_embed=True)[0]
    plain_model = tiny_export(tmp_path_factory)[0]
    good = tmp_path / "good"
    good.mkdir()
    for i in range(3):
        write_point_cloud(good / f"g{i}.pcd", turned(real_scan(shapes_root, BUNNY, n=N, seed=10 + i), 10 + i))
    out = tmp_path / "bunny.btpref"
    res = CliRunner().invoke(app, ["reference", "build", str(good), "--model", str(plain_model), "--out", str(out),
                                   "--embeddings"])
    assert res.exit_code == 2 and "btp-export --patch-embed" in " ".join(res.output.split())
    assert not out.exists()
    res = CliRunner().invoke(app, ["reference", "build", str(good), "--model", str(embed_model), "--out", str(out),
                                   "--embeddings"])
    assert res.exit_code == 0, res.output
    ref = read_reference(out)
    assert ref.settings["embedding"] is True and EMBEDDING in ref.statistics
    pipe = Pipeline(embed_model)
    bank = ref.arrays["embedding_bank"]
    assert bank.shape == (3 * pipe.meta.num_group, pipe.meta.io["outputs"]["patch_embed"]["shape"][-1])
    np.testing.assert_allclose(np.linalg.norm(bank, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ReferenceError, match="patch embeddings"):  # scoring needs the model to run
        ReferenceScorer(ref)(real_scan(shapes_root, BUNNY, n=N, seed=40), np.zeros(N, np.float32))
    scans = tmp_path / "scans"
    scans.mkdir()
    scan = real_scan(shapes_root, BUNNY, n=N, seed=40)
    write_point_cloud(scans / "good.pcd", turned(scan, 41))
    write_point_cloud(scans / "bump.pcd", turned(with_bump(scan), 42))
    docs = _run(embed_model, [scans], tmp_path / "out", out)
    assert docs["good"]["reference"]["registered"] and docs["bump"]["reference"]["registered"]
    assert docs["bump"]["object_score"] > docs["good"]["object_score"]
    # the second pass sees the scan in the template's frame, whatever its pose
    pipe = Pipeline(embed_model, reference=out)
    seen = []
    embed = pipe.embed
    pipe.embed = lambda points: seen.append(points) or embed(points)
    got = pipe(turned(scan, 43)).reference.scores
    assert got.embedding is not None and got.embedding.shape == (N,) and len(seen) == 1
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(ref.arrays["template"]).query(seen[0])
    assert np.median(dist) < 2 * ref.settings["template_voxel"]
    assert np.median(cKDTree(ref.arrays["template"]).query(turned(scan, 43))[0]) > 10 * ref.settings["template_voxel"]


def test_eval_references_train(model_path, shapes_root, tmp_path, tmp_path_factory):
    """`btp eval --references train` on a tiny mesh-maker set: the fused model in mean/classes,
    zero-shot, reference-only and both baselines beside it, with and without --random-pose; with
    --embeddings, the model's embeddings in the references."""
    from btp.eval.meshdefects import MeshDefectConfig, write_mesh_defect_dataset

    data = tmp_path / "set"
    write_mesh_defect_dataset(shapes_root, data, ["stanford_bunny"], per_class_good=2, per_class_bad=3,
                              per_class_train=3, seed=5, cfg=MeshDefectConfig(num_points=2000), log=lambda m: None)
    assert len(list((data / "stanford_bunny" / "train").glob("*.pcd"))) == 3
    for extra in ([], ["--random-pose", "7"]):
        out = tmp_path / f"eval{len(extra)}.json"
        res = CliRunner().invoke(app, ["eval", "--data", str(data), "--model", str(model_path), "--references",
                                       "train", "--shots", "3", "--json", str(out), *extra])
        assert res.exit_code == 0, res.output
        report = json.loads(out.read_text())
        assert report["data"]["references"] == "train" and report["data"]["shots"] == 3
        assert report["data"]["random_pose"] == (7 if extra else None)
        assert report["data"]["samples"]["stanford_bunny"] == {"good": 2, "bad": 3, "points": 10000}
        for row in ("zero_shot", "reference_only", "icp_baseline", "fpfh_baseline"):
            assert 0.0 <= report[row]["mean"]["p_auroc"] <= 1.0, row
        for key in ("o_auroc", "p_auroc", "au_pro"):
            assert 0.0 <= report["mean"][key] <= 1.0
        assert set(report["fusions"]) >= {"max", "mean"} and "ref-max+emb+zs" not in report["fusions"]
        assert "reference" in report["data"]["ms_per_scan"]
    # --cad-shapes: the class's mesh is its template; the train/ scans give the bank and statistics
    out = tmp_path / "cad.json"
    res = CliRunner().invoke(app, ["eval", "--data", str(data), "--model", str(model_path), "--references", "train",
                                   "--shots", "3", "--cad-shapes", str(shapes_root), "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["data"]["cad"] == {"stanford_bunny": str(shapes_root / BUNNY)}
    assert 0.0 <= report["mean"]["p_auroc"] <= 1.0
    # --embeddings: a model that gives its patch embeddings; the embedding rules beside the others
    out = tmp_path / "embed.json"
    args = ["eval", "--data", str(data), "--references", "train", "--shots", "3", "--embeddings"]
    res = CliRunner().invoke(app, [*args, "--model", str(model_path), "--json", str(out)], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and "gives no patch embeddings" in res.output and not out.exists()
    embed_model = tiny_export(tmp_path_factory, patch_embed=True)[0]
    res = CliRunner().invoke(app, [*args, "--model", str(embed_model), "--json", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["model"]["fusion"] == "ref-max+emb+zs" and report["data"]["settings"]["embedding"] is True
    assert {"ref-max+zs", "ref-max+emb+zs", "ref3-max+zs"} <= set(report["fusions"])
    assert report["mean"]["o_auroc"] == report["fusions"]["ref-max+emb+zs"]["mean"]["o_auroc"]


def test_cad_template(model_path, shapes_root, tmp_path):
    """--cad: the mesh's sampled surface is the template; good scans in any pose register to it."""
    good = tmp_path / "good"
    good.mkdir()
    for i in range(2):
        write_point_cloud(good / f"g{i}.pcd", turned(real_scan(shapes_root, BLOCK, n=N, seed=70 + i), 70 + i))
    out = tmp_path / "block.btpref"
    res = CliRunner().invoke(app, ["reference", "build", str(good / "g0.pcd"), str(good / "g1.pcd"), "--model",
                                   str(model_path), "--out", str(out), "--cad", str(shapes_root / BLOCK),
                                   "--name", "bracket"])
    assert res.exit_code == 0, res.output
    ref = read_reference(out)
    assert ref.name == "bracket" and ref.header["template_from"] == "cad"
    assert ref.header["sources"][-1]["cad"] is True
    # the template lies on the mesh: every template point within a few template cells of the CAD surface
    cad = real_scan(shapes_root, BLOCK, n=50_000, seed=0)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(cad).query(ref.arrays["template"])
    assert dist.max() < 3 * ref.settings["template_voxel"]


def test_dense_scan_is_mapped_on_cells(refs, shapes_root):
    """Over MAP_POINTS points the maps come from voxel cells gathered back to every point; they
    agree with the point-by-point maps of the same scan thinned below the limit."""
    from btp.geometry.registration import voxel_cells
    from btp.runtime.guided import MAP_POINTS, ReferenceScorer

    scorer = ReferenceScorer(read_reference(refs / "bunny.btpref"))
    good = real_scan(shapes_root, BUNNY, n=MAP_POINTS + 10_000, seed=80)
    bump = with_bump(good)
    moved = np.linalg.norm(bump - good, axis=1) > 0.005 * np.linalg.norm(np.ptp(good, axis=0))
    typical = scorer.ref.statistics["zero_shot"]["median"]  # a zero-shot map that says nothing
    score = {}
    for name, cloud in (("good", good), ("bump", bump), ("thin bump", bump[::4])):
        got = scorer(turned(cloud, 81), np.full(len(cloud), typical, np.float32))
        assert got.registered and got.fused.shape == (len(cloud),)
        score[name] = got
    assert score["bump"].fused[moved].mean() > 3 * max(score["bump"].fused[~moved].mean(), 0.1)
    assert score["bump"].object_score > 1.15 * score["good"].object_score
    assert score["bump"].object_score == pytest.approx(score["thin bump"].object_score, rel=0.25)
    dense = good
    cells, cell_of = voxel_cells(dense, 0.05)
    np.testing.assert_allclose(cells[cell_of], dense, atol=0.05 * np.sqrt(3))
    np.testing.assert_allclose(np.bincount(cell_of, weights=dense[:, 0]) / np.bincount(cell_of), cells[:, 0],
                               rtol=1e-5, atol=1e-5)


def test_registration_of_a_turned_scan_and_its_fitness(shapes_root):
    """A turned scan of a template's part registers in any orientation (centroid ICP or RANSAC),
    and the fitness follows open3d's evaluate_registration to the last digit (a shifted pose too)."""
    import open3d as o3d

    from btp.geometry import registration as reg

    template = real_scan(shapes_root, BLOCK, n=20_000, seed=90)
    target = reg.make_target(template, reg.part_size(template) / 40)
    scan = real_scan(shapes_root, BLOCK, n=8000, seed=91)
    got = reg.register(turned(scan, 92), target)
    assert got.fitness > 0.9
    moved = reg.transform(turned(scan, 92), got.transform)
    assert np.abs(moved.mean(axis=0) - scan.mean(axis=0)).max() < 3 * target.voxel
    for shift in (0.0, 4.0):
        pose = got.transform.copy()
        pose[:3, 3] += shift * target.voxel
        ours = reg.evaluate(turned(scan, 92), target, pose)
        ref = o3d.pipelines.registration.evaluate_registration(
            reg._cloud(turned(scan, 92)), reg._cloud(target.points), reg.FITNESS_RADIUS * target.voxel, pose)
        assert ours.fitness == pytest.approx(ref.fitness, abs=1e-12)
        assert ours.rmse == pytest.approx(ref.inlier_rmse, rel=1e-4)
    assert reg.evaluate(turned(scan, 92), target, pose).fitness < 0.9  # shifted by 4 cells: a bad fit


def test_multiscale_descriptors_match_open3d(shapes_root):
    """The multi-scale FPFH from one neighbour search is open3d's compute_fpfh_feature at each
    radius (Hellinger, unit norm per radius) to float32 rounding: a whole scan and a single view,
    radii under and over the 50-neighbour cap; and the bank's brute-force nearest distance is a
    k-d tree's."""
    from scipy.spatial import cKDTree

    from btp.geometry import registration as reg
    from btp.runtime.guided import _nearest_dist

    scan = turned(real_scan(shapes_root, BUNNY, n=20_000, seed=95), 96)
    voxel = reg.part_size(scan) / 64
    for cloud in (scan, scan[scan[:, 0] > np.median(scan[:, 0])]):
        cells = reg.voxel_down(cloud, voxel)
        nrm = reg.normals(cells, reg.NORMAL_RADIUS * voxel, center=cells.mean(axis=0))
        radii = [1.5 * voxel, 3.0 * voxel, 8.0 * voxel]
        ours = reg.multiscale_fpfh(cells, nrm, radii)
        assert ours.shape == (len(cells), 99)
        for i, r in enumerate(radii):
            h = np.sqrt(np.maximum(reg.fpfh(cells, nrm, r), 0.0))
            want = h / np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
            np.testing.assert_allclose(ours[:, 33 * i:33 * (i + 1)], want, atol=1e-5)
        assert np.abs(ours[:, :33] - ours[:, 33:66]).max() > 0.1  # the radii see different neighbourhoods
    # the reference's radii on a dense and a sparse sampling: the largest radius repeats the one
    # before on some rows only (the folded product and the full one both run)
    rows = []
    for cloud in (scan, scan[::8]):
        cells = reg.voxel_down(cloud, voxel)
        nrm = reg.normals(cells, reg.NORMAL_RADIUS * voxel, center=cells.mean(axis=0))
        rows.append(reg.multiscale_fpfh(cells, nrm, [3.0 * voxel, 5.0 * voxel, 8.0 * voxel]))
    rows = np.concatenate(rows)
    repeats = np.all(rows[:, 66:] == rows[:, 33:66], axis=1)
    assert 0.05 < repeats.mean() < 0.95
    bank, queries = rows[::3], rows[1::3]
    np.testing.assert_allclose(_nearest_dist(bank, queries, block=100), cKDTree(bank).query(queries)[0], atol=1e-4)


def test_register_keeps_the_best_of_the_centroid_alignment_and_ransac(shapes_root):
    """A scan near the template's pose takes the centroid alignment at once; a scan of another part
    (nothing fits well) still gets the centroid alignment's full refinement when RANSAC does no
    better: the best fitness wins, whichever order they ran in."""
    from scipy.spatial.transform import Rotation

    from btp.geometry import registration as reg

    template = real_scan(shapes_root, BLOCK, n=20_000, seed=90)
    target = reg.make_target(template, reg.part_size(template) / 40)

    def centroid_icp(scan):
        src = reg.voxel_down(scan, target.voxel)
        shift = np.eye(4)
        shift[:3, 3] = target.points.mean(axis=0) - src.mean(axis=0)
        return reg.icp(src, target, shift)

    scan = real_scan(shapes_root, BLOCK, n=8000, seed=93)
    near = (scan @ Rotation.from_rotvec([0.03, -0.02, 0.04]).as_matrix().T).astype(np.float32) + 0.01
    got, want = reg.register(near, target), centroid_icp(near)
    assert got.fitness > 0.9
    np.testing.assert_allclose(got.transform, want.transform, atol=1e-9)
    other = turned(real_scan(shapes_root, PINION, n=8000, seed=94), 95)
    other *= reg.part_size(template) / reg.part_size(other)  # the same size, not the same shape
    got, want = reg.register(other, target), centroid_icp(other)
    assert got.fitness < 0.9
    assert got.fitness >= want.fitness
    # no RANSAC seed at all: the deferred finer scales still run
    np.testing.assert_allclose(reg.register(other, target, tries=0).transform, want.transform, atol=1e-9)


def test_a_pose_that_fits_part_of_the_scan_does_not_end_the_search(shapes_root, monkeypatch):
    """The centroid alignment ends the search only at GOOD_FITNESS: one that fits 0.93 of the scan (a
    single view slid along the template) still lets RANSAC look for a better pose, which wins."""
    from btp.geometry import registration as reg

    template = real_scan(shapes_root, BLOCK, n=20_000, seed=90)
    target = reg.make_target(template, reg.part_size(template) / 40)
    scan = turned(real_scan(shapes_root, BLOCK, n=8000, seed=96), 97)
    real_icp, ransac_runs = reg.icp, []

    def icp(source, tgt, init, scales=reg.ICP_SCALES, **kwargs):
        got = real_icp(source, tgt, init, scales, **kwargs)
        if len(ransac_runs) == 0:  # the centroid alignment: a pose that fits most of the scan, not all
            return reg.Registration(transform=got.transform, fitness=0.93, rmse=got.rmse)
        return got

    import open3d as o3d

    ransac = o3d.pipelines.registration.registration_ransac_based_on_feature_matching

    def counted(*args, **kwargs):
        ransac_runs.append(1)
        return ransac(*args, **kwargs)

    monkeypatch.setattr(reg, "icp", icp)
    monkeypatch.setattr(o3d.pipelines.registration, "registration_ransac_based_on_feature_matching", counted)
    got = reg.register(scan, target)
    assert reg.GOOD_FITNESS > 0.93 and ransac_runs
    assert got.fitness > 0.97


def test_reference_cost_bench_with_embeddings(tmp_path_factory):
    """`btp-bench reference --embeddings`: a 4-scan reference with the model's embeddings is built and
    timed against the plain pipeline on a turned scan; its stages include the second engine pass."""
    from btp.benchmarks.reference import markdown, run_reference_bench

    model = tiny_export(tmp_path_factory, patch_embed=True)[0]
    data = run_reference_bench(model, sizes=(5000,), build_points=5000, repeats=1, embeddings=True, log=lambda m: None)
    assert data["embeddings"] is True and data["build"]["scans"] == 4 and data["build"]["file_mb"] > 0
    row = data["rows"][0]
    assert row["points"] == 5000 and row["registered"] and row["reference_ms"] > row["plain_ms"] > 0
    assert {"register", "reference_maps", "embedding"} <= set(row["reference_stages_ms"])
    assert "patch embeddings" in markdown(data, "test machine", "2026-12-07")


def test_a_good_scan_of_another_part_is_refused_or_left_out(shapes_root):
    """A 'good' scan that does not register to the others stops the build with the file named; with
    leave_out_misfits (btp eval --references train) it is left out and named in the header."""
    from btp.runtime.guided import build_reference

    scans = [turned(real_scan(shapes_root, BUNNY, n=N, seed=90 + i), 90 + i) for i in range(2)]
    scans.append(0.5 * turned(real_scan(shapes_root, PINION, n=N, seed=92), 92))  # smaller: a bunny anchors
    sources = [{"file": f"g{i}.pcd"} for i in range(3)]
    zero = [np.zeros(len(s), np.float32) for s in scans]
    kwargs = dict(name="bunny", model={"sha256": "x", "name": "x"}, sources=sources)
    with pytest.raises(ValueError, match="g2.pcd registers to the others with fitness"):
        build_reference(scans, zero, **kwargs)
    ref = build_reference(scans, zero, leave_out_misfits=True, **kwargs)
    assert [d["file"] for d in ref.header["left_out"]] == ["g2.pcd"]
    assert [s["file"] for s in ref.header["sources"]] == ["g0.pcd", "g1.pcd"]
    assert len(ref.header["threshold"]["leave_one_out_scores"]) == 2
