"""The results ledger: one row per scored (or failed) scan, kept across runs and restarts.

    ledger = Ledger(OUT / "ledger.sqlite")          # SQLite, WAL mode: readers never block the writer
    ledger = Ledger("postgresql://user@host/db")    # or PostgreSQL, for several stations in one database
    ledger.seen(path, size, mtime_ns)               # cheap check before hashing the file
    ledger.record(ScanRecord(...))                  # once per file version; a repeat is ignored
    ledger.rows(since="2026-12-07T06:00")           # -> list of dicts, oldest first
    ledger.export("csv" | "json", since=...)        # for MES: `btp ledger export`

A file version is (station, path, size, mtime_ns, sha256): the row's unique key, so a service
restarted after a crash skips every scan already in the ledger and scores the rest; ``station``
(default: the host name) keeps the files of stations that share a PostgreSQL database apart. ``published`` marks the
channels (bits) that took the row's message (stdout, MQTT); a row a crash or a broker outage left
unsent on a channel is sent there again later, and only there. Torch-free; Python's own sqlite3,
or psycopg (the ``line`` extra) for PostgreSQL. The SQL is the dialect both speak (ON CONFLICT,
RETURNING); only the placeholders, the id column and SQLite's pragmas differ.
"""
from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from btp.errors import BTPError
from btp.runtime.outcome import ScanOutcome

LEDGER_NAME = "ledger.sqlite"
EXPORT_FORMATS = ("csv", "json")
# part and serial from the file name (without its extension): the serial is the last
# "_"-separated token, the part everything before it, e.g. "bracket-left_SN00042" -> part
# "bracket-left", serial "SN00042". A name that does not match: no part, the whole name as serial.
NAME_PATTERN = r"^(?P<part>.+)_(?P<serial>[^_]+)$"

_COLUMNS = (
    ("station", "TEXT NOT NULL"), ("path", "TEXT NOT NULL"), ("size", "BIGINT"), ("mtime_ns", "BIGINT"),
    ("sha256", "TEXT"), ("stem", "TEXT"), ("part", "TEXT"), ("serial", "TEXT"), ("model", "TEXT"),
    ("model_sha256", "TEXT"), ("reference", "TEXT"), ("status", "TEXT NOT NULL"),
    ("object_score", "DOUBLE PRECISION"), ("decision", "TEXT"), ("threshold", "DOUBLE PRECISION"),
    ("threshold_source", "TEXT"), ("points", "BIGINT"), ("regions", "TEXT"), ("timings", "TEXT"),
    ("total_ms", "DOUBLE PRECISION"), ("error", "TEXT"), ("scored_at", "TEXT NOT NULL"),
    ("published", "BIGINT NOT NULL DEFAULT 0"),
)
_KEY = ("station", "path", "size", "mtime_ns", "sha256")
URL_PREFIXES = ("postgresql://", "postgres://")
JSON_COLUMNS = ("regions", "timings", "reference")  # held as JSON text
FIELDS = ("id",) + tuple(name for name, _ in _COLUMNS)


class LedgerError(BTPError):
    """The ledger cannot be opened or read (the message names the file and the fix)."""


@dataclass(frozen=True, kw_only=True)
class ScanRecord:
    """One row of the ledger. ``regions``: the scan's defect regions (btp.runtime.regions, as
    dicts); ``timings``: ms per stage; ``status``: "ok" or "failed" (then ``error`` says why);
    ``reference``: with a part's reference (btp-run / btp watch --reference), the scan's reference
    block (``reference_block``: part, route, registration fitness, fused and reference scores,
    deviation in scan units, the part's threshold and decision, the model's zero-shot score);
    ``part`` is then the part the scan was routed to, ``object_score``, ``decision`` and
    ``threshold`` are the part's."""

    path: str
    status: str
    station: str | None = None  # None: the ledger's own station
    size: int | None = None
    mtime_ns: int | None = None
    sha256: str | None = None
    stem: str | None = None
    part: str | None = None
    serial: str | None = None
    model: str | None = None
    model_sha256: str | None = None
    reference: dict[str, Any] | None = None
    object_score: float | None = None
    decision: str | None = None
    threshold: float | None = None
    threshold_source: str | None = None
    points: int | None = None
    regions: list[dict[str, Any]] | None = None
    timings: dict[str, float] | None = None
    total_ms: float | None = None
    error: str | None = None
    scored_at: str | None = None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def part_and_serial(path: str | Path, pattern: str = NAME_PATTERN) -> tuple[str | None, str]:
    """(part, serial) from the file name without its extension by ``pattern`` (a regular
    expression with the named groups ``part`` and ``serial``; see NAME_PATTERN)."""
    stem = Path(path).name.split(".")[0] or Path(path).name
    m = re.match(pattern, stem)
    if m is None:
        return None, stem
    groups = m.groupdict()
    return groups.get("part"), groups.get("serial") or stem


