"""`btp-bench rules`: what a raw-scan rule changes in accuracy, against the exact rule; and
`btp-bench models`: two models on the same samples.

For each data set (held-out test scans, e.g. ``btp data eval-sets --points 100000``: scanner
density, where the rules differ), the model is evaluated by ``btp.eval.evaluate`` once per rule
(``exact``: the reference FPS and nearest-neighbour interpolation; ``auto``: the product's default,
the voxel rule with its gather back to the raw scan, or for scans of up to 8N points in a model's
canonical order the anchored bucket FPS over all points). Reported per set: the
class-mean metrics of both, their differences in points (x100), the model's ms per scan in the
evaluation loop (file reading included) and the verdict against the goal: |delta| <= 0.5 point
on O-AUROC and P-AUROC (point metrics on the raw scans, full resolution).

``starts`` (``btp-bench rules --starts 0,1,2``) runs every rule from several FPS start points
and reports the paired difference's mean and standard error: on sets of a few hundred scans a
single start moves O-AUROC by several points, more than the goal.

``btp-bench models A B --starts 0,1,2`` runs the same paired comparison between two models (one
rule): both score the same samples at every start, so the difference between them is measured
without the sampling noise that two separate ``btp eval`` runs carry.

The rule ``exact-start1`` is the exact rule started at point 1 instead of the model's
``preprocess.fps_start`` (both FPS: the downsampling and the patch centers): an equally valid
sample of the same scans. Its difference from ``exact`` is the noise floor of the comparison -
how far the metrics move when nothing but the choice of samples changes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

METRICS = ("o_auroc", "p_auroc", "au_pro", "p_auroc_sampled")
GOAL_POINTS = 0.5


def run_rules(model, data_roots, *, rules=("exact", "auto"), starts=None, voxel_reps=None,
              progress: Callable[[str], None] | None = None) -> dict:
    """One ``btp eval`` (model only) per set, rule and FPS start.

    ``starts``: FPS start indices (both FPS: downsampling and patch centers). None = the model's
    own ``preprocess.fps_start`` only. With several, every rule runs from every start: the
    reported metrics are the means over starts, ``delta_points`` the mean of the paired
    per-start differences (fast - reference) and ``delta_se_points`` its standard error, so the
    0.5-point goal is judged against the sampling noise instead of one draw of it.
    ``voxel_reps``: cells per sample of the voxel rule (``preprocess.voxel_reps``), e.g. (6, 3):
    every rule after the reference runs once per value (labelled ``auto@6``, ``auto@3``), each
    compared with the same reference run, so two settings of the fast rule cost one exact run."""
    from btp.benchmarks.machine import describe_machine

    reference, *fast = rules
    arms = [(reference, model, reference, {})]
    for rule in fast:
        arms += [(f"{rule}@{r}", model, rule, {"voxel_reps": int(r)}) for r in voxel_reps] if voxel_reps \
            else [(rule, model, rule, {})]
    sets = _compare(arms, data_roots, starts, progress)
    for entry in sets:
        entry["rules"] = entry.pop("arms")
        entry["met_by_rule"] = {label: all(abs(d["points"][m]) <= GOAL_POINTS for m in ("o_auroc", "p_auroc"))
                                for label, d in entry["deltas"].items()}
        entry["met"] = entry["met_by_rule"][arms[-1][0]]
    return {"machine": describe_machine(), "model": str(model), "rules": [a[0] for a in arms],
            "goal_points": GOAL_POINTS, "starts": list(starts) if starts else None, "sets": sets}


def run_models(models, data_roots, *, rule: str = "exact", starts=None,
               progress: Callable[[str], None] | None = None) -> dict:
    """``btp-bench models A B``: the same held-out evaluation of two models, paired: each set and
    FPS start scores the same samples with both, so ``delta_points`` (B - A, the mean of the
    per-start differences) and its standard error over starts compare the models without the
    sampling noise that separate ``btp eval`` runs carry."""
    from btp.benchmarks.machine import describe_machine

    if len(models) != 2:
        raise ValueError(f"btp-bench models compares two models, got {len(models)}")
    labels = [Path(m).stem for m in models]
    if labels[0] == labels[1]:
        labels = [f"{Path(m).parent.name}/{Path(m).stem}" for m in models]
    if labels[0] == labels[1]:
        labels = [f"A:{labels[0]}", f"B:{labels[1]}"]
    sets = _compare([(label, model, rule, {}) for label, model in zip(labels, models)], data_roots, starts, progress)
    for entry in sets:
        entry["models"] = entry.pop("arms")
    return {"machine": describe_machine(), "models": labels, "model_files": [str(m) for m in models],
            "rule": rule, "starts": list(starts) if starts else None, "sets": sets}


def _compare(arms, data_roots, starts, progress) -> list[dict]:
    """arms = [(label, model, rule, preprocess overrides), ...]; the first is the reference.
    Per set: every arm's class-mean metrics (means over starts); ``deltas[label]`` for every other
    arm: ``points`` = arm - reference (x100) and, with several starts, ``per_start`` (the paired
    per-start differences) and ``se`` (their standard error). ``delta_points`` /
    ``delta_se_points`` / ``delta_per_start_points`` repeat the last arm's."""
    import numpy as np

    from btp.eval.evaluate import evaluate, load_scorer

    say = progress or (lambda _msg: None)
    sets = []
    for root in data_roots:
        root = Path(root)
        by_arm = {}
        for label, model, rule, overrides in arms:
            runs = {}
            for start in (starts or (None,)):
                say(f"{root.name}: {label}" + ("" if start is None else f", FPS start {start}"))
                scorer = load_scorer(model, downsample="exact" if rule == "exact-start1" else rule)
                for key, value in overrides.items():
                    setattr(scorer.cfg.preprocess, key, value)  # the scorer's own copy of the model's config
                if start is not None:
                    scorer.cfg.preprocess.fps_start = int(start)
                if rule == "exact-start1":
                    scorer.cfg.preprocess.fps_start += 1
                report = evaluate(root, scorer=scorer, baselines=False)
                runs[start] = {"mean": {m: report["mean"][m] for m in METRICS if m in report["mean"]},
                               "ms_per_scan": report["data"]["ms_per_scan"]["model"],
                               "scans": sum(v["good"] + v["bad"] for v in report["data"]["samples"].values()),
                               "points": sorted({v["points"] // max(1, v["good"] + v["bad"])
                                                 for v in report["data"]["samples"].values()})}
            first = next(iter(runs.values()))
            by_arm[label] = {"mean": {m: float(np.mean([r["mean"][m] for r in runs.values()])) for m in first["mean"]},
                             "ms_per_scan": float(np.median([r["ms_per_scan"] for r in runs.values()])),
                             "scans": first["scans"], "points": first["points"]}
            if overrides:
                by_arm[label]["preprocess"] = dict(overrides)
            if starts:
                by_arm[label]["per_start"] = {str(k): v["mean"] for k, v in runs.items()}
        reference = by_arm[arms[0][0]]
        deltas = {}
        for label, *_ in arms[1:]:
            other = by_arm[label]
            d = {"points": {m: 100 * (other["mean"][m] - reference["mean"][m]) for m in reference["mean"]}}
            if starts and len(starts) > 1:
                paired = {m: [100 * (other["per_start"][str(k)][m] - reference["per_start"][str(k)][m])
                              for k in starts] for m in reference["mean"]}
                d["se"] = {m: float(np.std(v, ddof=1) / np.sqrt(len(v))) for m, v in paired.items()}
                d["per_start"] = paired
            deltas[label] = d
        last = deltas[arms[-1][0]]
        entry = {"data": str(root), "made_by": _made_by(root), "arms": by_arm, "deltas": deltas,
                 "delta_points": last["points"]}
        if "se" in last:
            entry["delta_se_points"], entry["delta_per_start_points"] = last["se"], last["per_start"]
        sets.append(entry)
    return sets


