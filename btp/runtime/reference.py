"""The ``.btpref`` file: one part's reference (template, feature bank, good-scan statistics). Torch-free.

Layout (no pickle anywhere):

    b"BTPREF\\n\\x00"   8 bytes, magic
    uint64 LE         length of the header
    header            UTF-8 JSON (below)
    payload           an .npz archive of plain numeric arrays, read with allow_pickle=False

    header = {"format": "btp-reference", "format_version": 1,
              "name": PART, "created_at": ISO time,
              "model": {"sha256", "name", "weights_sha256"},   # the model.onnx it was built with
              "sources": [{"file", "sha256", "points"}],        # the good scans (and the CAD model)
              "settings": {...},                                # btp.runtime.guided.Settings
              "statistics": {...}, "threshold": {...},          # from the good scans, leave-one-out
              "arrays": {name: {"shape", "dtype"}},             # what the payload must hold
              "sha256": hex}                                    # of the rest of the header + payload

``read_reference`` refuses a file whose header (without ``sha256``) and payload do not hash to
``sha256`` (edited or truncated: a changed threshold is refused as a changed array is), whose arrays differ in name, shape or dtype from the header, or that holds an
object array; ``check_model`` refuses a reference built for another model file.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from btp.errors import BTPError
from btp.io.files import atomic_write_bytes

MAGIC = b"BTPREF\n\x00"
FORMAT = "btp-reference"
FORMAT_VERSION = 1
SUFFIX = ".btpref"
MAX_HEADER_BYTES = 16 << 20
ARRAY_DTYPES = ("float32", "float64", "int64", "int32", "uint8", "bool")
REQUIRED_ARRAYS = ("template", "template_normals", "bank")


class ReferenceError(BTPError, ValueError):
    """A reference file that cannot be used; the message names the file and the fix."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, kw_only=True)
class Reference:
    """A part's reference as read from (or about to be written to) a ``.btpref`` file.

    name        the part's name (routing matches it against folders and file names)
    header      the JSON header (model, sources, settings, statistics, threshold)
    arrays      {"template": float32 [T,3], "template_normals": float32 [T,3], "bank": float32 [B,F], ...}
    path        the file it was read from (None before it is written)
    """

    name: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return self.header["settings"]

    @property
    def statistics(self) -> dict[str, Any]:
        return self.header["statistics"]

    @property
    def threshold(self) -> float:
        return float(self.header["threshold"]["value"])

    @property
    def model_sha256(self) -> str:
        return str(self.header["model"]["sha256"])


