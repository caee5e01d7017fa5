"""``btp watch``: a hot folder scored as scans land in it, every file exactly once. Torch-free.

    btp watch IN_DIR --model model.onnx --out OUT [--reference PART.btpref|DIR] [--mqtt HOST[:PORT] --topic T]

With --reference the pipeline holds the parts' references (btp.runtime.guided.ReferenceSet, loaded
once): each scan is routed to its part by btp.runtime.reference.ROUTING_RULE, as btp-run --reference
routes it, and the part's fused score and threshold decide; its reference block goes into the
ledger row and the message.

Each poll walks IN_DIR (recursively; OUT and the --move-* folders inside it are left out) and
takes a file when it is complete:

- its size and modification time have not changed for ``settle_s`` seconds, and
- its name does not end in ``.tmp`` or ``.part`` (a writer may write ``scan.pcd.part`` and rename
  it to ``scan.pcd`` when done; the rename makes it visible) and does not start with ``.``.

A taken file is skipped when the ledger (btp.runtime.ledger, OUT/ledger.sqlite) holds it already
- the same path, size and modification time, or the same path with the same bytes (a re-delivery)
- and scored otherwise: the files that are ready together go to the engine as one batch, each
scan's outputs are written to OUT (btp.runtime.run), its row is committed to the ledger, then its
message goes to the sinks (a JSON line on stdout, MQTT) and the row is marked published; last, the
file is moved to --move-done / --move-failed if asked. A crash at any point redoes at most the
scans in flight: a committed row is never scored again, an unpublished row is sent again on the
next start. The ledger also marks the files in flight: one that was in flight when the service
died is scored alone next time (a file that crashes the process cannot take others down), and
after MAX_ATTEMPTS such deaths it is recorded as failed without being read again. A stop request (SIGTERM, Ctrl-C) lets the batch in flight finish, then the service
exits; a second one stops at once.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from btp.io import READ_SUFFIXES
from btp.runtime.ledger import NAME_PATTERN, Ledger, file_version, record_from_outcome, utc_now
from btp.runtime.strict_json import finite
from btp.runtime.outcome import ScanOutcome
from btp.runtime.run import RESERVED_STEMS, run_files

PARTIAL_SUFFIXES = (".tmp", ".part")  # being written: taken once renamed without this suffix
RESEND_S = 5.0  # while messages wait for the line (e.g. the broker is down), try again this often
Sink = Callable[[dict[str, Any]], None]  # sends one message; raises when it could not
STDOUT, MQTT = 1, 2  # the channels' bits in the ledger's ``published`` marks
MAX_ATTEMPTS = 2  # a file the service died on this often is recorded as failed, not scored again
MESSAGE_REGIONS = 20  # the largest regions in a message (the ledger and the scan's JSON have all)


@dataclass(kw_only=True)
class WatchOptions:
    """What ``Watcher`` needs besides the pipeline, the ledger and the sinks."""

    in_dir: Path
    out: Path
    settle_s: float = 2.0
    poll_s: float = 0.5
    batch: int = 8
    heatmaps: tuple[str, ...] = ("png",)
    threshold: float | None = None
    threshold_source: str | None = None
    move_done: Path | None = None
    move_failed: Path | None = None
    name_pattern: str = NAME_PATTERN
    backend: str = "auto"
    model_sha256: str | None = None


def message(row: dict[str, Any]) -> dict[str, Any]:
    """The message of one ledger row, as stdout and MQTT carry it (README: "Run it on the line").

    ``verdict``: OK (decision normal), NG (anomalous), FAILED (not scored; ``error`` says why)
    or NONE (scored, but not decided: no object-score threshold is known, or with --reference the
    decision is "no reference" (no part matched) or "not registered"). ``regions``: the
    MESSAGE_REGIONS largest, ``regions_total`` how many the scan has. ``reference``: with
    --reference, the scan's reference block (btp.runtime.ledger.reference_block), else None."""
    regions = row.get("regions") or []
    if row["status"] != "ok":
        verdict = "FAILED"
    else:
        verdict = {"normal": "OK", "anomalous": "NG"}.get(row.get("decision") or "", "NONE")
    return finite({"verdict": verdict, "part": row.get("part"), "serial": row.get("serial"), "file": row["path"],
            "status": row["status"], "decision": row.get("decision"), "object_score": row.get("object_score"),
            "threshold": row.get("threshold"), "regions": regions[:MESSAGE_REGIONS],
                    "regions_total": len(regions), "error": row.get("error"),
            "sha256": row.get("sha256"), "model_sha256": row.get("model_sha256"), "reference": row.get("reference"),
            "scored_at": row.get("scored_at"), "ledger_id": row.get("id"), "total_ms": row.get("total_ms")})


def stdout_sink(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg, allow_nan=False) + "\n")
    sys.stdout.flush()


