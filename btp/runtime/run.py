"""The btp-run driver (shared by ``btp run``, ``btp calibrate`` and ``btp demo``). Torch-free.

``expand_inputs`` turns files, directories and globs into a file list; ``run_files`` scores them
with a ``Pipeline`` ``batch`` at a time, writes each scan's outputs (btp.runtime.outputs) and
reports - never raises for - a bad file: the run goes on and the summary lists what failed.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from btp.errors import BTPError
from btp.io import READ_SUFFIXES
from btp.runtime import outputs
from btp.runtime.pipeline import Job, Pipeline, Result

HEATMAP_CHOICES = ("ply", "png", "none")
FORMAT_CHOICES = ("json", "csv")


@dataclass
class FileOutcome:
    path: Path
    stem: str
    result: Result | None = None
    error: str | None = None  # "ErrorType: reason" when the scan failed
    doc: dict[str, Any] = field(default_factory=dict)
    written: list[Path] = field(default_factory=list)
    traceback: str | None = None  # for an internal error (btp-run --debug prints it)

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def expand_inputs(inputs: list[str], exclude: Path | None = None) -> list[Path]:
    """Files as given (even if missing: they fail later with a clear error), directories -> their
    point-cloud files (recursive, sorted, known suffixes only), globs -> matches (``**`` allowed).
    Files under ``exclude`` (the output folder) are skipped; duplicates are dropped, order kept."""
    found: list[Path] = []
    excl = exclude.resolve() if exclude is not None else None

    def keep(p: Path) -> bool:
        return excl is None or excl not in p.resolve().parents

    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found += [f for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in READ_SUFFIXES and keep(f)]
        elif _is_glob(item):
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True))]
            found += [m for m in matches if m.is_file() and keep(m)]
            if not matches:
                found.append(p)  # reported as "no such file" rather than silently ignored
        else:
            found.append(p)
    seen, unique = set(), []
    for f in found:
        key = str(f.resolve()) if f.exists() else str(f)
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


RESERVED_STEMS = ("summary", "results", "report", "report_assets")  # the run's own outputs


def unique_stems(paths: list[Path]) -> list[str]:
    """Output stems that cannot collide: the file stem; when it is taken (another input, compared
    case-insensitively) or one of the run's own outputs' names (RESERVED_STEMS), the file name with
    its extension (``a.ply``); if that is taken too, with -2, -3 ... appended."""
    taken: set[str] = set()
    stems = []
    for p in paths:
        candidates = [p.stem or p.name, p.name]
        stem = next((c for c in candidates if c.casefold() not in taken and c.casefold() not in RESERVED_STEMS), None)
        n = 2
        while stem is None:
            candidate = f"{p.name}-{n}"
            stem = candidate if candidate.casefold() not in taken else None
            n += 1
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


EXPECTED_ERRORS = (BTPError, ValueError, OSError)


def describe_error(exc: BaseException) -> str:
    """One line for the summary: the typed error and its reason, or - for an exception nobody
    raised on purpose - "internal error" with a pointer to --debug."""
    reason = getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, EXPECTED_ERRORS):
        return f"{type(exc).__name__}: {reason}"
    return f"internal error ({type(exc).__name__}: {reason}); btp-run --debug prints the traceback"


def _fail(oc: "FileOutcome", exc: BaseException, prefix: str = "") -> None:
    import traceback

    oc.error = prefix + describe_error(exc)
    oc.result = None
    if not isinstance(exc, EXPECTED_ERRORS):
        oc.traceback = "".join(traceback.format_exception(exc))


def result_doc(result: Result, pipeline: Pipeline, path: Path, threshold: float | None,
               threshold_source: str | None, backend: str) -> dict[str, Any]:
    meta = pipeline.meta
    decision = None
    if threshold is not None:
        decision = "anomalous" if result.object_score > threshold else "normal"
    doc = {
        "file": str(path),
        "object_score": result.object_score,
        "global_prob": result.global_prob,
        "decision": decision,
        "threshold": None if threshold is None else {"value": threshold, "source": threshold_source},
        "points": int(len(result.point_scores)),
        "rows": int(len(result.row_mask)) if result.row_mask is not None else int(len(result.point_scores)),
        "point_scores": outputs.point_summary(result.point_scores, meta.config.scoring.point_threshold),
        "timings_ms": {k: round(v, 3) for k, v in result.timings.items()},
        "total_ms": round(result.total_ms, 3),
        "batch_size": result.batch_size,
        "backend": backend,
        "preprocess": pipeline.preprocess,
        "model": {
            "path": str(pipeline.model_path),
            "name": meta.name,
            "version": meta.model.get("version"),
            "weights_sha256": meta.model.get("weights_sha256"),
            "fresh_init": bool(meta.model.get("fresh_init", False)),
        },
        "warnings": list(result.warnings),
    }
    if doc["model"]["fresh_init"]:
        doc["warnings"].append("the model is freshly initialised (untrained): its scores carry no meaning")
    return doc


def write_outcome(out_dir: Path, outcome: FileOutcome, heatmaps: tuple[str, ...], write_json: bool) -> None:
    """npy, ply, png, then the JSON last (its presence marks a complete set)."""
    r = outcome.result

    def place(suffix: str) -> Path:  # the stem may hold a dot (a.ply): append, never replace a suffix
        return out_dir / f"{outcome.stem}{suffix}"

    files = {"npy": place(".npy")}
    outputs.write_npy(files["npy"], r.scores_per_row())  # one per input row; NaN for dropped rows
    if "ply" in heatmaps:
        points = r.points if r.offset is None else r.points.astype(np.float64) + r.offset  # the scan's own frame
        files["ply"] = outputs.write_heatmap_ply(place(".ply"), points, r.point_scores)
    if "png" in heatmaps:
        d = outcome.doc
        decision = f" - {d['decision']}" if d.get("decision") else ""
        title = f"{outcome.path.name}: object score {r.object_score:.3f}{decision}"
        files["png"] = outputs.render_views(place(".png"), r.points, r.point_scores, title=title,
                                            point_threshold=d["point_scores"]["point_threshold"])
    outcome.doc["outputs"] = {k: str(v) for k, v in files.items()}
    if write_json:
        files["json"] = outputs.write_json(place(".json"), outcome.doc)
    outcome.written = list(files.values())


def csv_row(outcome: FileOutcome) -> dict[str, Any]:
    if not outcome.ok:
        return {"file": str(outcome.path), "status": "error", "error": outcome.error}
    d = outcome.doc
    ps = d["point_scores"]
    return {"file": d["file"], "status": "ok", "object_score": f"{d['object_score']:.6f}",
            "decision": d["decision"] or "",
            "threshold": "" if d["threshold"] is None else d["threshold"]["value"], "points": d["points"],
            "anomalous_points": ps["anomalous_points"], "anomalous_fraction": f"{ps['anomalous_fraction']:.6f}",
            "score_max": f"{ps['max']:.6f}", "score_mean": f"{ps['mean']:.6f}", "total_ms": d["total_ms"], "error": ""}


OUTPUT_SUFFIXES = (".npy", ".ply", ".png", ".json")


def _infer(pipeline: Pipeline, ready: list[tuple[FileOutcome, Job]]) -> list[tuple[FileOutcome, Result]]:
    """The engine on a batch; if the batch call fails, each scan alone, so that one scan the
    engine cannot take costs only itself."""
    if not ready:
        return []
    try:
        return list(zip([oc for oc, _ in ready], pipeline.infer([job for _, job in ready], batch_size=len(ready))))
    except Exception as exc:
        if len(ready) == 1:
            _fail(ready[0][0], exc, "engine failed: ")
            return []
    done = []
    for item in ready:
        done += _infer(pipeline, [item])
    return done


def _remove(paths: list[Path]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def run_files(pipeline: Pipeline, files: list[Path], out_dir: Path, *, batch: int = 1,
              threshold: float | None = None, threshold_source: str | None = None, fmt: str = "json",
              heatmaps: tuple[str, ...] = ("ply",), backend: str = "ort-cpu", write: bool = True,
              on_outcome: Callable[[FileOutcome], None] | None = None) -> list[FileOutcome]:
    """Score ``files`` ``batch`` at a time; one FileOutcome per file, in input order.

    A scan that fails (unreadable, empty, NaN-only, too few points, engine error) gets
    ``error`` and no outputs; if writing a scan's outputs fails half-way, the files already
    written for it are removed, so a scan has a complete set of outputs or none.
    """
    heatmaps = tuple(h for h in heatmaps if h != "none")
    stems = unique_stems(files)
    outcomes = [FileOutcome(p, s) for p, s in zip(files, stems)]
    for start in range(0, len(outcomes), max(batch, 1)):
        chunk = outcomes[start:start + max(batch, 1)]
        ready: list[tuple[FileOutcome, Job]] = []
        for oc in chunk:
            try:
                ready.append((oc, pipeline.prepare(oc.path)))
            except Exception as exc:  # one bad file never costs the others
                _fail(oc, exc)
        for oc, res in _infer(pipeline, ready):
            oc.result = res
            try:
                oc.doc = result_doc(res, pipeline, oc.path, threshold, threshold_source, backend)
                if write:
                    write_outcome(out_dir, oc, heatmaps, write_json=(fmt == "json"))
            except BaseException as exc:  # a scan has a complete set of outputs or none
                _remove([out_dir / f"{oc.stem}{s}" for s in OUTPUT_SUFFIXES])
                if not isinstance(exc, Exception):
                    raise
                _fail(oc, exc, "writing outputs failed: ")
        if write:
            for oc in chunk:
                if not oc.ok:  # a failed re-run leaves no outputs of an earlier run beside its error
                    _remove([out_dir / f"{oc.stem}{s}" for s in OUTPUT_SUFFIXES])
            if fmt == "csv":  # rewritten (atomically) after every batch: a kill loses the batch in flight at most
                done = outcomes[:start + len(chunk)]
                outputs.write_csv(out_dir / "results.csv", [csv_row(oc) for oc in done])
        for oc in chunk:
            if on_outcome is not None:
                on_outcome(oc)
    return outcomes


def summary_doc(outcomes: list[FileOutcome], pipeline: Pipeline) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    return {
        "model": str(pipeline.model_path),
        "files": len(outcomes),
        "succeeded": len(ok),
        "failed": [{"file": str(o.path), "error": o.error} for o in outcomes if not o.ok],
        "object_scores": {str(o.path): o.result.object_score for o in ok},
        "median_total_ms": float(np.median([o.result.total_ms for o in ok])) if ok else None,
    }
