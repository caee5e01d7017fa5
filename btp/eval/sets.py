"""The held-out test sets of the zero-shot split, from both defect makers, in both public layouts.

    btp data eval-sets --shapes CORPUS --out runs/eval-sets

writes ``<out>/<maker>-<layout>/`` for maker in ``synth`` (btp.train.synth, the training data's
maker) and ``mesh`` (btp.eval.meshdefects, evaluation only) and layout in ``anomaly-shapenet``
and ``real3d``: per held-out mesh of ``btp.train.split`` (held-out shared shapes and whole
held-out kicad families), ``good`` normal and ``bad`` anomalous test scans of 8192 points (``points``). A class
whose synthetic defect cannot be placed with the root seed is retried with root seed + 1, + 2
(recorded in ``sets.json``); one the mesh maker cannot edit keeps its other scans.
"""
from __future__ import annotations

import json
from pathlib import Path

MAKERS = ("synth", "mesh")
LAYOUT_SEEDS = {"anomaly-shapenet": 100, "real3d": 200}
SPLIT_SEED_OFFSETS = {"heldout": 0, "train": 7, "validation": 13}


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
    from btp.train.evalsets import write_class

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
