"""Named end-to-end recipes: ``btp train --recipe btp-mini --seed S --out DIR``, and the choices
``btp train`` makes for a run (which recipe and config, what its flags change, one stage alone).

A recipe = config + zero-shot split + stage-1 options + BTP-data size + stage-2 run options; the
BTP stage's epochs, batch size, learning rates and the seed are the config's ``train`` section.
Every random choice derives from the one seed, ``cfg.train.seed`` (pre-training batches, masks
and rotations, synthetic samples, data order, initialisation), so the same seed on the same
machine type gives the same model. Layout of ``DIR``: ``cache/`` (surface pool, BTP samples),
``pretrain/encoder.safetensors``, ``btp/<name>.safetensors`` (the model), ``recipe.json``
(options, split, wall times).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from btp.config import (BTPConfig, btp_context_config, btp_geo4k_config, btp_geo_config, btp_mini_config,
                        btp_point_config, preset, tiny_config)
from btp.train.loop import BTPOptions
from btp.train.pretrain import PretrainOptions
from btp.train.synth import ALL_DEFECT_TYPES

STAGES = ("pretrain", "btp")


@dataclass(kw_only=True)
class Recipe:
    name: str
    config: Callable[[], BTPConfig]
    pretrain: PretrainOptions
    btp: BTPOptions
    per_shape: int  # synthetic BTP samples per training mesh (half anomalous)
    notes: str = ""
    use_pretrain: bool = True  # ablation: False = frozen *random* encoder
    rotate: bool = False  # BTP samples in uniformly random poses (see btp.train.data.btp_samples)
    synth: dict = field(default_factory=dict)  # SynthConfig overrides for the BTP samples (ablations)
    # the sampling order the BTP samples are made with, when it is not the config's (the model's own
    # config, saved with it, keeps the config's): "input" makes them as a model trained before
    # preprocess.sampling_order existed had them
    data_sampling_order: str = ""
    extra: dict = field(default_factory=dict)


_BTP_MINI = Recipe(
    # sized for a 2-core CPU (the time of each stage: models/btp-mini.md)
    name="btp-mini", config=btp_mini_config,
    pretrain=PretrainOptions(steps=200, batch_size=4, lr=1e-3, mask_ratio=0.6, align_weight=0.5,
                             pool_points=8192, ckpt_every=50),
    btp=BTPOptions(ckpt_every=100),  # epochs, batch size, learning rates: btp_mini_config().train
    per_shape=20,
)

RECIPES: dict[str, Recipe] = {
    "btp-mini": _BTP_MINI,
    # btp-mini with the BTP samples in random poses (diagnosis of the first run: see the card)
    "btp-mini-rot": replace(_BTP_MINI, name="btp-mini-rot", rotate=True),
    # ablations of the training data (held-out results in models/btp-mini.md): scan realism and
    # defect variety. Same config, pre-training and BTP budget as btp-mini; only the samples differ.
    "btp-mini-clean": replace(_BTP_MINI, name="btp-mini-clean",
                              synth={"noise": 0.0, "pose_deg": 0.0, "pose_shift": 0.0}),
    "btp-mini-2defects": replace(_BTP_MINI, name="btp-mini-2defects", synth={"defect_types": ("bulge", "dent")}),
    # btp-mini's model and budget per sample on the corpus of `btp data corpus` (shared shapes +
    # kicad-packages3d parts; its split holds out whole kicad families): ~5x the training meshes,
    # 12 samples each. Run with --shapes CORPUS_DIR.
    "btp-corpus": replace(_BTP_MINI, name="btp-corpus", per_shape=12),
    # btp-corpus with 15x the encoder pre-training (3000 steps): does a longer-trained encoder carry
    # defect signal that a frozen random one does not (card: "The corpus")?
    "btp-corpus-longpt": replace(_BTP_MINI, name="btp-corpus-longpt", per_shape=12,
                                 pretrain=replace(_BTP_MINI.pretrain, steps=3000, ckpt_every=250)),
    # btp-corpus with per-point scores (gfcm.point_dim = 32, "back to point"): every point of every
    # patch scored from its own GFCM conv feature, chosen on a validation split inside the corpus's
    # training families (card: "Per-point scores").
    "btp-corpus-point": replace(_BTP_MINI, name="btp-corpus-point", per_shape=12, config=btp_point_config),
    # btp-corpus-point with multi-scale in-patch covariance features as GFCM input
    # (gfcm.point_geometry = (0.5, 1.0)): the learned baseline's features inside the BTP model
    "btp-corpus-geo": replace(_BTP_MINI, name="btp-corpus-geo", per_shape=12, config=btp_geo_config),
    # btp-corpus-geo with a wider neighbourhood for part of the geometry: the cores of the 8
    # context patches (gfcm.context_geometry = (2.0,)) in place of the in-patch width 1
    "btp-corpus-context": replace(_BTP_MINI, name="btp-corpus-context", per_shape=12, config=btp_context_config),
    # btp-corpus-geo on N = 4096 sampled points (same G, K: same engine cost, half-size patches)
    # (its samples made in the input order, as the committed weights were; the model scores in the
    # canonical order its config names)
    "btp-corpus-geo-4k": replace(_BTP_MINI, name="btp-corpus-geo-4k", per_shape=12, config=btp_geo4k_config,
                                 data_sampling_order="input"),
    # btp-corpus-geo-4k with 30 % single-view partial scans (hidden-point removal) among its BTP
    # samples, normal and defective alike: the open borders of a partial view are labelled normal
    "btp-corpus-geo-4k-partial": replace(_BTP_MINI, name="btp-corpus-geo-4k-partial", per_shape=12,
                                         config=btp_geo4k_config, synth={"partial_prob": 0.3}),
    # the default's recipe (samples in the input order) with 15 % single-view samples: the partial
    # views' effect apart from the sampling order, at half the share
    "btp-corpus-geo-4k-partial15": replace(_BTP_MINI, name="btp-corpus-geo-4k-partial15", per_shape=12,
                                           config=btp_geo4k_config, synth={"partial_prob": 0.15},
                                           data_sampling_order="input"),
    # the default's recipe (samples in the input order) with three more defect kinds in its training
    # maker, same budget: added material, scratches, chipped edges (btp.train.synth.EXTRA_DEFECT_TYPES)
    "btp-corpus-geo-4k-defects9": replace(_BTP_MINI, name="btp-corpus-geo-4k-defects9", per_shape=12,
                                          config=btp_geo4k_config, data_sampling_order="input",
                                          synth={"defect_types": ALL_DEFECT_TYPES}),
    # the same per-point model on btp-mini's data (shared shapes only): corpus or head?
    "btp-mini-point": replace(_BTP_MINI, name="btp-mini-point", config=btp_point_config),
    # seconds: for tests and smoke runs
    "tiny": Recipe(
        name="tiny", config=tiny_config,
        pretrain=PretrainOptions(steps=6, batch_size=2, pool_points=1024, ckpt_every=3),
        btp=BTPOptions(ckpt_every=2, max_steps=6),
        per_shape=2,
    ),
}



def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}") from None


def choose_recipe(name: str = "", config: str = "") -> Recipe:
    """The recipe a run follows: ``name``; for a single stage (no name) ``tiny`` with the tiny
    config, else ``btp-mini``. ValueError for an unknown name."""
    return get_recipe(name or ("tiny" if config == "tiny" else "btp-mini"))


def choose_config(recipe: Recipe, config: str = "", init_from=None) -> BTPConfig:
    """The config a run starts from: ``init_from``'s (a btp checkpoint, to train further), else
    ``config`` (a preset name or a config JSON file), else the recipe's own (btp-corpus-point's
    has per-point scores, btp-mini's has not). ValueError for an unknown preset or a missing file;
    CheckpointError for a checkpoint that cannot be read."""
    if init_from is not None:
        from btp.model.checkpoint import read_checkpoint

        return read_checkpoint(init_from)[0]
    if not config:
        return recipe.config()
    path = Path(config)
    if path.suffix == ".json":
        if not path.is_file():
            raise ValueError(f"{path}: no such config file; give a config JSON file or a preset name")
        return BTPConfig.from_json(path.read_text()).validate()
    return preset(config)


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """What one run changes in its recipe and config (``btp train`` flags); None keeps the recipe's."""

    steps: int | None = None  # stage 1 iterations
    epochs: int | None = None  # BTP stage: cfg.train.epochs
    batch_size: int | None = None  # both stages: cfg.train.batch_size and stage 1's batch
    max_steps: int | None = None  # BTP stage: cap on iterations
    per_shape: int | None = None  # synthetic BTP samples per training mesh
    ckpt_every: int | None = None  # both stages; 0 = only at the end
    pretrain: bool = True  # False: the BTP stage keeps a frozen random encoder (ablation)
    gfcm: bool = True  # False: GFCM descriptor = 0, no geometric loss (ablation)
    prompt_learning: bool = True  # False: the prompt context keeps its init (ablation)
    feature_layers: tuple[int, ...] | None = None  # MGFEM's encoder blocks (ablation)


