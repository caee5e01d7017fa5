"""The btp-run driver (shared by ``btp run``, ``btp calibrate`` and ``btp demo``). Torch-free.

``expand_inputs`` turns files, directories and globs into a file list; ``run_files`` scores them
with a ``Pipeline`` ``batch`` at a time, turns each into a ``ScanOutcome`` (btp.runtime.outcome),
has btp.runtime.outputs write its files and reports - never raises for - a bad file: the run goes
on and the summary lists what failed.
"""
from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from btp.errors import BTPError
from btp.io import READ_SUFFIXES
from btp.runtime import outputs
from btp.runtime.outcome import AppliedThreshold, ModelInfo, ScanOutcome
from btp.runtime.pipeline import Job, Pipeline, Result

HEATMAP_CHOICES = ("ply", "png", "none")
FORMAT_CHOICES = ("json", "csv")


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


def failed(file: Path, stem: str, exc: BaseException, prefix: str = "") -> ScanOutcome:
    """The outcome of a scan that ``exc`` stopped (with the traceback of an internal error)."""
    import traceback

    trace = None if isinstance(exc, EXPECTED_ERRORS) else "".join(traceback.format_exception(exc))
    return ScanOutcome.failed(file=file, stem=stem, error=prefix + describe_error(exc), traceback=trace)


@dataclass(frozen=True, kw_only=True)
class _Scoring:
    """What every scan of one run shares: the model, the decision threshold, where it runs."""

    model: ModelInfo
    point_threshold: float
    threshold: AppliedThreshold | None
    backend: str
    preprocess: str

    def outcome(self, result: Result, file: Path, stem: str) -> ScanOutcome:
        outcome = ScanOutcome.scored(result, file=file, stem=stem, model=self.model,
                                     point_threshold=self.point_threshold, threshold=self.threshold,
                                     backend=self.backend, preprocess=self.preprocess)
        return dataclasses.replace(outcome, regions=scan_regions(result, self.point_threshold))


def scan_regions(result: Result, point_threshold: float) -> tuple[dict, ...]:
    """The scan's defect regions (btp.runtime.regions) in its own coordinates, largest first: of its
    point scores at ``point_threshold``, or - checked against its part's reference and registered -
    of its fused map at the part's threshold (the map and level its decision comes from; peak and
    mean are then fused values)."""
    from btp.runtime.regions import defect_regions

    points = result.points if result.offset is None else result.points.astype(np.float64) + result.offset
    scores, level = result.point_scores, point_threshold
    guided = result.reference
    if guided is not None and guided.scores is not None and guided.scores.registered:
        scores, level = guided.scores.fused, guided.threshold
    return tuple(r.as_dict() for r in defect_regions(points, scores, level))


def _infer(pipeline: Pipeline, ready: list[tuple[int, Job]]) -> list[tuple[int, Result | BaseException]]:
    """The engine on a batch -> (index, Result); if the batch call fails, each scan alone, so that
    one scan the engine cannot take costs only itself (index, its exception)."""
    if not ready:
        return []
    try:
        return list(zip([i for i, _ in ready], pipeline.infer([job for _, job in ready], batch_size=len(ready))))
    except Exception as exc:
        if len(ready) == 1:
            return [(ready[0][0], exc)]
    done = []
    for item in ready:
        done += _infer(pipeline, [item])
    return done


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


DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of scans in flight: read ahead, in the engine, being written
RAW_POINT_BYTES = 96  # per raw point in flight: coordinates, scores, maps, the heat map being encoded


def scan_bytes(cfg, points: int) -> int:
    """Estimated bytes one scan of ``points`` raw points holds in flight: its arrays
    (RAW_POINT_BYTES per point) and the engine's float32 activations for it, from the model's G, K
    and layer widths: every per-point layer over its G x K points, and two transformer layers over
    G tokens (ONNX Runtime reuses a layer's buffers for the next)."""
    e, g = cfg.encoder, cfg.gfcm
    gk = e.num_group * e.group_size
    per_point = e.in_channels + sum(e.pointnet_dims) + sum(g.conv_dims) + g.hidden + g.point_dim
    tokens = e.num_group * e.trans_dim * (8 + 2 * e.mlp_ratio) + e.num_heads * e.num_group ** 2
    return int(points * RAW_POINT_BYTES + 4 * (gk * per_point + 2 * tokens))


