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


def _remove_outputs(out_dir: Path, stem: str) -> None:
    """Delete every output file of one scan (a scan has a complete set of outputs or none)."""
    for suffix in OUTPUT_SUFFIXES:
        (out_dir / f"{stem}{suffix}").unlink(missing_ok=True)


class _Prefetch:
    """``pipeline.prepare`` of the files ahead, on a reader thread: a bounded producer/consumer.

    Up to ``depth`` files are read and preprocessed (numpy, pykdtree and the file reads release
    the GIL) while the caller's thread runs the engine, the way back and the writes of the ones
    before; results come back in input order, an exception of one file as that file's result."""

    def __init__(self, pipeline: Pipeline, paths: list[Path], depth: int) -> None:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self._pipeline, self._paths, self._depth = pipeline, list(paths), depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="btp-read") if depth else None
        self._ahead: deque = deque()
        self._next = 0

    def _fill(self) -> None:
        while self._pool is not None and len(self._ahead) < self._depth and self._next < len(self._paths):
            self._ahead.append(self._pool.submit(self._pipeline.prepare, self._paths[self._next]))
            self._next += 1

    def take(self) -> Job:
        """The next file's Job (raises that file's error)."""
        if self._pool is None:
            path, self._next = self._paths[self._next], self._next + 1
            return self._pipeline.prepare(path)
        self._fill()
        future = self._ahead.popleft()
        self._fill()  # keep the reader busy while the caller waits on this one
        return future.result()

    def close(self) -> None:
        if self._pool is not None:
            for future in self._ahead:
                future.cancel()
            self._pool.shutdown(wait=True)


def run_files(pipeline: Pipeline, files: list[Path], out_dir: Path, *, batch: int = 1,
              threshold: float | None = None, threshold_source: str | None = None, fmt: str = "json",
              heatmaps: tuple[str, ...] = ("ply",), backend: str = "ort-cpu", write: bool = True,
              prefetch: int = 2,
              on_outcome: Callable[[FileOutcome], None] | None = None) -> list[FileOutcome]:
    """Score ``files`` ``batch`` at a time; one FileOutcome per file, in input order.

    A scan that fails (unreadable, empty, NaN-only, too few points, engine error) gets
    ``error`` and no outputs; if writing a scan's outputs fails half-way, the files already
    written for it are removed, so a scan has a complete set of outputs or none.
    ``prefetch``: files read and preprocessed ahead on a reader thread while the engine runs, and
    each batch's outputs written on a writer thread while the engine takes the next one (0 = all
    one after the other); the outputs and their order are the same either way.
    """
    heatmaps = tuple(h for h in heatmaps if h != "none")
    stems = unique_stems(files)
    outcomes = [FileOutcome(p, s) for p, s in zip(files, stems)]
    reader = _Prefetch(pipeline, files, max(prefetch, batch) if prefetch else 0)
    try:
        _run_chunks(pipeline, outcomes, reader, out_dir, batch=batch, threshold=threshold,
                    threshold_source=threshold_source, fmt=fmt, heatmaps=heatmaps, backend=backend, write=write,
                    on_outcome=on_outcome, overlap=prefetch > 0)
    finally:
        reader.close()
    return outcomes


class _Inline:
    """The serial loop's stand-in for the writer thread: runs each batch's writes at once."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def submit(self, fn, *args):
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(fn(*args))
        return done


def _run_chunks(pipeline, outcomes, reader, out_dir, *, batch, threshold, threshold_source, fmt, heatmaps, backend,
                write, on_outcome, overlap) -> None:
    """Read ahead (``reader``) -> engine on this thread -> the outputs of each batch written on a
    writer thread (in input order) while the engine takes the next batch; ``overlap=False``: all
    of it one after the other on this thread."""
    from concurrent.futures import ThreadPoolExecutor

    def finish(start: int, chunk: list[FileOutcome], scored: list[tuple[FileOutcome, Result]]) -> None:
        for oc, res in scored:
            oc.result = res
            try:
                oc.doc = result_doc(res, pipeline, oc.path, threshold, threshold_source, backend)
                if write:
                    write_outcome(out_dir, oc, heatmaps, write_json=(fmt == "json"))
            except BaseException as exc:  # a scan has a complete set of outputs or none
                _remove_outputs(out_dir, oc.stem)
                if not isinstance(exc, Exception):
                    raise
                _fail(oc, exc, "writing outputs failed: ")
        if write:
            for oc in chunk:
                if not oc.ok:  # a failed re-run leaves no outputs of an earlier run beside its error
                    _remove_outputs(out_dir, oc.stem)
            if fmt == "csv":  # rewritten (atomically) after every batch: a kill loses the batch in flight at most
                done = outcomes[:start + len(chunk)]
                outputs.write_csv(out_dir / "results.csv", [csv_row(oc) for oc in done])
        for oc in chunk:
            if on_outcome is not None:
                on_outcome(oc)

    pending = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="btp-write") if overlap else _Inline() as writer:
        try:
            for start in range(0, len(outcomes), max(batch, 1)):
                chunk = outcomes[start:start + max(batch, 1)]
                ready: list[tuple[FileOutcome, Job]] = []
                for oc in chunk:
                    try:
                        ready.append((oc, reader.take()))
                    except Exception as exc:  # one bad file never costs the others
                        _fail(oc, exc)
                scored = _infer(pipeline, ready)
                pending.append(writer.submit(finish, start, chunk, scored))
                while len(pending) > 1:  # at most one batch waits for its writes
                    pending.pop(0).result()
        finally:
            for future in pending:
                future.result()


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