def check_name_pattern(pattern: str) -> str:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise LedgerError(f"--name-pattern {pattern!r} is not a regular expression ({exc})") from None
    if "serial" not in compiled.groupindex:
        raise LedgerError(f"--name-pattern {pattern!r} has no (?P<serial>...) group; add one "
                          "(and optionally (?P<part>...))")
    return pattern


def parse_since(text: str | None) -> str | None:
    """An ISO date or date-time (UTC unless it says otherwise) -> the ledger's time format."""
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise LedgerError(f"--since {text!r}: give an ISO date or time, e.g. 2026-12-07 or 2026-12-07T06:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_url(where: str | Path) -> bool:
    return str(where).startswith(URL_PREFIXES)


def _masked(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


class Ledger:
    """The ledger at ``where``: an SQLite file (created with its folder if missing) or a
    PostgreSQL URL (``postgresql://user[:password]@host[:port]/database``; the table is created
    if missing). ``station``: this station's name in the rows (default: the host name)."""

    def __init__(self, where: str | Path, *, station: str | None = None, timeout_s: float = 30.0) -> None:
        import socket

        self.station = station or socket.gethostname()
        self.postgres = is_url(where)
        self.location = _masked(str(where)) if self.postgres else str(where)
        self.path = None if self.postgres else Path(where)
        self._lock = threading.Lock()
        columns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
        if self.postgres:
            self._open_postgres(str(where), columns, timeout_s)
        else:
            self._open_sqlite(columns, timeout_s)

    def _open_sqlite(self, columns: str, timeout_s: float) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # one connection, used from the writer thread of btp.runtime.run too: calls take self._lock
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._execute("PRAGMA journal_mode=WAL")
            self._execute("PRAGMA synchronous=FULL")  # a committed row survives a power cut
            self._create(f"id INTEGER PRIMARY KEY, {columns}")
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {self.path}: cannot open it as an SQLite database ({exc}); give another "
                              "file with --ledger, or move this one away") from None

    def _open_postgres(self, url: str, columns: str, timeout_s: float) -> None:
        try:
            import psycopg
            from psycopg.rows import dict_row
        except ImportError:
            raise LedgerError("a PostgreSQL ledger needs psycopg: pip install 'btp-edge[line]'") from None
        try:
            self._db = psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=int(timeout_s))
            with self._lock:  # two stations starting at once: one creates the table, the other waits
                self._db.execute("SELECT pg_advisory_lock(7433001)")
                try:
                    self._create(f"id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, {columns}", locked=True)
                finally:
                    self._db.execute("SELECT pg_advisory_unlock(7433001)")
        except psycopg.Error as exc:
            raise LedgerError(f"ledger {self.location}: cannot use this PostgreSQL database "
                              f"({str(exc).strip().splitlines()[0]}); check the URL given to --ledger, the server "
                              "and the user's rights (CREATE TABLE on first use)") from None

    def _create(self, columns: str, locked: bool = False) -> None:
        run = (lambda sql: self._db.execute(sql)) if locked else self._execute
        run(f"CREATE TABLE IF NOT EXISTS scans ({columns}, UNIQUE ({', '.join(_KEY)}))")
        run("CREATE INDEX IF NOT EXISTS scans_path_sha ON scans (station, path, sha256)")
        run("CREATE INDEX IF NOT EXISTS scans_time ON scans (scored_at)")
        # the files being scored: a file still here after a restart was in flight when the service died
        run("CREATE TABLE IF NOT EXISTS inflight (station TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, "
            "attempts BIGINT NOT NULL, PRIMARY KEY (station, path, sha256))")

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.postgres else sql

    def _execute(self, sql: str, params=()):
        with self._lock:
            return self._db.execute(self._sql(sql), params)

    def _query(self, sql: str, params=()) -> list:
        with self._lock:
            return self._db.execute(self._sql(sql), params).fetchall()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def seen(self, path: str | Path, size: int, mtime_ns: int) -> bool:
        """Whether this station's ledger holds this path with this size and modification time."""
        return bool(self._query("SELECT 1 FROM scans WHERE station = ? AND path = ? AND size = ? AND mtime_ns = ? "
                                "LIMIT 1", (self.station, str(path), size, mtime_ns)))

    def seen_content(self, path: str | Path, sha256: str) -> bool:
        """Whether this station's ledger holds this path with these bytes (the same file delivered again)."""
        return bool(self._query("SELECT 1 FROM scans WHERE station = ? AND path = ? AND sha256 = ? LIMIT 1",
                                (self.station, str(path), sha256)))

    def stem_owner(self, stem: str) -> str | None:
        """The path of this station's latest scan whose outputs are named ``stem``, if any."""
        rows = self._query("SELECT path FROM scans WHERE station = ? AND stem = ? ORDER BY id DESC LIMIT 1",
                           (self.station, stem))
        return rows[0]["path"] if rows else None

    def record(self, rec: ScanRecord, *, replace: bool = False) -> int | None:
        """Insert ``rec``; -> its row id, or None when this file version was in the ledger already
        (``replace``: overwrite that row instead, e.g. a deliberate `btp-run --ledger` re-run)."""
        from btp.runtime.strict_json import finite

        values = finite(asdict(rec))  # NaN / inf -> NULL
        values["station"] = values["station"] or self.station
        values["scored_at"] = values["scored_at"] or utc_now()
        for key in JSON_COLUMNS:
            values[key] = None if values[key] is None else json.dumps(values[key], allow_nan=False,
                                                                      default=_plain)
        names = [name for name, _ in _COLUMNS if name != "published"]
        if replace:
            update = ", ".join(f"{n} = excluded.{n}" for n in names if n not in _KEY)
            action = f"DO UPDATE SET {update}, published = 0"
        else:
            action = "DO NOTHING"
        rows = self._query(f"INSERT INTO scans ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                           f"ON CONFLICT ({', '.join(_KEY)}) {action} RETURNING id", [values[n] for n in names])
        return rows[0]["id"] if rows else None

    def attempts(self, path: str | Path, sha256: str) -> int:
        """How often this station started scoring this file without finishing it (a crash, a kill)."""
        rows = self._query("SELECT attempts FROM inflight WHERE station = ? AND path = ? AND sha256 = ?",
                           (self.station, str(path), sha256))
        return int(rows[0]["attempts"]) if rows else 0

    def begin(self, path: str | Path, sha256: str) -> None:
        """This file is being scored (one more attempt; ``end`` clears it once its row is in)."""
        self._execute("INSERT INTO inflight (station, path, sha256, attempts) VALUES (?, ?, ?, 1) "
                      "ON CONFLICT (station, path, sha256) DO UPDATE SET attempts = inflight.attempts + 1",
                      (self.station, str(path), sha256))

    def end(self, path: str | Path, sha256: str) -> None:
        self._execute("DELETE FROM inflight WHERE station = ? AND path = ? AND sha256 = ?",
                      (self.station, str(path), sha256))

    def mark_published(self, row_id: int, channels: int) -> None:
        """Add ``channels`` (bits: btp.runtime.watch's STDOUT, MQTT) to the row's sent marks."""
        self._execute("UPDATE scans SET published = published | ? WHERE id = ?", (channels, row_id))

    def unpublished(self, channels: int) -> list[dict[str, Any]]:
        """This station's rows not yet sent to every one of ``channels`` (bits), oldest first."""
        return [_decode(r) for r in self._query("SELECT * FROM scans WHERE station = ? AND (published & ?) != ? "
                                                "ORDER BY id", (self.station, channels, channels))]

    def rows(self, since: str | None = None) -> list[dict[str, Any]]:
        """Every row of every station (``since``: scored at or after this ISO time, see
        parse_since), oldest first."""
        if since is None:
            cur = self._query("SELECT * FROM scans ORDER BY id")
        else:
            cur = self._query("SELECT * FROM scans WHERE scored_at >= ? ORDER BY id", (parse_since(since),))
        return [_decode(r) for r in cur]

    def rows_for(self, path: str | Path) -> list[dict[str, Any]]:
        """This station's rows of one path, oldest first."""
        return [_decode(r) for r in self._query("SELECT * FROM scans WHERE station = ? AND path = ? ORDER BY id",
                                                (self.station, str(path)))]

    def export(self, fmt: str, since: str | None = None) -> str:
        """The rows as CSV (regions and timings as JSON text in their cells) or as a JSON array."""
        if fmt not in EXPORT_FORMATS:
            raise LedgerError(f"--format {fmt!r}: choose csv or json")
        rows = self.rows(since)
        if fmt == "json":
            return json.dumps(rows, indent=1) + "\n"
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
        return buf.getvalue()


def open_existing(path: str | Path) -> Ledger:
    """A ledger that must exist already (readers: export, report); a folder means its ledger.sqlite;
    a PostgreSQL URL its database."""
    if is_url(path):
        return Ledger(str(path))
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER_NAME
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}: give the file `btp watch` or `btp-run --ledger` wrote "
                          f"(by default OUT/{LEDGER_NAME})")
    return Ledger(path)


