"""`btp eval` end to end on tiny synthetic data sets (both layouts), baselines, scoring plumbing."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from btp.config import PreprocessConfig, btp_mini_config
from btp.eval import evaluate as evaluate_mod
from btp.eval.baselines import (
    BaselineError,
    LearnedBaseline,
    feature_names,
    fit_learned_baseline,
    local_features,
    object_score_from_points,
    surface_variation_scores,
)
from btp.eval.evaluate import evaluate
from btp.metrics import METRIC_KEYS
from btp.eval.scoring import CloudScores
from btp.geometry.prepare import prepare
from btp.io import iter_samples
from btp.train.synth import SynthConfig, SynthPlan, write_dataset

CLASSES = ["hex_nut", "spot"]


@pytest.fixture(scope="module")
def datasets(shapes_root, tmp_path_factory):
    """The same tiny synthetic set in both public layouts (1024-point scans)."""
    out = {}
    for layout in ("anomaly-shapenet", "real3d"):
        root = tmp_path_factory.mktemp(layout)
        write_dataset(shapes_root, root, CLASSES,
                      SynthPlan(per_class_train=0, per_class_test_good=2, per_class_test_bad=3, seed=1, layout=layout),
                      SynthConfig(num_points=1024))
        out[layout] = root
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from btp.config import tiny_config
    from btp.model import BTPModel, save_checkpoint

    torch.manual_seed(0)
    model = BTPModel.with_default_text_encoder(tiny_config())
    model.freeze_text(drop_encoder=True)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", model, {"test": "random tiny"})


def _check_section(section, classes):
    assert sorted(section["classes"]) == sorted(classes)
    for metrics in [*section["classes"].values(), section["mean"]]:
        for key in (*METRIC_KEYS, "p_auroc_sampled"):
            assert metrics[key] is not None and 0.0 <= metrics[key] <= 1.0, (key, metrics)


@pytest.mark.parametrize("layout", ["anomaly-shapenet", "real3d"])
def test_cli_eval_with_a_tiny_checkpoint_writes_the_json_contract(datasets, tiny_checkpoint, tmp_path, layout):
    from btp.cli import app

    out = tmp_path / "report.json"
    args = ["eval", "--data", str(datasets[layout]), "--model", str(tiny_checkpoint), "--json", str(out)]
    if layout == "real3d":
        args += ["--layout", "real3d"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert list(report) == ["classes", "mean", "baseline", "learned_baseline", "model", "data"]
    _check_section(report, CLASSES)
    _check_section(report["baseline"], CLASSES)
    assert report["learned_baseline"] == {} or "classes" in report["learned_baseline"]
    assert report["model"]["kind"] == "checkpoint" and report["model"]["name"] == "btp-tiny"
    assert report["data"]["layout"] == layout and report["data"]["num_points"] == 512
    assert report["data"]["samples"]["spot"] == {"good": 2, "bad": 3, "points": 5 * 1024}
    assert {"model", "baseline"} <= set(report["data"]["ms_per_scan"])
    assert "mean" in result.output and "o_auroc" in result.output


def test_oracle_scores_give_perfect_metrics_in_gt_row_order(datasets):
    """A scorer that knows the labels: every metric must be 1 - checks the raw/GT order plumbing."""
    root = datasets["real3d"]
    truth = {s.points.tobytes(): s for s in iter_samples(root)}
    pre = PreprocessConfig(num_points=256)

    class Oracle:
        cfg = None

        def __call__(self, raw):
            s = truth[np.ascontiguousarray(raw, dtype=np.float32).tobytes()]
            idx = prepare(raw, replace(btp_mini_config(), preprocess=pre), group=False).sample_idx
            scores = s.labels.astype(np.float32)
            return CloudScores(object_score=float(s.object_label), point_scores=scores, sampled_idx=idx,
                               sampled_scores=scores[idx])

        def info(self):
            return {"name": "oracle"}

    report = evaluate(root, scorer=Oracle(), preprocess=pre)
    for key in (*METRIC_KEYS, "p_auroc_sampled"):
        assert report["mean"][key] == pytest.approx(1.0), key
    assert report["model"] == {"name": "oracle"}


def test_missing_default_model_is_a_clear_error(datasets, tmp_path, monkeypatch):
    from btp.cli import app

    monkeypatch.setattr(evaluate_mod, "DEFAULT_MODEL", tmp_path / "models" / "btp-mini.safetensors")
    result = CliRunner().invoke(app, ["eval", "--data", str(datasets["anomaly-shapenet"])])
    assert result.exit_code == 2
    assert "btp-mini.safetensors" in result.output and "--model" in result.output


def test_surface_variation_is_high_on_a_crease_and_zero_on_a_plane():
    g = np.linspace(-1, 1, 30)
    x, y = np.meshgrid(g, g)
    plane = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], axis=1)
    roof = plane.copy()
    roof[:, 2] = -np.abs(roof[:, 0])  # a crease along x = 0
    sv_plane = surface_variation_scores(plane)
    sv_roof = surface_variation_scores(roof)
    assert sv_plane.max() < 1e-6
    crease = np.abs(roof[:, 0]) < 0.05
    assert sv_roof[crease].min() > 10 * max(sv_roof[np.abs(roof[:, 0]) > 0.5].max(), 1e-9)
    assert object_score_from_points(np.arange(200.0)) == pytest.approx(198.5)  # top 1 % = 2 points


def test_learned_baseline_fits_saves_as_text_and_reloads(datasets, tmp_path):
    samples = list(iter_samples(datasets["anomaly-shapenet"]))
    model = fit_learned_baseline(samples, num_points=512, num_rounds=30, seed=0)
    feats = local_features(prepare(samples[-1].points, replace(btp_mini_config(), preprocess=PreprocessConfig(num_points=512)), group=False).points)
    assert feats.shape == (512, len(feature_names())) and np.isfinite(feats).all()
    twin = fit_learned_baseline(samples, num_points=512, num_rounds=30, seed=0)
    assert twin.booster.model_to_string() == model.booster.model_to_string()  # deterministic by seed
    path = model.save(tmp_path / "learned.txt")
    assert path.read_text().startswith("tree")  # LightGBM's text format, not pickle
    again = LearnedBaseline.load(path)
    np.testing.assert_allclose(again.booster.predict(feats), model.booster.predict(feats), rtol=1e-6)
    # it learned something on its training samples: anomalous points score above normal ones
    report = evaluate(datasets["anomaly-shapenet"], learned=again, preprocess=PreprocessConfig(num_points=512))
    assert report["learned_baseline"]["mean"]["p_auroc_sampled"] > 0.75
    # a model made with other features is refused with the fix in the message
    bad = tmp_path / "other.txt"
    bad.write_text(path.read_text().replace("surface_variation_k8 ", "something_else ", 1))
    with pytest.raises(BaselineError, match="refit"):
        LearnedBaseline.load(bad)
    with pytest.raises(BaselineError, match="not found"):
        LearnedBaseline.load(tmp_path / "nope.txt")


def test_cli_baselines_only_fits_and_reports_learned_baseline(datasets, tmp_path):
    from btp.cli import app

    model_file = tmp_path / "lb.txt"
    out = tmp_path / "r.json"
    result = CliRunner().invoke(app, ["eval", "--data", str(datasets["real3d"]), "--no-model", "--classes", "spot",
                                      "--fit-baseline", str(datasets["anomaly-shapenet"]),
                                      "--baseline-model", str(model_file), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "not zero-shot" in result.output  # fitted on the evaluated class
    assert re.search(r"\[eval\] scans (\d+)/\1 \(\d+ s, ETA 0\.0 min\)", result.output)  # progress in a log
    report = json.loads(out.read_text())
    assert report["classes"] == {} and report["model"] is None
    _check_section(report["learned_baseline"], ["spot"])
    assert model_file.is_file()


def test_degenerate_class_reports_null_with_reason(shapes_root, tmp_path):
    write_dataset(shapes_root, tmp_path, ["spot"], SynthPlan(per_class_train=0, per_class_test_good=2,
                                                             per_class_test_bad=0, seed=0), SynthConfig(num_points=512))
    report = evaluate(tmp_path, preprocess=PreprocessConfig(num_points=256))
    spot = report["baseline"]["classes"]["spot"]
    assert spot["o_auroc"] is None and spot["au_pro"] is None
    assert "only normal" in report["data"]["notes"]["baseline"]["spot"]["o_auroc"]


def test_summarize_runs_gives_mean_and_std_over_seeds():
    from btp.eval.evaluate import summarize_runs

    runs = [{"mean": {"o_auroc": 0.6, "p_auroc": None}, "baseline": {"mean": {"o_auroc": 0.5}}, "learned_baseline": {}},
            {"mean": {"o_auroc": 0.8, "p_auroc": 0.7}, "baseline": {"mean": {"o_auroc": 0.5}}, "learned_baseline": {}}]
    summary = summarize_runs(runs)
    assert summary["model"]["o_auroc"] == pytest.approx({"mean": 0.7, "std": 0.1, "n": 2})
    assert summary["model"]["p_auroc"] == {"mean": 0.7, "std": 0.0, "n": 1}
    assert summary["baseline"]["o_auroc"]["std"] == 0.0 and "learned_baseline" not in summary


def test_onnx_model_through_the_runtime_matches_the_torch_checkpoint(datasets, tiny_checkpoint, tmp_path):
    """`--model model.onnx` (btp.runtime.Pipeline) and `--model CKPT` (score_cloud_torch) see the same
    points and give the same metrics: the eval's torch path preprocesses like the runtime."""
    pytest.importorskip("onnxruntime")
    from btp.eval.evaluate import load_scorer
    from btp.export.onnx import export_onnx, load_model

    onnx_path = export_onnx(load_model(tiny_checkpoint), tmp_path / "tiny.onnx", simplify=False, parity_scans=1).path
    root = datasets["anomaly-shapenet"]
    torch_scorer, onnx_scorer = load_scorer(tiny_checkpoint), load_scorer(onnx_path)
    sample = next(iter_samples(root))
    a, b = torch_scorer(sample.points), onnx_scorer(sample.points)
    np.testing.assert_array_equal(a.sampled_idx, b.sampled_idx)
    np.testing.assert_allclose(a.point_scores, b.point_scores, atol=1e-5)
    assert a.object_score == pytest.approx(b.object_score, abs=1e-5)
    r_torch = evaluate(root, scorer=torch_scorer, classes=["spot"])
    r_onnx = evaluate(root, scorer=onnx_scorer, classes=["spot"])
    assert r_onnx["model"]["kind"] == "onnx"
    for key, value in r_torch["mean"].items():
        assert r_onnx["mean"][key] == pytest.approx(value, abs=1e-4), key