def in_flight_cap(cfg, budget: int, points: int) -> int:
    """Scans per stage (read ahead, engine, writing) that fit ``budget`` bytes, at least one."""
    return max(1, int(budget // (3 * scan_bytes(cfg, points))))


def run_files(pipeline: Pipeline, files: list[Path], out_dir: Path, *, batch: int = 1,
              threshold: float | None = None, threshold_source: str | None = None, fmt: str = "json",
              heatmaps: tuple[str, ...] = ("ply",), backend: str = "ort-cpu", write: bool = True,
              prefetch: int = 2, memory_budget: int = DEFAULT_MEMORY_BUDGET, stems: list[str] | None = None,
              on_outcome: Callable[[ScanOutcome], None] | None = None) -> list[ScanOutcome]:
    """Score ``files`` ``batch`` at a time; one ScanOutcome per file, in input order.

    A scan that fails (unreadable, empty, NaN-only, too few points, engine error) gets
    ``error`` and no outputs; if writing a scan's outputs fails half-way, the files already
    written for it are removed, so a scan has a complete set of outputs or none.
    ``prefetch``: files read and preprocessed ahead on a reader thread while the engine runs, and
    each batch's outputs written on a writer thread while the engine takes the next one (0 = all
    one after the other); the outputs and their order are the same either way.
    ``memory_budget``: bytes the scans in flight may hold, whatever ``batch`` says: each of the three
    stages (read ahead, engine, writing) holds at most a third of it (``scan_bytes``, with the
    model's N points per scan for the batch size, and the scans' own sizes as they are read).
    ``stems``: the output names, one per file (default: ``unique_stems(files)``).
    """
    heatmaps = tuple(h for h in heatmaps if h != "none")
    batch = min(max(batch, 1), in_flight_cap(pipeline.cfg, memory_budget, pipeline.cfg.preprocess.num_points))
    applied = None if threshold is None else AppliedThreshold(value=threshold, source=threshold_source)
    scoring = _Scoring(model=ModelInfo.of(pipeline), point_threshold=pipeline.meta.config.scoring.point_threshold,
                       threshold=applied, backend=getattr(pipeline.backend, "name", None) or backend,
                       preprocess=pipeline.preprocess)
    run = _Run(files=list(files), stems=unique_stems(files) if stems is None else list(stems), out_dir=out_dir, scoring=scoring, fmt=fmt,
               heatmaps=heatmaps, write=write, on_outcome=on_outcome)
    reader = _Prefetch(pipeline, files, max(prefetch, batch) if prefetch else 0)
    try:
        run.batches(pipeline, reader, batch=batch, budget=memory_budget // 3, overlap=prefetch > 0)
    finally:
        reader.close()
    return run.outcomes


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


class _Run:
    """One run's files and their outcomes (slot i = files[i]; a slot is filled by the reader's
    failure on this thread or by ``finish`` on the writer thread, never by both)."""

    def __init__(self, *, files: list[Path], stems: list[str], out_dir: Path, scoring: _Scoring, fmt: str,
                 heatmaps: tuple[str, ...], write: bool, on_outcome: Callable[[ScanOutcome], None] | None) -> None:
        self.files, self.stems, self.out_dir, self.scoring = files, stems, out_dir, scoring
        self.fmt, self.heatmaps, self.write, self.on_outcome = fmt, heatmaps, write, on_outcome
        self.slots: list[ScanOutcome | None] = [None] * len(files)

    @property
    def outcomes(self) -> list[ScanOutcome]:
        return list(self.slots)  # every slot is filled once batches() has returned

    def batches(self, pipeline: Pipeline, reader: "_Prefetch", *, batch: int, budget: int, overlap: bool) -> None:
        """Read ahead (``reader``) -> engine on this thread -> the outputs of each batch written on a
        writer thread (in input order) while the engine takes the next batch; ``overlap=False``: all
        of it one after the other on this thread. A batch ends at ``batch`` scans or once its scans
        hold ``budget`` bytes (``scan_bytes``)."""
        from concurrent.futures import ThreadPoolExecutor

        step = max(batch, 1)
        pending = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="btp-write") if overlap else _Inline() as writer:
            try:
                start = 0
                while start < len(self.files):
                    ready: list[tuple[int, Job]] = []
                    held, stop = 0, min(start + step, len(self.files))
                    for i in range(start, stop):
                        try:
                            job = reader.take()
                            ready.append((i, job))
                            held += scan_bytes(pipeline.cfg, len(job.raw))
                        except Exception as exc:  # one bad file never costs the others
                            self.slots[i] = failed(self.files[i], self.stems[i], exc)
                        if held >= budget:
                            stop = i + 1
                            break
                    chunk, start = range(start, stop), stop
                    scored = _infer(pipeline, ready)
                    pending.append(writer.submit(self.finish, chunk, scored))
                    while len(pending) > 1:  # at most one batch waits for its writes
                        pending.pop(0).result()
            finally:
                for future in pending:
                    future.result()

    def finish(self, chunk: range, scored: list[tuple[int, Result | BaseException]]) -> None:
        """The outcomes of one batch and their files; results.csv rewritten with every scan so far."""
        for i, got in scored:
            file, stem = self.files[i], self.stems[i]
            if isinstance(got, BaseException):
                self.slots[i] = failed(file, stem, got, "engine failed: ")
                continue
            outcome = self.scoring.outcome(got, file, stem)
            try:
                if self.write:
                    outcome = outputs.write_scan(self.out_dir, outcome, self.heatmaps, json_file=self.fmt == "json")
            except BaseException as exc:  # a scan has a complete set of outputs or none
                outputs.remove_scan(self.out_dir, stem)
                if not isinstance(exc, Exception):
                    raise
                outcome = failed(file, stem, exc, "writing outputs failed: ")
            self.slots[i] = outcome
        if self.write:
            for i in chunk:
                if not self.slots[i].ok:  # a failed re-run leaves no outputs of an earlier run beside its error
                    outputs.remove_scan(self.out_dir, self.stems[i])
            if self.fmt == "csv":  # rewritten (atomically) after every batch: a kill loses the batch in flight at most
                outputs.write_csv(self.out_dir / "results.csv", self.slots[:chunk.stop])
        if self.on_outcome is not None:
            for i in chunk:
                self.on_outcome(self.slots[i])