def _made_by(root: Path) -> str | None:
    """How ``btp data eval-sets`` made this set (its sets.json beside it), in words."""
    import json

    manifest = root.parent / "sets.json"
    if not manifest.is_file():
        return None
    m = json.loads(manifest.read_text())
    info = m.get("sets", {}).get(root.name, {})
    return (f"btp data eval-sets: {m.get('split', 'heldout')} split, {m.get('good')} normal + {m.get('bad')} "
            f"anomalous scans per class of {m.get('points', 8192)} points, maker {info.get('maker')}, "
            f"layout {info.get('layout')}, root seed {info.get('seed', 'per class in sets.json')}")


def rules_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    ref, fast = data["rules"][0], " / ".join(f"`{r}`" for r in data["rules"][1:])
    lines = [f"# Raw-scan rules: {fast} against `{ref}`, held-out accuracy", "",
             f"- Machine: {machine_line(data['machine'])}", f"- Date (UTC): {data['machine']['date_utc']}",
             f"- Model: `{data['model']}`. Command: `btp-bench rules MODEL --data SET ...` (one `btp eval` per rule "
             f"and set, the model only).",
             f"- Goal: |rule - {ref}| <= {data['goal_points']} point on O-AUROC and P-AUROC (point metrics on the "
             "raw scans); values are class means x100."]
    if any("@" in r for r in data["rules"]):
        lines.append("- `RULE@R`: the rule with R voxel cells per sampled point (`preprocess.voxel_reps`).")
    return _table_markdown(data, "rules", "rule", lines,
                           lambda s, label: f"goal {'MET' if s['met_by_rule'][label] else 'MISSED'}")