def test_synth_metrics_baselines_and_baseline_eval_do_not_import_torch(datasets):
    """Synthetic data, metrics and a baseline-only eval never import torch (the edge side has none).

    (Checked by "not in sys.modules" rather than blocking the import: scipy/sklearn probe a
    torch entry in sys.modules, so a None placeholder breaks them, not us.)"""
    import subprocess
    import sys

    code = ("import sys\n"
            "import btp.train.synth, btp.metrics, btp.eval.baselines\n"
            "from btp.config import PreprocessConfig\n"
            "from btp.eval.evaluate import evaluate\n"
            f"r = evaluate({str(datasets['real3d'])!r}, classes=['spot'], preprocess=PreprocessConfig(num_points=256))\n"
            "assert r['baseline']['mean']['p_auroc'] is not None\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_downsample_rule_reaches_both_scorers_and_the_rules_report(shapes_root, tiny_checkpoint, tmp_path):
    """Scans of more than N points: `--downsample` reaches the torch and the ONNX scorer alike (auto =
    the voxel rule with its gather, the same on both paths; exact = the reference rules), and
    `btp-bench rules` reports both rules' metrics and their difference."""
    pytest.importorskip("onnxruntime")
    from btp.benchmarks.rules import rules_markdown, run_rules
    from btp.eval.evaluate import load_scorer
    from btp.export.onnx import export_onnx, load_model

    root = tmp_path / "big"
    plan = SynthPlan(per_class_train=0, per_class_test_good=1, per_class_test_bad=2, seed=3)
    write_dataset(shapes_root, root, ["hex_nut"], plan, SynthConfig(num_points=20000))
    onnx_path = export_onnx(load_model(tiny_checkpoint), tmp_path / "tiny.onnx", simplify=False, parity_scans=1).path
    sample = next(iter_samples(root))
    fast = {kind: load_scorer(path, downsample="auto")(sample.points)
            for kind, path in (("torch", tiny_checkpoint), ("onnx", onnx_path))}
    exact = load_scorer(onnx_path, downsample="exact")(sample.points)
    np.testing.assert_array_equal(fast["torch"].sampled_idx, fast["onnx"].sampled_idx)
    np.testing.assert_allclose(fast["torch"].point_scores, fast["onnx"].point_scores, atol=1e-5)
    assert not np.array_equal(fast["onnx"].sampled_idx, exact.sampled_idx)  # another rule, other samples
    data = run_rules(onnx_path, [root])
    (one,) = data["sets"]
    assert set(one["rules"]) == {"exact", "auto"} and one["rules"]["auto"]["scans"] == 3
    for metric, delta in one["delta_points"].items():
        means = {rule: one["rules"][rule]["mean"][metric] for rule in ("auto", "exact")}
        assert delta == pytest.approx(100 * (means["auto"] - means["exact"]))
    assert isinstance(one["met"], bool) and "auto - exact" in rules_markdown(data)
    scorer = load_scorer(onnx_path, downsample="exact")
    scorer.cfg.preprocess.fps_start = 1  # what the noise-floor rule "exact-start1" runs
    assert not np.array_equal(scorer(sample.points).sampled_idx, exact.sampled_idx)
    floor = run_rules(onnx_path, [root], rules=("exact", "exact-start1"))["sets"][0]
    assert floor["rules"]["exact"]["mean"] == one["rules"]["exact"]["mean"]  # the exact rule is unchanged
    multi = run_rules(onnx_path, [root], starts=(0, 1))
    (two,) = multi["sets"]
    per = two["rules"]["exact"]["per_start"]
    assert per["0"] == one["rules"]["exact"]["mean"]  # start 0 is the model's own fps_start
    assert per["1"] == floor["rules"]["exact-start1"]["mean"]  # start 1 is the noise-floor rule's sample
    for metric, values in two["delta_per_start_points"].items():
        assert two["delta_points"][metric] == pytest.approx(np.mean(values))
        assert two["delta_se_points"][metric] == pytest.approx(np.std(values, ddof=1) / np.sqrt(2))
    assert "±" in rules_markdown(multi) and "FPS start in [0, 1]" in rules_markdown(multi)
    default = PreprocessConfig.voxel_reps  # the tiny model's config holds the dataclass default
    reps = run_rules(onnx_path, [root], voxel_reps=(default, default + 3))
    (three,) = reps["sets"]
    assert reps["rules"] == ["exact", f"auto@{default}", f"auto@{default + 3}"]
    assert three["rules"]["exact"]["mean"] == one["rules"]["exact"]["mean"]  # one reference run for both
    assert three["rules"][f"auto@{default}"]["mean"] == one["rules"]["auto"]["mean"]  # the model's own setting
    assert set(three["deltas"]) == {f"auto@{default}", f"auto@{default + 3}"}
    assert three["delta_points"] == three["deltas"][f"auto@{default + 3}"]["points"]
    assert set(three["met_by_rule"]) == set(three["deltas"]) and three["met"] == three["met_by_rule"][f"auto@{default + 3}"]
    text = rules_markdown(reps)
    assert f"auto@{default} - exact" in text and f"auto@{default + 3} - exact" in text


def test_models_comparison_pairs_the_samples(shapes_root, tiny_checkpoint, tmp_path):
    """`btp-bench models A B`: both models score the same samples at each FPS start. The same
    model as checkpoint and as ONNX differs by ~0; another model's difference is the paired mean
    of per-start differences of what `btp eval` gives each model alone."""
    pytest.importorskip("onnxruntime")
    from btp.benchmarks.rules import models_markdown, run_models
    from btp.eval.evaluate import evaluate, load_scorer
    from btp.export.onnx import export_onnx, fresh_model, load_model

    root = tmp_path / "set"
    plan = SynthPlan(per_class_train=0, per_class_test_good=2, per_class_test_bad=2, seed=4)
    write_dataset(shapes_root, root, ["hex_nut"], plan, SynthConfig(num_points=3000))
    same = export_onnx(load_model(tiny_checkpoint), tmp_path / "tiny.onnx", simplify=False, parity_scans=1).path
    other = export_onnx(fresh_model(load_model(tiny_checkpoint).model.cfg, seed=7), tmp_path / "other" / "tiny.onnx",
                        simplify=False, parity_scans=1).path
    twin = run_models([tiny_checkpoint, same], [root], starts=(0, 1))
    assert max(abs(v) for v in twin["sets"][0]["delta_points"].values()) < 1e-2
    pair = run_models([same, other], [root], starts=(0, 1))
    assert len(set(pair["models"])) == 2  # same file name: told apart by folder
    (entry,) = pair["sets"]
    for start in (0, 1):
        for label, path in zip(pair["models"], (same, other)):
            scorer = load_scorer(path)
            scorer.cfg.preprocess.fps_start = start
            alone = evaluate(root, scorer=scorer, baselines=False)["mean"]
            assert entry["models"][label]["per_start"][str(start)]["o_auroc"] == alone["o_auroc"]
    per = entry["delta_per_start_points"]["p_auroc"]
    assert entry["delta_points"]["p_auroc"] == pytest.approx(np.mean(per)) and max(map(abs, per)) > 0
    text = models_markdown(pair)
    assert f"**{pair['models'][1]} - {pair['models'][0]}**" in text and "±" in text
