"""The held-out test sets of the zero-shot split, from both defect makers, in both public layouts.

    btp data eval-sets --shapes CORPUS --out runs/eval-sets

writes ``<out>/<maker>-<layout>/`` for maker in ``synth`` (btp.train.synth, the training data's
maker) and ``mesh`` (btp.eval.meshdefects, evaluation only) and layout in ``anomaly-shapenet``
and ``real3d``: per held-out mesh of ``btp.train.split`` (held-out shared shapes and whole
held-out kicad families), ``good`` normal and ``bad`` anomalous test scans of 8192 points (``points``). A class
whose synthetic defect cannot be placed with the root seed is retried with root seed + 1, + 2
(recorded in ``sets.json``); one the mesh maker cannot edit keeps its other scans.

The data sets behind btp-mini's model card table, written with btp.train.synth, one command:

    python -m btp.eval.sets --shapes ../shared/data/shapes --out runs/data

- ``heldout/``: Anomaly-ShapeNet layout, the 27 held-out meshes of ``btp.train.split``
  (6 normal + 12 anomalous test scans per class, 8192 points, root seed 100).
- ``train-synth/``: the training-split meshes (10 normal + 10 anomalous "test" scans per
  class, root seed 7) to fit the learned baseline on the same kind of synthetic data as the
  model (the model itself trains on its own cached samples, root seed = recipe seed).

A class whose defect cannot be placed with the root seed (btp.train.synth raises) is written
with root seed + 1, + 2, ... (recorded in ``evalsets.json``), so the sets are deterministic.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

MAKERS = ("synth", "mesh")
LAYOUT_SEEDS = {"anomaly-shapenet": 100, "real3d": 200}
SPLIT_SEED_OFFSETS = {"heldout": 0, "train": 7, "validation": 13}
HELDOUT_PLAN = {"per_class_train": 0, "per_class_test_good": 6, "per_class_test_bad": 12, "seed": 100}
TRAIN_PLAN = {"per_class_train": 0, "per_class_test_good": 10, "per_class_test_bad": 10, "seed": 7}


def write_class(shapes_root, dest_root: Path, cls: str, plan_kw: dict, *, tries: int = 5, num_points: int = 8192,
                partial: bool = False, log=print) -> int | None:
    """Write one class's scans (``num_points`` each; every one a single-view partial scan when
    ``partial``) under ``dest_root/cls`` with root seed ``plan_kw["seed"]``, else the next ones (a
    defect that cannot be placed); -> the root seed used, None when none worked."""
    from btp.train.synth import SynthConfig, SynthError, SynthPlan, write_dataset

    staging = dest_root / "_one"
    try:
        for bump in range(tries):
            plan = SynthPlan(**{**plan_kw, "seed": plan_kw["seed"] + bump})
            try:
                write_dataset(shapes_root, staging, [cls], plan,
                              SynthConfig(num_points=num_points, partial_prob=1.0 if partial else 0.0))
            except SynthError as err:
                log(f"evalsets: {cls} root seed {plan.seed}: {err}; retrying with the next root seed")
                shutil.rmtree(staging / cls, ignore_errors=True)
                continue
            shutil.rmtree(dest_root / cls, ignore_errors=True)
            (staging / cls).replace(dest_root / cls)
            return plan.seed
        return None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def split_names(shapes_root, split: str) -> list[str]:
    """The mesh names of one split: ``heldout``, ``train`` or ``validation`` (the validation
    families' meshes, a part of ``train``)."""
    from btp.train.split import zero_shot_split
    from btp.train.validate import family_of, validation_families

    zs = zero_shot_split(shapes_root)
    if split != "validation":
        return zs.names(split)
    val = set(validation_families(zs.train))
    return [s.name for s in zs.train if family_of(s) in val]


def write_eval_sets(shapes_root, out, *, good: int = 4, bad: int = 8, train: int = 4, makers=MAKERS,
                    layouts=tuple(LAYOUT_SEEDS), split: str = "heldout", points: int = 8192, partial: bool = False,
                    classes: list[str] | None = None, log=print) -> dict:
    """``split="train"``: the same scans on the training meshes (to fit a learned baseline on the
    same kind of data the model trains on; only the training maker belongs there).
    ``split="validation"``: the same scans on the meshes of the validation families inside the
    training split (``btp.train.validate.validation_families``), both makers: a `--validate` run
    never trains on them, so its model can be compared there with the runtime's whole raw-scan
    path, and nothing is decided on the held-out sets. ``train``: good train/ scans per class
    (their own samplings and poses; the references of ``btp eval --references train``).
    ``classes``: a subset of the split's meshes (default: all). ``points``: points per scan (e.g. 100 000 to measure the runtime's raw-scan rules at scanner density);
    ``partial``: every scan is what one camera sees (at most ``points`` points, open borders;
    defective scans viewed from the defect's side), the sets named ``<maker>-<layout>-partial``."""
    from btp.eval.meshdefects import MeshDefectConfig, write_mesh_defect_dataset

    if split not in SPLIT_SEED_OFFSETS:
        raise ValueError(f"split {split!r}: choose one of {tuple(SPLIT_SEED_OFFSETS)}")
    if split == "train" and "mesh" in makers:
        raise ValueError("the mesh defect maker is for evaluation only: no training-split sets")
    names = split_names(shapes_root, split)
    if classes:
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ValueError(f"classes {unknown} are not meshes of the {split} split; choose from {names}")
        names = [n for n in names if n in set(classes)]
    out = Path(out)
    manifest: dict = {"split": split, "classes": names, "good": good, "bad": bad, "train": train, "points": points,
                      "partial": partial, "sets": {}}
    for maker in makers:
        for layout in layouts:
            dest = out / (f"{maker}-{layout}" + ("-partial" if partial else ""))
            seed = LAYOUT_SEEDS[layout] + (0 if maker == "synth" else 1000) + SPLIT_SEED_OFFSETS[split]
            if maker == "mesh":
                summary = write_mesh_defect_dataset(shapes_root, dest, names, per_class_good=good,
                                                    per_class_bad=bad, seed=seed, layout=layout,
                                                    cfg=MeshDefectConfig(num_points=points, partial=partial),
                                                    per_class_train=train, log=log)
                manifest["sets"][dest.name] = {"maker": "btp.eval.meshdefects", "layout": layout, "seed": seed,
                                               "skipped": {c: [k for k, v in s.items() if isinstance(v, str)]
                                                           for c, s in summary["classes"].items()
                                                           if any(isinstance(v, str) for v in s.values())}}
                continue
            plan_kw = {"per_class_train": train, "per_class_test_good": good, "per_class_test_bad": bad, "seed": seed,
                       "layout": layout}
            used = {}
            for cls in names:
                used_seed = write_class(shapes_root, dest, cls, plan_kw, num_points=points, partial=partial, log=log)
                if used_seed is None:
                    log(f"eval-sets: {cls}: no root seed worked; left out of {dest.name}")
                else:
                    used[cls] = used_seed
            manifest["sets"][dest.name] = {"maker": "btp.train.synth", "layout": layout, "root_seed_used": used}
            log(f"eval-sets: wrote {dest} ({len(used)} classes)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sets.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def write_sets(shapes_root, out, which=("heldout", "train-synth"), log=print) -> dict:
    from btp.train.split import zero_shot_split

    split = zero_shot_split(shapes_root)
    out = Path(out)
    manifest: dict = {}
    for name in which:
        plan_kw, names = (HELDOUT_PLAN, split.names("heldout")) if name == "heldout" else (TRAIN_PLAN, split.names("train"))
        seeds = {}
        for cls in names:
            seed = write_class(shapes_root, out / name, cls, plan_kw, log=log)
            if seed is None:
                raise SystemExit(f"evalsets: no root seed worked for {cls}")
            seeds[cls] = seed
        manifest[name] = {"plan": plan_kw, "root_seed_used": seeds}
        log(f"evalsets: wrote {name} ({len(names)} classes)")
    (out / "evalsets.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["heldout", "train-synth"], default=None)
    args = ap.parse_args()
    write_sets(args.shapes, args.out, (args.only,) if args.only else ("heldout", "train-synth"))


if __name__ == "__main__":
    main()
