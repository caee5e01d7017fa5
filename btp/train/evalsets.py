"""The data sets behind the model card's table, written with btp.train.synth, one command:

    python -m btp.train.evalsets --shapes ../shared/data/shapes --out runs/data

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
