"""Design choices on a validation split *inside* the training families (never on held-out ones).

``btp train --recipe R --validate``: the recipe's pre-training and BTP samples (cached: the same
files a full run in that folder uses), then the training meshes' families are split - every
``VAL_EVERY``-th family in sorted order, from the ``VAL_FIRST``-th, is validation - and the BTP
stage trains on the samples of the other families only. The trained heads then score the
validation samples as the runtime would on the N sampled points (``sample_scores``), and
``<out>/validation/validation.json`` gets per-family and mean point / object AUROC. A family is a
corpus family (``kicad:<folder>``, ``shapes:<kind>``) or, for a shapes folder without families,
the mesh's kind.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VAL_EVERY, VAL_FIRST = 5, 2


class ValidationError(ValueError):
    """The training meshes have too few families to hold one out."""


def family_of(shape) -> str:
    return shape.family or f"shapes:{shape.kind}"


def validation_families(shapes) -> list[str]:
    """Every VAL_EVERY-th family of ``shapes`` in sorted order from the VAL_FIRST-th (the last one
    when there are fewer); at least one family always stays for training."""
    families = sorted({family_of(s) for s in shapes})
    if len(families) < 2:
        raise ValidationError(f"the training meshes have {len(families)} family: a validation split needs >= 2")
    return families[VAL_FIRST::VAL_EVERY] or families[-1:]


def validate_btp(cfg, arrays: dict[str, np.ndarray], train_shapes, out, opts, *, encoder_path=None,
                 progress: bool = True, log=print) -> dict:
    """Train the BTP stage on the non-validation families' samples (``arrays``, whose
    ``shape_id`` indexes ``train_shapes``), score the validation families' samples, write
    ``out/validation.json``; returns its content."""
    from btp.metrics import auroc
    from btp.model.checkpoint import load_checkpoint
    from btp.train.data import BTPArrays
    from btp.train.loop import precompute_features, sample_scores, train_btp

    out = Path(out)
    val = set(validation_families(train_shapes))
    families = np.array([family_of(train_shapes[i]) for i in arrays["shape_id"]])
    is_val = np.isin(families, sorted(val))
    log(f"validation: {len(val)} of {len({family_of(s) for s in train_shapes})} training families held out "
        f"({int(is_val.sum())} of {len(is_val)} samples): {', '.join(sorted(val))}")
    subset = lambda mask: {k: v[mask] for k, v in arrays.items()}  # noqa: E731
    summary = train_btp(cfg, subset(~is_val), out, opts, encoder_path=encoder_path, progress=progress, log=log,
                        provenance={"stage": "btp-validation", "validation_families": sorted(val)},
                        feature_cache=out / "cache")
    model, _ = load_checkpoint(summary["checkpoint"])
    dataset = BTPArrays(subset(is_val), model.cfg)
    model.point_encoder = precompute_features(model.point_encoder, dataset, log=log)
    got = sample_scores(model, dataset, model.point_encoder)
    per_family = {}
    for fam in sorted(val):
        m = families[is_val] == fam
        labels, objects = got["point_labels"][m], got["object_labels"][m]
        per_family[fam] = {
            "samples": int(m.sum()),
            "point_auroc": auroc(labels.ravel(), got["point_scores"][m].ravel()) if labels.any() else None,
            "object_auroc": (auroc(objects, got["object_scores"][m]) if 0 < objects.sum() < len(objects)
                             else None),
        }

    def mean(key):
        values = [f[key] for f in per_family.values() if f[key] is not None and np.isfinite(f[key])]
        return float(np.mean(values)) if values else None

    result = {
        "validation_families": sorted(val), "train_samples": int((~is_val).sum()), "val_samples": int(is_val.sum()),
        "steps": summary["steps"], "wall_s": summary["wall_s"], "checkpoint": summary["checkpoint"],
        "point_auroc_family_mean": mean("point_auroc"), "object_auroc_family_mean": mean("object_auroc"),
        "point_auroc_pooled": auroc(got["point_labels"].ravel(), got["point_scores"].ravel()),
        "object_auroc_pooled": auroc(got["object_labels"], got["object_scores"]),
        "per_family": per_family,
        "scores": "on the N sampled points, as the runtime scores them (btp.train.loop.sample_scores)",
    }
    (out / "validation.json").write_text(json.dumps(result, indent=1))
    shown = {k: "n/a" if result[k] is None else f"{result[k]:.4f}"
             for k in ("point_auroc_family_mean", "object_auroc_family_mean")}
    log(f"validation: point AUROC {shown['point_auroc_family_mean']}, object AUROC "
        f"{shown['object_auroc_family_mean']} (family means) -> {out / 'validation.json'}")
    return result
