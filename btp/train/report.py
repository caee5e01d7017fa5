"""Model-card tables from `btp eval --json` reports: mean +- std over seeds, baselines, ablations.

    python -m btp.train.report --seeds runs/eval/btp-mini-seed*.json [--ablation NAME=FILE ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

METRICS = ("o_auroc", "p_auroc", "au_pro", "o_ap", "p_ap", "o_f1max")


def _row(values: list[dict], metrics=METRICS) -> list[str]:
    cells = []
    for m in metrics:
        xs = np.array([v[m] for v in values if v.get(m) is not None], dtype=float) * 100
        if xs.size == 0:
            cells.append("-")
        elif xs.size == 1:
            cells.append(f"{xs[0]:.1f}")
        else:
            cells.append(f"{xs.mean():.1f} ± {xs.std(ddof=1):.1f}")
    return cells


def seed_table(reports: list[dict]) -> str:
    head = "| method | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    rows = [("btp-mini (ours), %d seeds" % len(reports), [r["mean"] for r in reports])]
    rows.append(("surface variation (training-free)", [reports[0]["baseline"]["mean"]]))
    if reports[0].get("learned_baseline", {}).get("mean"):
        rows.append(("learned baseline (multi-scale covariance + LightGBM)", [reports[0]["learned_baseline"]["mean"]]))
    return head + "".join(f"| {name} | " + " | ".join(_row(v)) + " |\n" for name, v in rows)


def per_class_table(reports: list[dict]) -> str:
    classes = sorted(reports[0]["classes"])
    head = "| class | ours O-AUROC | ours P-AUROC | SV O-AUROC | SV P-AUROC | learned O-AUROC | learned P-AUROC |\n" \
           "|---|---|---|---|---|---|---|\n"
    lines = []
    for c in classes:
        ours = _row([r["classes"][c] for r in reports], ("o_auroc", "p_auroc"))
        sv = _row([reports[0]["baseline"]["classes"][c]], ("o_auroc", "p_auroc"))
        lb = reports[0].get("learned_baseline", {}).get("classes", {})
        lrn = _row([lb[c]], ("o_auroc", "p_auroc")) if c in lb else ["-", "-"]
        lines.append(f"| {c} | " + " | ".join(ours + sv + lrn) + " |\n")
    return head + "".join(lines)


def ablation_table(named: list[tuple[str, dict]]) -> str:
    head = "| variant (seed 0) | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS) + "\n"
    return head + "".join(f"| {n} | " + " | ".join(_row([r["mean"]])) + " |\n" for n, r in named)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", required=True)
    ap.add_argument("--ablation", nargs="*", default=[], help="NAME=FILE")
    ap.add_argument("--per-class", action="store_true")
    args = ap.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in args.seeds]
    print(seed_table(reports))
    if args.per_class:
        print(per_class_table(reports))
    if args.ablation:
        named = [(a.split("=", 1)[0], json.loads(Path(a.split("=", 1)[1]).read_text())) for a in args.ablation]
        print(ablation_table(named))


if __name__ == "__main__":
    main()