def _payload(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def _array_spec(a: np.ndarray) -> dict[str, Any]:
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def encode_reference(ref: Reference) -> bytes:
    """The file's bytes (header completed with ``arrays``, ``sha256``, ``format``)."""
    for key, a in ref.arrays.items():
        if str(a.dtype) not in ARRAY_DTYPES:
            raise ValueError(f"reference array {key!r} has dtype {a.dtype}; allowed: {ARRAY_DTYPES}")
    payload = _payload(ref.arrays)
    header = {k: v for k, v in ref.header.items() if k != "sha256"}
    header.update(format=FORMAT, format_version=FORMAT_VERSION, name=ref.name,
                  arrays={k: _array_spec(v) for k, v in ref.arrays.items()})
    header["sha256"] = content_sha256(header, payload)
    head = json.dumps(header, indent=1, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(head)) + head + payload


def content_sha256(header: dict[str, Any], payload: bytes) -> str:
    """sha256 over the header (without its ``sha256`` entry, as canonical JSON) and the payload."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    digest.update(payload)
    return digest.hexdigest()


def write_reference(path: str | Path, ref: Reference) -> Path:
    """Write ``ref`` atomically to ``path`` (``.btpref``)."""
    return atomic_write_bytes(path, encode_reference(ref))


def read_reference(path: str | Path) -> Reference:
    """Read and validate a ``.btpref`` file (see the module docstring for what is refused)."""
    path = Path(path)
    fix = "rebuild it with `btp reference build --model MODEL.onnx --out PART.btpref GOOD_SCANS...`"
    if not path.is_file():
        raise ReferenceError(path, f"no such reference file; {fix}")
    data = path.read_bytes()
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
        raise ReferenceError(path, f"not a btp reference file (no {FORMAT} header); {fix}")
    (head_len,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    start = len(MAGIC) + 8
    if head_len > MAX_HEADER_BYTES or start + head_len > len(data):
        raise ReferenceError(path, f"the header length {head_len} does not fit the file (truncated?); {fix}")
    try:
        header = json.loads(data[start:start + head_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReferenceError(path, f"the header is not JSON ({exc}); {fix}") from exc
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ReferenceError(path, f"the header is not a {FORMAT} document; {fix}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise ReferenceError(path, f"format_version {header.get('format_version')} is newer than this btp-edge "
                                   f"reads ({FORMAT_VERSION}): upgrade btp-edge")
    for key in ("name", "model", "settings", "statistics", "threshold", "arrays", "sha256", "sources"):
        if key not in header:
            raise ReferenceError(path, f"the header has no {key!r}; {fix}")
    payload = data[start + head_len:]
    if content_sha256(header, payload) != header["sha256"]:
        raise ReferenceError(path, "its content does not match its sha256: the file was modified or truncated "
                                   f"after it was built; {fix}")
    arrays = _load_arrays(path, payload, header["arrays"], fix)
    return Reference(name=str(header["name"]), header=header, arrays=arrays, path=path)


def _load_arrays(path: Path, payload: bytes, spec: dict, fix: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, KeyError) as exc:  # ValueError: an object array (pickle refused)
        raise ReferenceError(path, f"the payload cannot be read as plain arrays ({exc}); {fix}") from exc
    if set(arrays) != set(spec) or not set(REQUIRED_ARRAYS) <= set(arrays):
        raise ReferenceError(path, f"the payload holds arrays {sorted(arrays)}, the header names {sorted(spec)} "
                                   f"(required: {list(REQUIRED_ARRAYS)}); {fix}")
    for key, a in arrays.items():
        want = spec[key]
        if str(a.dtype) not in ARRAY_DTYPES or _array_spec(a) != {"shape": list(want["shape"]),
                                                                  "dtype": str(want["dtype"])}:
            raise ReferenceError(path, f"array {key!r} is {a.dtype} {list(a.shape)}, the header says "
                                       f"{want.get('dtype')} {want.get('shape')}; {fix}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ReferenceError(path, f"array {key!r} holds NaN or inf values; {fix}")
    return arrays


def check_model(ref: Reference, model_sha256: str, model_path: str | Path) -> None:
    """Refuse a reference that was built with another model file."""
    if ref.model_sha256 != model_sha256:
        built = ref.header["model"].get("name", "?")
        raise ReferenceError(ref.path or Path("<reference>"),
                             f"built for another model ({built}, sha256 {ref.model_sha256[:12]}...), not for "
                             f"{model_path} (sha256 {model_sha256[:12]}...): rebuild it with `btp reference build "
                             f"--model {model_path} ...`, or run the model it was built for")


# ---- several parts on one line ---------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """Which reference a scan goes to: ``part`` (None: no part matched) and the rule that matched."""

    part: str | None
    rule: str


def read_references(source: str | Path) -> dict[str, Reference]:
    """``--reference``: one ``.btpref`` file, or a folder of them (one per part) -> {part name: Reference}.
    Two files naming the same part are refused (the route would be ambiguous)."""
    source = Path(source)
    files = sorted(source.glob(f"*{SUFFIX}")) if source.is_dir() else [source]
    if source.is_dir() and not files:
        raise ReferenceError(source, f"no {SUFFIX} files in this folder; build one per part with "
                                     "`btp reference build --name PART ...`")
    refs: dict[str, Reference] = {}
    for f in files:
        ref = read_reference(f)
        if ref.name in refs:
            raise ReferenceError(f, f"part {ref.name!r} already comes from {refs[ref.name].path}: give each "
                                    "reference its own --name")
        refs[ref.name] = ref
    return refs


ROUTING_RULE = ("a folder of the scan's path named PART, else a file name PART, PART_*, PART-*, PART.* "
                "(the longest matching part name wins); with a single reference every scan goes to it")


def route(path: str | Path | None, parts) -> Route:
    """The part of a scan by its path (ROUTING_RULE); names compare case-insensitively."""
    names = sorted(parts, key=len, reverse=True)
    if len(names) == 1:
        return Route(names[0], "single reference")
    if path is None:
        return Route(None, "no file path to route by")
    p = Path(path)
    folders = [d.casefold() for d in p.parent.parts]
    for name in names:
        if name.casefold() in folders:
            return Route(name, f"folder {name}")
    stem = p.name.casefold()
    for name in names:
        n = name.casefold()
        if stem == n or any(fnmatch.fnmatchcase(stem, f"{n}{sep}*") for sep in ("_", "-", ".")):
            return Route(name, f"file name {name}*")
    return Route(None, f"no part matched (parts: {', '.join(sorted(parts))}; rule: {ROUTING_RULE})")