def log(text: str) -> None:
    sys.stderr.write(f"btp watch: {text}\n")
    sys.stderr.flush()


@dataclass
class _Seen:
    key: tuple[int, int]
    since: float


@dataclass(kw_only=True)
class Watcher:
    """The service: ``run`` polls IN_DIR until ``stop`` is set; ``poll_once`` is one round (the
    engine stays loaded in ``pipeline``); ``sinks``: channel bit -> a callable that sends a message."""

    pipeline: Any
    options: WatchOptions
    ledger: Ledger
    sinks: dict[int, Sink] = field(default_factory=lambda: {STDOUT: stdout_sink})  # channel bit -> sink
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._pending: dict[Path, _Seen] = {}
        self._unsent_since: float | None = None  # when a flush last left messages unsent
        self._handled: dict[Path, tuple[int, int]] = {}  # files dealt with: path -> (size, mtime_ns)
        o = self.options
        self._skip_dirs = {p.resolve() for p in (o.out, o.move_done, o.move_failed) if p is not None}

    # the folder -------------------------------------------------------------------------------
    def candidates(self) -> list[Path]:
        """Point-cloud files under IN_DIR that are not partial, hidden or in a skipped folder."""
        found = []
        for root, dirs, files in os.walk(self.options.in_dir):
            here = Path(root)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() not in self._skip_dirs)
            for name in sorted(files):
                low = name.lower()
                if name.startswith(".") or low.endswith(PARTIAL_SUFFIXES):
                    continue
                if Path(low).suffix in READ_SUFFIXES:
                    found.append(here / name)
        return found

    def ready(self, now: float | None = None) -> list[tuple[Path, tuple[int, int]]]:
        """Files whose size and modification time held still for the settle time, not yet handled."""
        now = time.monotonic() if now is None else now
        ready, present = [], set()
        for path in self.candidates():
            try:
                st = path.stat()
            except OSError:  # gone between the walk and the stat
                continue
            key = (st.st_size, st.st_mtime_ns)
            present.add(path)
            if self._handled.get(path) == key:
                continue
            seen = self._pending.get(path)
            if seen is None or seen.key != key:
                self._pending[path] = _Seen(key, now)
            elif now - seen.since >= self.options.settle_s:
                ready.append((path, key))
        for gone in set(self._pending) - present:
            del self._pending[gone]
        for gone in set(self._handled) - present:  # moved away or deleted: nothing to remember
            del self._handled[gone]
        return ready

    # one round --------------------------------------------------------------------------------
    def poll_once(self) -> int:
        """Score what is ready (in batches, stopping between batches when asked); -> scans scored."""
        todo = []
        for path, key in self.ready():
            self._pending.pop(path, None)
            if self.ledger.seen(path, *key):
                self._handled[path] = key
                self._move(path, None)  # scored before a crash, not moved yet
                continue
            try:
                version = file_version(path)
            except OSError as exc:
                log(f"{path}: cannot read it ({exc}); trying again at the next poll")
                continue
            if (version[0], version[1]) != key:  # changed while being hashed: not complete after all
                continue
            if self.ledger.seen_content(path, version[2]):
                log(f"{path}: the same bytes as an earlier scan of this path (sha256 {version[2][:12]}...); skipped")
                self._handled[path] = key
                self._move(path, None)
                continue
            tried = self.ledger.attempts(path, version[2])
            if tried >= MAX_ATTEMPTS:
                self._give_up(path, version, tried)
                continue
            todo.append((path, version, tried))
        # a file that was in flight when the service died goes alone, so that it cannot take others down
        chunks = [[(p, v)] for p, v, tried in todo if tried]
        rest = [(p, v) for p, v, tried in todo if not tried]
        step = max(self.options.batch, 1)
        chunks += [rest[i:i + step] for i in range(0, len(rest), step)]
        scored = 0
        for chunk in chunks:
            if self.stop.is_set():
                break
            scored += self._score(chunk)
        return scored

    def _give_up(self, path: Path, version: tuple[int, int, str], tried: int) -> None:
        """Record as failed a file the service died on MAX_ATTEMPTS times (e.g. a reader crash)."""
        o = self.options
        error = (f"ServiceCrash: the service stopped {tried} times while scoring this file (a crash or a kill in "
                 "the reader or the engine); not scored again - check the file, and score it with btp-run")
        outcome = ScanOutcome.failed(file=path, stem="", error=error)
        self.ledger.record(record_from_outcome(outcome, version=version, model=str(self.pipeline.model_path),
                                               model_sha256=o.model_sha256, name_pattern=o.name_pattern))
        self.ledger.end(path, version[2])
        self._handled[path] = (version[0], version[1])
        log(f"{path}: FAILED: {error}")
        self.flush()
        self._move(path, False)

    def _stems(self, paths: list[Path]) -> list[str]:
        """Output names from the path under IN_DIR ("line1/part_7.pcd" -> "line1__part_7"); with the
        extension when that name belongs to another file (ledger or this batch) or is reserved."""
        stems, taken = [], set()
        for path in paths:
            rel = path.relative_to(self.options.in_dir)
            plain = "__".join(rel.with_suffix("").parts)
            full = "__".join(rel.parts)
            stem = plain
            owner = self.ledger.stem_owner(plain)
            if plain.casefold() in taken or plain.casefold() in RESERVED_STEMS or owner not in (None, str(path)):
                stem = full
            taken.add(stem.casefold())
            stems.append(stem)
        return stems

    def _score(self, chunk: list[tuple[Path, tuple[int, int, str]]]) -> int:
        o = self.options
        paths = [p for p, _ in chunk]
        versions = dict(chunk)
        t0 = time.perf_counter()
        for path, version in chunk:
            self.ledger.begin(path, version[2])
        outcomes = run_files(self.pipeline, paths, o.out, batch=len(paths), threshold=o.threshold,
                             threshold_source=o.threshold_source, heatmaps=o.heatmaps, backend=o.backend,
                             stems=self._stems(paths), prefetch=0)
        for oc in outcomes:
            self._commit(oc, versions[oc.file])
            self.ledger.end(oc.file, versions[oc.file][2])
        log(f"{len(outcomes)} scan(s) in {1e3 * (time.perf_counter() - t0):.0f} ms")
        self.flush()
        for oc in outcomes:
            self._move(oc.file, oc.ok)
        return len(outcomes)

    def _commit(self, oc: ScanOutcome, version: tuple[int, int, str]) -> None:
        o = self.options
        self.ledger.record(record_from_outcome(oc, version=version, model=str(self.pipeline.model_path),
                                               model_sha256=o.model_sha256, name_pattern=o.name_pattern))
        self._handled[oc.file] = (version[0], version[1])
        if not oc.ok:
            log(f"{oc.file}: FAILED: {oc.error}")

    def flush(self) -> None:
        """Send each ledger row to every channel that has not taken it yet, in ledger order; a
        channel that fails is left alone for the rest of this flush and its rows are sent at the
        next one (after the next batch, or RESEND_S seconds later when idle). A row's mark of a
        channel is set once the channel took it, so no channel gets a message twice (but for a
        crash between the two)."""
        self._unsent_since = None
        wanted = sum(self.sinks)
        down = 0
        for row in self.ledger.unpublished(wanted):
            msg = message(row)
            for bit, sink in self.sinks.items():
                if row["published"] & bit or down & bit:
                    continue
                try:
                    sink(msg)
                except Exception as exc:  # this channel is down: keep its rows for the next flush
                    log(f"could not send the result of {row['path']} ({exc}); will retry")
                    self._unsent_since = time.monotonic()
                    down |= bit
                    continue
                self.ledger.mark_published(row["id"], bit)

    def _move(self, path: Path, ok: bool | None) -> None:
        """To --move-done / --move-failed, keeping the path under IN_DIR (ok None: look it up)."""
        o = self.options
        if ok is None:
            rows = self.ledger.rows_for(path)
            if not rows:
                return
            ok = rows[-1]["status"] == "ok"
        target_root = o.move_done if ok else o.move_failed
        if target_root is None or not path.exists():
            return
        target = target_root / path.relative_to(o.in_dir)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            stamp, n = time.strftime("%Y%m%dT%H%M%S"), 1
            while target.exists():  # never over an earlier file: name.<time>[-n].ext beside it
                target = target.with_name(f"{path.stem}.{stamp}{'' if n == 1 else f'-{n}'}{path.suffix}")
                n += 1
            shutil.move(str(path), str(target))
        except OSError as exc:
            log(f"{path}: could not move it to {target_root} ({exc}); it stays, and is not scored again")

    # the service ------------------------------------------------------------------------------
    def run(self, *, once: bool = False) -> None:
        """Poll until ``stop`` is set (``once``: until IN_DIR holds nothing left to score)."""
        log(f"watching {self.options.in_dir} (settle {self.options.settle_s:g} s); ledger {self.ledger.location} (station {self.ledger.station}); "
            f"started {utc_now()}")
        self.flush()
        while not self.stop.is_set():
            scored = self.poll_once()
            if once and not scored and not self._pending:
                break
            if not scored:
                if self._unsent_since is not None and time.monotonic() - self._unsent_since >= RESEND_S:
                    self.flush()
                self.stop.wait(self.options.poll_s)
        log("stopped")


def stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM / SIGINT set ``stop`` (the batch in flight finishes); a second one exits at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        log(f"{signal.Signals(signum).name}: finishing the scans in flight, then stopping")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