def configure(recipe: Recipe, cfg: BTPConfig, seed: int,
              overrides: Overrides = Overrides()) -> tuple[Recipe, BTPConfig]:
    """The recipe and config of one run: ``overrides`` applied (to a copy of ``cfg``) and the seed
    in ``cfg.train.seed``. ValueError when the result is no valid config."""
    o = overrides
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = seed
    if o.epochs:
        cfg.train.epochs = o.epochs
    if o.batch_size:
        cfg.train.batch_size = o.batch_size
    if o.feature_layers:
        cfg.encoder.feature_layers = tuple(o.feature_layers)
    cfg.validate()
    changed = {"steps": o.steps, "batch_size": o.batch_size, "ckpt_every": o.ckpt_every}
    pre = replace(recipe.pretrain, **{k: v for k, v in changed.items() if v is not None})
    changed = {"max_steps": o.max_steps or None, "ckpt_every": o.ckpt_every}
    btp = replace(recipe.btp, use_gfcm=o.gfcm, learn_prompt=o.prompt_learning,
                  **{k: v for k, v in changed.items() if v is not None})
    recipe = replace(recipe, pretrain=pre, btp=btp, per_shape=o.per_shape or recipe.per_shape,
                     use_pretrain=recipe.use_pretrain and o.pretrain)
    return recipe, cfg