def _decode(row) -> dict[str, Any]:
    d = dict(row)
    for key in JSON_COLUMNS:
        if d.get(key) is not None:
            d[key] = json.loads(d[key])
    return d


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def file_version(path: str | Path) -> tuple[int, int, str]:
    """(size, mtime_ns, sha256) of a file: the key that tells one delivered file from another."""
    from btp.io.files import file_sha256

    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns, file_sha256(path)


def reference_block(outcome: ScanOutcome) -> dict[str, Any] | None:
    """The ledger's and the messages' ``reference`` of a scan: its ``reference`` document
    (btp.runtime.outcome.ReferenceCheck) and the model's own ``zero_shot_score``; None without a reference."""
    if outcome.reference is None:
        return None
    return {**outcome.document()["reference"], "zero_shot_score": outcome.zero_shot_score}


def record_from_outcome(outcome: ScanOutcome, *, version: tuple[int, int, str] | None, model: str | None = None,
                        model_sha256: str | None = None, name_pattern: str = NAME_PATTERN,
                        path: str | Path | None = None) -> ScanRecord:
    """A ledger row from one scan's ``ScanOutcome`` (btp.runtime.outcome) and the file's
    ``version`` (file_version; None if unreadable); ``path``: the path to record (default: the
    outcome's file as given). Part and serial come from the file name by ``name_pattern``; a scan
    routed to a part's reference takes that part (the one whose threshold decided)."""
    path = str(path if path is not None else outcome.file)
    part, serial = part_and_serial(path, name_pattern)
    reference = reference_block(outcome)
    if reference is not None and reference.get("part"):
        part = reference["part"]
    size, mtime_ns, sha256 = version if version is not None else (None, None, None)
    common = dict(path=path, size=size, mtime_ns=mtime_ns, sha256=sha256, stem=outcome.stem or None, part=part,
                  serial=serial, model=model, model_sha256=model_sha256, reference=reference)
    if not outcome.ok:
        return ScanRecord(status="failed", error=outcome.error, **common)
    threshold = outcome.threshold
    return ScanRecord(status="ok", object_score=outcome.object_score, decision=outcome.decision,
                      threshold=None if threshold is None else threshold.value,
                      threshold_source=None if threshold is None else threshold.source, points=outcome.points,
                      regions=[dict(r) for r in outcome.regions], timings=dict(outcome.timings_ms),
                      total_ms=outcome.total_ms, **common)