def models_markdown(data: dict) -> str:
    from btp.benchmarks.machine import machine_line

    a, b = data["models"]
    lines = [f"# Models: `{b}` against `{a}`, accuracy on the same test scans, paired", "",
             f"- Machine: {machine_line(data['machine'])}", f"- Date (UTC): {data['machine']['date_utc']}",
             f"- Models: `{data['model_files'][0]}` (A), `{data['model_files'][1]}` (B). Command: "
             f"`btp-bench models A B --data SET ...` (one `btp eval` per model, set and FPS start, the model only, "
             f"raw-scan rule `{data['rule']}`).",
             "- Both models score the same samples of each scan at each start; values are class means x100."]
    return _table_markdown(data, "models", "model", lines, lambda s, label: "")


def _table_markdown(data: dict, key: str, column: str, lines: list[str], verdict) -> str:
    ref = data[key][0]
    lines += [f"- `{Path(s['data']).name}`: {s['made_by']}" for s in data["sets"] if s.get("made_by")]
    lines += ["",
             f"| set | scans x points | {column} | O-AUROC | P-AUROC | AU-PRO | P-AUROC (2048 sampled) | ms per scan |",
             "|---|---|---|---|---|---|---|---|"]
    for s in data["sets"]:
        for arm in data[key]:
            r = s[key][arm]
            m = r["mean"]
            lines.append(f"| {Path(s['data']).name} | {r['scans']} x {', '.join(f'{p:,}' for p in r['points'])} | "
                         f"{arm} | {100 * m['o_auroc']:.2f} | {100 * m['p_auroc']:.2f} | {100 * m['au_pro']:.2f} | "
                         f"{100 * m['p_auroc_sampled']:.2f} | {r['ms_per_scan']:.1f} |")
        for label, delta in s["deltas"].items():
            d, se = delta["points"], delta.get("se")
            shown = {m: f"{d[m]:+.2f}" + (f" ± {se[m]:.2f}" if se else "") for m in d}
            lines.append(f"| {Path(s['data']).name} | | **{label} - {ref}** | {shown['o_auroc']} | "
                         f"{shown['p_auroc']} | {shown['au_pro']} | {shown['p_auroc_sampled']} | {verdict(s, label)} |")
    if data.get("starts"):
        lines += ["", f"- Every {column} ran from each FPS start in {data['starts']} (downsampling and patch centers); "
                  "the rows are means over the starts, the difference is the mean of the paired per-start "
                  "differences ± its standard error (n = number of starts)."]
        for s in data["sets"]:
            for label, delta in s["deltas"].items():
                per = delta.get("per_start")
                if per:
                    lines.append(f"- `{Path(s['data']).name}` {label} - {ref} per start, O-AUROC: "
                                 f"{', '.join(f'{v:+.2f}' for v in per['o_auroc'])}; P-AUROC: "
                                 f"{', '.join(f'{v:+.2f}' for v in per['p_auroc'])}")
    return "\n".join(lines) + "\n"