def find_encoder(out) -> Path | None:
    """The stage-1 encoder a BTP stage written to ``out`` starts from when none is named: the one
    a pre-training stage beside it wrote (``out/../pretrain/encoder.safetensors``), if there."""
    guess = Path(out).parent / "pretrain" / "encoder.safetensors"
    return guess if guess.is_file() else None


def run_stage(stage: str, recipe: Recipe, cfg: BTPConfig, shapes_root, out, *, resume: bool = False,
              progress: bool = True, encoder=None, init_from=None, log=print,
              warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)):
    """One stage of ``recipe`` on the training split of ``shapes_root``, seed ``cfg.train.seed``:
    ``pretrain`` -> the encoder's path; ``btp`` -> ``train_btp``'s summary, from ``init_from``
    (a btp checkpoint whose config ``cfg`` is) or from ``encoder`` (default: ``find_encoder``;
    none with ``recipe.use_pretrain`` off, and ``warn`` says so when none is found)."""
    from btp.train import data as tdata
    from btp.train.split import zero_shot_split

    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: choose one of {', '.join(STAGES)}")
    seed, out = cfg.train.seed, Path(out)
    train_shapes = list(zero_shot_split(shapes_root).train)
    if stage == "pretrain":
        from btp.train.pretrain import pretrain

        return pretrain(cfg, train_shapes, out, recipe.pretrain, resume=resume, progress=progress, log=log)
    from btp.train.loop import train_btp

    if init_from is not None:
        arrays = tdata.btp_samples(train_shapes, cfg, recipe.per_shape, seed, out / "cache")
        return train_btp(cfg, arrays, out, recipe.btp, init_from=init_from, resume=resume, progress=progress,
                         log=log, provenance={"stage": "btp", "seed": seed, "from": str(init_from)},
                         feature_cache=out / "cache")
    if not recipe.use_pretrain:
        encoder = None
    elif encoder is None:
        encoder = find_encoder(out)
        if encoder is None:
            warn(f"btp train --stage btp: no --encoder given and none at {Path(out).parent / 'pretrain'}; the "
                 "encoder stays random (run --stage pretrain first, or pass --no-pretrain to silence this)")
    arrays = tdata.btp_samples(train_shapes, cfg, recipe.per_shape, seed, out / "cache")
    return train_btp(cfg, arrays, out, recipe.btp, encoder_path=encoder, resume=resume, progress=progress, log=log,
                     provenance={"stage": "btp", "seed": seed, "encoder": str(encoder)}, feature_cache=out / "cache")


