"""btp.train: BTP-stage loop (loss goes down, resume is exact), LR schedule, DDP env, split, pretrain.

Real data: synthetic defects (btp.train.synth) on real meshes of the training split, tiny config.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from btp.config import TrainConfig, tiny_config  # noqa: E402
from btp.train import data as tdata  # noqa: E402
from btp.train.ddp import DistEnv, dist_env  # noqa: E402
from btp.train.loop import BTPOptions, build_model, train_btp  # noqa: E402
from btp.train.schedule import lr_at, make_optimizer, warmup_steps  # noqa: E402
from btp.train.split import HELDOUT_KINDS, zero_shot_split  # noqa: E402


@pytest.fixture(scope="module")
def split(shapes_root):
    return zero_shot_split(shapes_root)


@pytest.fixture(scope="module")
def tiny_arrays(split, tmp_path_factory):
    """8 synthetic samples (4 anomalous) on 2 real training meshes, preprocessed for the tiny config."""
    cfg = tiny_config()
    cache = tmp_path_factory.mktemp("cache")
    return tdata.btp_samples(split.train[:2], cfg, per_shape=4, seed=0, cache_dir=cache, synth_points=2048)


# ---- split -------------------------------------------------------------------------------

def test_split_holds_out_whole_kinds_and_is_disjoint(split):
    train_names, held_names = set(split.names("train")), set(split.names("heldout"))
    assert not train_names & held_names
    assert len(train_names) + len(held_names) == 85
    assert all(s.kind not in HELDOUT_KINDS for s in split.train)
    for kind in HELDOUT_KINDS:
        assert any(s.kind == kind for s in split.heldout)
    # a share of every other kind is held out too, and most shapes still train
    assert {s.kind for s in split.heldout} >= {"organic", "mechanical", "other"}
    assert 50 <= len(train_names) <= 65


# ---- data --------------------------------------------------------------------------------

def test_btp_samples_take_synth_overrides(split, tmp_path):
    """Recipe-level data ablations (scan realism, defect variety) reach the generator and the cache key."""
    cfg = tiny_config()

    def make(**over):
        return tdata.btp_samples(split.train[:1], cfg, per_shape=2, seed=0, cache_dir=tmp_path,
                                 synth_points=2048, synth_overrides=over or None)

    base, clean = make(), make(noise=0.0, pose_deg=0.0, pose_shift=0.0)
    dents, bulges = make(defect_types=("dent",)), make(defect_types=("bulge",))
    assert len(list(tmp_path.glob("btp-*.npz"))) == 4  # one cache file per variant
    assert not np.array_equal(base["points"][1], clean["points"][1])  # the normal sample: noise + pose
    assert not np.array_equal(dents["labels"][0], bulges["labels"][0])  # the anomalous one: another defect
    again = make(noise=0.0, pose_deg=0.0, pose_shift=0.0)
    np.testing.assert_array_equal(again["points"], clean["points"])


def test_btp_samples_match_runtime_preprocessing(tiny_arrays):
    cfg = tiny_config()
    n, g, k = cfg.preprocess.num_points, cfg.encoder.num_group, cfg.encoder.group_size
    a = tiny_arrays
    assert a["points"].shape == (8, n, 3) and a["patch_idx"].shape == (8, g, k) and a["fpfh"].shape == (8, g, 33)
    assert a["object_label"].tolist() == [1, 1, 0, 0] * 2
    # anomalous clouds keep labelled points after FPS; normal ones have none
    frac = a["labels"].mean(axis=1)
    assert (frac[a["object_label"] == 1] > 0).all() and (frac[a["object_label"] == 0] == 0).all()
    # unit-sphere normalised, centers are points of the cloud
    assert np.abs(np.linalg.norm(a["points"], axis=2).max(axis=1) - 1).max() < 1e-4
    item = tdata.BTPArrays(a, cfg)[0]
    assert item["neighborhood"].shape == (g, k, 6)
    np.testing.assert_allclose(item["neighborhood"][..., 3:], cfg.preprocess.rgb_fill)
    np.testing.assert_allclose(item["neighborhood"][:, 0, :3], 0, atol=1e-6)  # each center is its own 1st neighbour


# ---- schedule ----------------------------------------------------------------------------

def test_lr_schedule_warmup_peak_end():
    cfg = TrainConfig()
    total, base = 200, cfg.lr
    warm = warmup_steps(total, cfg.warmup_frac)
    assert warm == 20
    assert lr_at(0, total, base, cfg) == pytest.approx(0.1 * base)
    assert lr_at(warm // 2, total, base, cfg) == pytest.approx(base * (0.1 + 0.9 * 0.5))
    assert lr_at(warm, total, base, cfg) == pytest.approx(base)
    assert lr_at(total - 1, total, base, cfg) == pytest.approx(cfg.min_lr)
    mid = warm + (total - 1 - warm) / 2
    assert lr_at(int(mid), total, base, cfg) == pytest.approx(cfg.min_lr + 0.5 * (base - cfg.min_lr), rel=0.05)
    values = [lr_at(s, total, base, cfg) for s in range(total)]
    assert np.all(np.diff(values[:warm + 1]) > 0) and np.all(np.diff(values[warm:]) < 0)


def test_param_groups_prompt_lr_and_decay_only_on_weights():
    cfg = tiny_config()
    model = build_model(cfg, None, BTPOptions())
    opt = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg.train)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["prompt"]["lr"] == cfg.train.lr_prompt and groups["prompt"]["weight_decay"] == 0
    assert any(p is model.prompt_ctx for p in groups["prompt"]["params"])
    assert groups["decay"]["weight_decay"] == cfg.train.weight_decay
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim < 2 for p in groups["no_decay"]["params"]) and groups["no_decay"]["weight_decay"] == 0
    assert opt.defaults["betas"] == (0.9, 0.999)
    # the point encoder and text encoder are frozen: none of their parameters is optimised
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in optimised for p in model.point_encoder.parameters())


# ---- DDP env -----------------------------------------------------------------------------

def test_dist_env_detection():
    assert dist_env({}) == DistEnv(1, 0, 0) and not dist_env({}).enabled
    env = dist_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert env.enabled and env.rank == 2 and env.local_rank == 0 and not env.is_main
    assert dist_env({"WORLD_SIZE": "1", "RANK": "0"}).is_main
    with pytest.raises(ValueError):
        dist_env({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError):
        dist_env({"WORLD_SIZE": "two"})


# ---- the loop ----------------------------------------------------------------------------

def test_short_training_run_lowers_the_loss(tiny_arrays, tmp_path):
    cfg = tiny_config()
    cfg.train.lr, cfg.train.lr_prompt = 3e-3, 3e-3
    cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = 20, 2, 0
    summary = train_btp(cfg, tiny_arrays, tmp_path, BTPOptions(ckpt_every=0),
                        progress=False, log=lambda *_: None)
    losses = np.array([v for _, v in summary["losses"]])
    assert len(losses) == 80 and np.isfinite(losses).all()
    assert losses[-8:].mean() < 0.85 * losses[:4].mean()
    # the written model loads and carries frozen text embeddings
    from btp.model import load_checkpoint

    model, prov = load_checkpoint(summary["checkpoint"], text_encoder=None)
    assert model.frozen_text.shape == (2, cfg.text.embed_dim)
    assert prov["stage"] == "btp" and prov["btp_steps"] == 80
    # the point threshold is the F1-max one on the training samples, stored in the model's config
    threshold = summary["point_threshold"]
    assert model.cfg.scoring.point_threshold == pytest.approx(threshold)
    assert prov["point_threshold"]["point_threshold"] == pytest.approx(threshold)
    from btp.metrics import f1_max_threshold
    from btp.model.scoring import point_logits_from_patches
    from btp.train.loop import _collate

    model.eval()
    dataset = tdata.BTPArrays(tiny_arrays, cfg)
    batch = _collate([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        probs = model(batch["neighborhood"], batch["center"])["patch_probs"]
    scores = point_logits_from_patches(probs, batch["patch_idx"], batch["point_labels"].shape[1],
                                       points=batch["points"], center=batch["center"],
                                       uncovered=cfg.scoring.uncovered_points).numpy().ravel()
    f1, expect = f1_max_threshold(batch["point_labels"].numpy().ravel(), scores)
    assert threshold == pytest.approx(expect, abs=1e-4) and summary["point_f1_at_threshold"] == pytest.approx(f1, abs=1e-3)


@pytest.mark.parametrize("uncovered", ["nearest_center", "zero"])
def test_training_scores_points_by_the_runtime_rule(tiny_arrays, uncovered):
    """The scores the point threshold is calibrated on (``sample_scores``) follow the model's
    ``scoring.uncovered_points`` as the runtime's numpy propagation does (btp-3dad: "zero")."""
    from btp.geometry import propagate_patch_scores
    from btp.train.loop import _collate, sample_scores

    cfg = tiny_config()
    cfg.scoring.uncovered_points = uncovered
    torch.manual_seed(0)
    model = build_model(cfg, None, BTPOptions())
    dataset = tdata.BTPArrays(tiny_arrays, cfg)
    got = sample_scores(model, dataset)["point_scores"]
    batch = _collate([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        probs = model(batch["neighborhood"], batch["center"])["patch_probs"].numpy()
    uncovered_points = 0
    for i in range(len(dataset)):
        pidx = batch["patch_idx"][i].numpy()
        ref = propagate_patch_scores(probs[i], pidx, batch["center"][i].numpy(), batch["points"][i].numpy(), uncovered)
        np.testing.assert_allclose(got[i], ref, atol=1e-5)
        uncovered_points += len(ref) - len(np.unique(pidx))
    assert uncovered_points > 0, "the tiny samples must leave points in no patch for this test to bite"


def test_cached_encoder_features_match_the_model_forward(tiny_arrays):
    from btp.train.loop import _collate, precompute_features

    cfg = tiny_config()
    model = build_model(cfg, None, BTPOptions())
    model.eval()
    dataset = tdata.BTPArrays(tiny_arrays, cfg)
    idx = [5, 2, 7]
    batch = _collate([dataset[i] for i in idx])
    with torch.no_grad():
        real = model(batch["neighborhood"], batch["center"])
        cached = precompute_features(model.point_encoder, dataset, batch_size=3, log=lambda *_: None)
        model.point_encoder = cached
        cached.select(idx)
        fast = model(batch["neighborhood"], batch["center"])
    for key in ("patch_logits", "global_logit", "object_score"):
        torch.testing.assert_close(fast[key], real[key], rtol=2e-2, atol=2e-2, msg=key)
    with pytest.raises(RuntimeError):
        cached.select([0])
        model(batch["neighborhood"], batch["center"])


@pytest.mark.parametrize("point_dim", [0, 8])  # 8: the per-point head's weights are in the state too
def test_resume_continues_from_the_saved_step(tiny_arrays, tmp_path, monkeypatch, point_dim):
    cfg = tiny_config()
    cfg.gfcm.point_dim = point_dim
    cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = 2, 2, 1  # 8 steps
    opts = BTPOptions(ckpt_every=3)  # checkpoints at 3 and 6
    full = train_btp(cfg, tiny_arrays, tmp_path / "full", opts, progress=False, log=lambda *_: None)

    import btp.model

    real_loss, calls = btp.model.btp_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:  # dies in step 6, after the checkpoint of step 3
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(btp.model, "btp_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_btp(cfg, tiny_arrays, tmp_path / "cut", opts, progress=False, log=lambda *_: None)
    monkeypatch.setattr(btp.model, "btp_loss", real_loss)
    from btp.train.checkpointing import read_step

    assert read_step(tmp_path / "cut" / "train_state.safetensors") == 3
    resumed = train_btp(cfg, tiny_arrays, tmp_path / "cut", opts, resume=True, progress=False, log=lambda *_: None)
    assert resumed["resumed_from"] == 3
    assert [s for s, _ in resumed["losses"]] == [4, 5, 6, 7, 8]
    np.testing.assert_allclose([v for _, v in resumed["losses"]], [v for _, v in full["losses"][3:]], rtol=1e-4)


def test_a_non_finite_loss_stops_training_with_the_step_and_the_last_checkpoint(tiny_arrays, tmp_path, monkeypatch):
    import btp.model
    from btp.train.checkpointing import read_step
    from btp.train.loop import TrainingDivergedError

    real_loss, calls = btp.model.btp_loss, {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        loss, parts = real_loss(*args, **kwargs)
        return (loss * float("nan"), parts) if calls["n"] == 5 else (loss, parts)

    monkeypatch.setattr(btp.model, "btp_loss", diverging)
    cfg = tiny_config()
    cfg.train.epochs, cfg.train.batch_size, cfg.train.seed = 2, 2, 1
    with pytest.raises(TrainingDivergedError, match=r"not finite at step 5 .*samples \[.*train_state\.safetensors"):
        train_btp(cfg, tiny_arrays, tmp_path / "nan", BTPOptions(ckpt_every=3), progress=False, log=lambda *_: None)
    assert read_step(tmp_path / "nan" / "train_state.safetensors") == 3  # the good checkpoint is kept


def test_pretrain_writes_loadable_encoder_and_lowers_mpm(split, tmp_path):
    from btp.model.pointbert import PointBERT
    from btp.train.pretrain import PretrainOptions, load_encoder_weights, pretrain

    cfg = tiny_config()
    path = pretrain(cfg, split.train[:3], tmp_path / "pretrain",
                    PretrainOptions(steps=30, batch_size=4, pool_points=1024, ckpt_every=0, lr=3e-3),
                    progress=False, log=lambda *_: None)
    enc = PointBERT(cfg.encoder, cfg.text.embed_dim)
    meta = load_encoder_weights(enc, path)
    import json

    losses = [mpm for _, mpm, _ in json.loads(meta["last_losses"])]
    assert meta["stage"] == "pretrain" and len(losses) == 20 and all(math.isfinite(v) for v in losses)


def test_tiny_recipe_is_deterministic_by_seed(shapes_root, tmp_path, capsys):
    from safetensors.torch import load_file

    from btp.train.recipes import get_recipe, run_recipe

    quiet = dict(progress=False, shapes_limit=2, log=lambda *_: None)
    a = run_recipe(get_recipe("tiny"), shapes_root, tmp_path / "a", seed=3, **quiet)
    # every stage logs progress with an ETA, the sample making too (minutes on the corpus)
    logged = capsys.readouterr().err
    for stage in ("[pretrain] step", "[data] step", "[btp] step"):
        assert stage in logged and "ETA" in logged.split(stage, 1)[1].splitlines()[0], stage
    b = run_recipe(get_recipe("tiny"), shapes_root, tmp_path / "b", seed=3, **quiet)
    c = run_recipe(get_recipe("tiny"), shapes_root, tmp_path / "c", seed=4, **quiet)
    ta, tb, tc = (load_file(r["checkpoint"]) for r in (a, b, c))
    assert set(ta) == set(tb) and "frozen_text" in ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(ta["mgfem.fuse.0.weight"], tc["mgfem.fuse.0.weight"])
    assert set(a["heldout_shapes"]).isdisjoint(a["train_shapes"])


def test_btp_stage_from_a_converted_ulip2_checkpoint(tiny_arrays, tmp_path):
    """`btp train --stage btp --from`: the BTP heads train on top of a converted ULIP-2 encoder and
    OpenCLIP tower (tiny fakes with the official key names); the encoder stays as converted."""
    from btp.model.checkpoint import load_checkpoint, save_checkpoint
    from btp.model.convert import conversion_provenance, convert_ulip2
    from test_convert import VISUAL, openclip_text_state, save_ulip, tiny_point_state

    torch.manual_seed(0)
    point, proj = tiny_point_state()
    ulip = save_ulip(tmp_path / "ulip2.pt", point, proj)
    clip = tmp_path / "open_clip_pytorch_model.bin"
    torch.save({**openclip_text_state(), **VISUAL}, clip)
    converted, report = convert_ulip2(ulip, clip, base_config="tiny")
    start = save_checkpoint(tmp_path / "converted.safetensors", converted,
                            conversion_provenance(ulip, clip, report, 0))
    converted.cfg.train.epochs, converted.cfg.train.batch_size = 12, 2
    summary = train_btp(converted.cfg, tiny_arrays, tmp_path / "btp", BTPOptions(ckpt_every=0),
                        init_from=start, progress=False, log=lambda *_: None)
    losses = np.array([v for _, v in summary["losses"]])
    assert np.isfinite(losses).all() and losses[-8:].mean() < losses[:4].mean()
    trained, prov = load_checkpoint(summary["checkpoint"])
    assert prov["stage"] == "btp" and trained.is_text_frozen and trained.text_encoder is None
    for k, v in converted.point_encoder.state_dict().items():
        torch.testing.assert_close(trained.point_encoder.state_dict()[k], v, atol=0, rtol=0)
    assert (trained.prompt_ctx - converted.prompt_ctx).abs().max() > 0  # learned through the OpenCLIP tower
    assert (trained.mgfem.fuse[2].weight - converted.mgfem.fuse[2].weight).abs().max() > 0


def test_btp_stage_cli_from_a_checkpoint_with_frozen_text(shapes_root, tmp_path):
    """A checkpoint whose text is frozen and holds no tower (what `btp convert btp-3dad` writes):
    the heads train against the frozen embeddings, which stay as they are."""
    from typer.testing import CliRunner

    from btp.cli import app
    from btp.model import BTPModel
    from btp.model.checkpoint import load_checkpoint, save_checkpoint
    from btp.model.text import build_text_encoder

    cfg = tiny_config()
    torch.manual_seed(1)
    model = BTPModel(cfg, build_text_encoder(cfg.text))
    model.freeze_text(drop_encoder=True)
    start = save_checkpoint(tmp_path / "start.safetensors", model, {"source": "test"})
    res = CliRunner().invoke(app, ["train", "--stage", "btp", "--from", str(start), "--shapes", str(shapes_root),
                                   "--out", str(tmp_path / "run"), "--per-shape", "1", "--max-steps", "3",
                                   "--batch-size", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    trained, _ = load_checkpoint(tmp_path / "run" / f"{cfg.name}.safetensors")
    torch.testing.assert_close(trained.frozen_text, model.frozen_text, atol=0, rtol=0)
    assert (trained.gfcm.head[0].weight - model.gfcm.head[0].weight).abs().max() > 0


@pytest.mark.parametrize("args, point_dim, name", [
    (["--recipe", "btp-corpus-point"], 32, "btp-corpus-point"),  # the recipe's own config
    (["--recipe", "btp-corpus"], 0, "btp-corpus"),
    (["--recipe", "btp-corpus-geo"], 32, "btp-corpus-geo"),
    (["--recipe", "btp-corpus-point", "--config", "btp-mini"], 0, "btp-corpus-point"),  # explicit wins
])
def test_train_cli_runs_the_recipe_with_its_own_config(tmp_path, monkeypatch, args, point_dim, name):
    from typer.testing import CliRunner

    import btp.train.recipes as recipes
    from btp.cli import app

    seen = {}
    monkeypatch.setattr(recipes, "run_recipe", lambda rec, shapes, out, **kw: seen.update(rec=rec, cfg=kw["cfg"]))
    res = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert seen["rec"].name == name and seen["cfg"].gfcm.point_dim == point_dim


def test_validation_families_are_held_out_of_the_btp_stage(shapes_root, tmp_path):
    """`btp train --recipe R --validate`: every 5th training family (from the 3rd) is validation,
    never trained on; its samples are scored as the runtime would score them."""
    from btp.train.recipes import get_recipe, run_recipe
    from btp.train.split import Shape
    from btp.train.validate import ValidationError, validation_families

    fams = [Shape(name=f"m{i}", kind="mechanical", path=tmp_path, family=f"kicad:F{i:02d}") for i in range(12)]
    assert validation_families(fams) == ["kicad:F02", "kicad:F07"]
    kinds = [Shape(name="a", kind="organic", path=tmp_path), Shape(name="b", kind="other", path=tmp_path)]
    assert validation_families(kinds) == ["shapes:other"]  # too few for the stride: the last one
    with pytest.raises(ValidationError):
        validation_families(kinds[:1])
    # 5 training meshes of 3 kinds (mechanical, organic, other): "shapes:other" is validation
    result = run_recipe(get_recipe("tiny"), shapes_root, tmp_path / "v", seed=0, progress=False, shapes_limit=5,
                        log=lambda *_: None, validate=True)
    assert result["validation_families"] == ["shapes:other"]
    assert result["val_samples"] == 2 and result["train_samples"] == 8  # blobby's 2 samples; 4 meshes x 2
    assert set(result["per_family"]) == {"shapes:other"}
    assert 0.0 <= result["point_auroc_pooled"] <= 1.0
    assert json.loads((tmp_path / "v" / "validation" / "validation.json").read_text())["steps"] == result["steps"]
    assert not (tmp_path / "v" / "recipe.json").exists()  # no shipped model from a validation run


def test_validation_eval_sets_hold_the_validation_families_only(shapes_root, tmp_path):
    """`btp data eval-sets --split validation`: raw-scan test sets on the meshes a `--validate` run
    never trains on (its validation families), from both makers; no held-out mesh in them."""
    from btp.eval.sets import split_names, write_eval_sets
    from btp.io.datasets import iter_samples
    from btp.train.split import zero_shot_split
    from btp.train.validate import family_of, validation_families

    split = zero_shot_split(shapes_root)
    names = split_names(shapes_root, "validation")
    val = set(validation_families(split.train))
    by_name = {s.name: s for s in split.train}
    assert names and set(names) <= set(by_name) and not set(names) & set(split.names("heldout"))
    assert {family_of(by_name[n]) for n in names} == val
    assert set(split.names("train")) - set(names)  # the rest still trains
    manifest = write_eval_sets(shapes_root, tmp_path, good=1, bad=1, layouts=("anomaly-shapenet",),
                               split="validation", points=512, log=lambda *_: None)
    assert manifest["split"] == "validation" and manifest["classes"] == names
    for maker in ("synth", "mesh"):
        got = list(iter_samples(tmp_path / f"{maker}-anomaly-shapenet", "anomaly-shapenet", split="test"))
        assert {s.cls for s in got} <= set(names) and len({s.cls for s in got}) >= len(names) - 1
        assert any(s.object_label == 1 for s in got) and any(s.object_label == 0 for s in got)
    with pytest.raises(ValueError, match="split"):
        write_eval_sets(shapes_root, tmp_path / "x", split="test")


def test_partial_eval_sets_are_single_view_scans_of_both_makers(shapes_root, tmp_path):
    """`btp data eval-sets --partial`: single-view test scans from both makers, in sets named
    <maker>-<layout>-partial, the defective ones with labelled defect points."""
    from typer.testing import CliRunner

    from btp.cli import app
    from btp.io.datasets import iter_samples

    res = CliRunner().invoke(app, ["data", "eval-sets", "--shapes", str(shapes_root), "--out", str(tmp_path),
                                   "--split", "validation", "--good", "1", "--bad", "1", "--points", "2048",
                                   "--layouts", "real3d", "--partial"])
    assert res.exit_code == 0, res.output
    for maker in ("synth", "mesh"):
        got = list(iter_samples(tmp_path / f"{maker}-real3d-partial", "real3d", split="test"))
        assert got and any(s.object_label == 1 for s in got)
        assert all(s.labels.sum() > 0 for s in got if s.object_label == 1)
    # at most the points asked for; that they lie on one side is pinned by the makers' own tests
    # (tests/test_meshdefects.py, tests/test_synth.py)
    assert all(len(s.points) <= 2048 for s in iter_samples(tmp_path / "mesh-real3d-partial", "real3d", split="test"))
    manifest = json.loads((tmp_path / "sets.json").read_text())
    assert manifest["partial"] is True and set(manifest["sets"]) == {"synth-real3d-partial", "mesh-real3d-partial"}
