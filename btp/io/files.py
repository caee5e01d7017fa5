"""File helpers shared by every stage: atomic writes and content hashes.

``atomic_write_bytes``: every output of btp (point clouds, scores, JSON, model.onnx) goes through it.

The payload is written to a temporary file in the target's folder, flushed to disk, then renamed
over the target: after a crash or Ctrl-C there is either the complete old file, the complete new
one, or nothing - never a half-written file. Only a kill -9 (or a power cut) during a write
leaves the temporary file ``.<name>.<pid>-XXXXXXXX.tmp``; ``remove_stale_temps`` deletes those
whose writer is gone (btp-run calls it on its output folder at start).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path


TEMP_SUFFIX = ".tmp"
# the writer's temp files: ".<target name>.<pid>-<mkstemp's 8 characters>.tmp"
_TEMP_NAME = re.compile(r"^\..+\.(?P<pid>\d+)-[a-z0-9_]{8}\.tmp$")
STALE_TEMP_SECONDS = 24 * 3600


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give a new file (mkstemp gives 0600)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` atomically (temp file + fsync + ``os.replace``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files ``atomic_write_bytes`` left in ``folder`` (not below it) when its
    process was killed: those whose writing process no longer runs, or older than a day (a pid
    reused since). Other files, and temp files of a live writer, are left alone. -> the removed paths."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or not entry.is_file():
            continue
        try:
            stale = not _running(int(match["pid"])) or time.time() - entry.stat().st_mtime > STALE_TEMP_SECONDS
            if stale:
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue  # gone already, or not ours to delete
    return removed


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid this system knows: keep the file
    return True


BENIGN_TAIL_BYTES = 16


def benign_tail(raw, start: int) -> bool:
    """True when the bytes of ``raw`` from ``start`` on (after a binary payload) are only a little
    whitespace - a final newline or CRLF, as some writers add and open3d and PCL accept: at most
    BENIGN_TAIL_BYTES of them."""
    return len(raw) - start <= BENIGN_TAIL_BYTES and not bytes(raw[start:]).strip(b" \t\r\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 hex of a file's bytes (model hashes in metadata, calibration sidecars, engine caches)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