def run_recipe(recipe: Recipe, shapes_root, out, *, seed: int = 0, resume: bool = False, progress: bool = True,
               cfg: BTPConfig | None = None, shapes_limit: int | None = None, log=print,
               validate: bool = False) -> dict:
    """Split -> pre-training -> BTP samples -> BTP stage. Returns (and writes) ``recipe.json``.
    ``validate``: the BTP stage on a validation split inside the training families instead
    (``btp.train.validate``; writes ``out/validation/validation.json`` and returns it)."""
    from btp.train import data as tdata
    from btp.train.loop import train_btp
    from btp.train.pretrain import pretrain
    from btp.train.split import zero_shot_split

    cfg = cfg or recipe.config()
    cfg.train.seed = seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = zero_shot_split(shapes_root)
    train_shapes = list(split.train[:shapes_limit] if shapes_limit else split.train)
    times: dict[str, float] = {}
    t_all = time.time()

    encoder_path = None
    if recipe.use_pretrain:
        t0 = time.time()
        encoder_path = out / "pretrain" / "encoder.safetensors"
        if not (resume and encoder_path.is_file()):
            encoder_path = pretrain(cfg, train_shapes, out / "pretrain", recipe.pretrain, resume=resume,
                                    progress=progress, log=log)
        times["pretrain_s"] = round(time.time() - t0, 1)

    from btp.train.progress import Progress

    t0 = time.time()
    with Progress("data", len(train_shapes) * recipe.per_shape, bar=progress) as bar:  # ETA lines in the log
        made = [0]

        def tick(n: int) -> None:
            made[0] += n
            bar.update(made[0])

        data_cfg = cfg if not recipe.data_sampling_order else replace(
            cfg, preprocess=replace(cfg.preprocess, sampling_order=recipe.data_sampling_order))
        arrays = tdata.btp_samples(train_shapes, data_cfg, recipe.per_shape, seed, out / "cache",
                                   rotate=recipe.rotate, synth_overrides=recipe.synth, progress=tick, log=log)
    times["data_s"] = round(time.time() - t0, 1)
    log(f"recipe {recipe.name}: {len(arrays['points'])} BTP samples ({int(arrays['object_label'].sum())} anomalous) "
        f"from {len(train_shapes)} training meshes in {times['data_s']} s")

    if validate:
        from btp.train.validate import validate_btp

        return validate_btp(cfg, arrays, train_shapes, out / "validation", recipe.btp, encoder_path=encoder_path,
                            progress=progress, log=log)
    provenance = {
        "recipe": recipe.name, "seed": seed, "shapes": str(shapes_root),
        "train_shapes": [s.name for s in train_shapes], "heldout_shapes": split.names("heldout"),
        "pretrained_encoder": bool(recipe.use_pretrain),
        "pretrain_options": asdict(recipe.pretrain) if recipe.use_pretrain else None,
        "per_shape": recipe.per_shape, "rotate": recipe.rotate, "synth_overrides": recipe.synth,
        "data_sampling_order": recipe.data_sampling_order or cfg.preprocess.sampling_order,
        "data": "synthetic defects (btp.train.synth) on training-split meshes",
    }
    t0 = time.time()
    summary = train_btp(cfg, arrays, out / "btp", recipe.btp, encoder_path=encoder_path, resume=resume,
                        progress=progress, log=log, provenance=provenance,
                        feature_cache=out / "cache")
    times["btp_s"] = round(time.time() - t0, 1)
    times["total_s"] = round(time.time() - t_all, 1)
    result = {
        "recipe": recipe.name, "seed": seed, "config": cfg.to_dict(), "times": times,
        "checkpoint": summary.get("checkpoint"), "btp_steps": summary["steps"],
        "final_loss_mean_last50": provenance.get("final_loss_mean_last50"),
        "loss_first_last": [summary["losses"][0][1], summary["losses"][-1][1]] if summary["losses"] else None,
        "pretrain": asdict(recipe.pretrain) if recipe.use_pretrain else None, "btp": asdict(recipe.btp),
        "per_shape": recipe.per_shape, "train_shapes": provenance["train_shapes"],
        "heldout_shapes": provenance["heldout_shapes"],
    }
    (out / "recipe.json").write_text(json.dumps(result, indent=1))
    log(f"recipe {recipe.name} seed {seed}: {times} -> {result['checkpoint']}")
    return result
