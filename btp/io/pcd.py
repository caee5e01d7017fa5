"""PCL ``.pcd`` files: header parsing, ascii / binary / binary_compressed data, binary writer.

Why our own parser and not only open3d: open3d returns an *empty* cloud for a truncated file
without a word, and it drops fields it does not know (``label``). We parse the header ourselves,
check the byte count it announces against the file, and read every field with numpy:

- ``DATA ascii``: rows of text, one value per field component.
- ``DATA binary``: little-endian records, ``point_step = sum(SIZE * COUNT)`` bytes each; after
  them only a little whitespace (a final newline, as some writers add) may follow.
- ``DATA binary_compressed``: ``uint32 compressed_size, uint32 uncompressed_size`` then an LZF
  block; once inflated the fields are stored one after the other (all ``x``, then all ``y``...).

Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from btp.io.errors import MalformedFileError, TruncatedFileError
from btp.io.files import benign_tail

_PCD_NUMPY_TYPES = {
    ("F", 4): "<f4", ("F", 8): "<f8",
    ("I", 1): "<i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8",
    ("U", 1): "<u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8",
}
_MAX_HEADER_LINES = 64


@dataclass(frozen=True, kw_only=True)
class PCDHeader:
    """What a PCD header says. ``data_offset`` = byte index of the first data byte."""

    fields: tuple[str, ...]
    sizes: tuple[int, ...]
    types: tuple[str, ...]
    counts: tuple[int, ...]
    width: int
    height: int
    points: int
    data: str  # "ascii" | "binary" | "binary_compressed"
    data_offset: int

    @property
    def point_step(self) -> int:
        return sum(s * c for s, c in zip(self.sizes, self.counts))

    def numpy_dtype(self, path: Path) -> np.dtype:
        """Structured little-endian record dtype; ``_`` padding fields get unique names."""
        names, formats = [], []
        for i, (name, size, typ, count) in enumerate(zip(self.fields, self.sizes, self.types, self.counts)):
            try:
                base = _PCD_NUMPY_TYPES[(typ, size)]
            except KeyError:
                raise MalformedFileError(path, f"PCD field {name!r} has TYPE {typ} SIZE {size}, "
                                               "which no PCD reader understands") from None
            names.append(name if name != "_" and name not in names else f"_pad{i}")
            formats.append(base if count == 1 else (base, (count,)))
        return np.dtype({"names": names, "formats": formats})


def read_header(path: Path, raw: bytes) -> PCDHeader:
    """Parse the header at the start of ``raw`` (the whole file's bytes)."""
    entries: dict[str, list[str]] = {}
    offset = 0
    for _ in range(_MAX_HEADER_LINES):
        end = raw.find(b"\n", offset)
        if end < 0:
            if raw[offset:].strip().upper().startswith(b"DATA"):
                end = len(raw)  # "DATA ascii" with no newline and no points
            else:
                raise TruncatedFileError(path, "the PCD header ends before its DATA line")
        line = raw[offset:end].decode("ascii", errors="replace").strip()
        offset = min(end + 1, len(raw))
        if not line or line.startswith("#"):
            continue
        key, *values = line.split()
        entries[key.upper()] = values
        if key.upper() == "DATA":
            break
    else:
        raise MalformedFileError(path, f"no DATA line in the first {_MAX_HEADER_LINES} lines: not a PCD file?")

    def ints(key: str, default: list[int] | None = None) -> list[int]:
        if key not in entries:
            if default is None:
                raise MalformedFileError(path, f"the PCD header has no {key} line")
            return default
        try:
            values = [int(v) for v in entries[key]]
        except ValueError:
            raise MalformedFileError(path, f"the PCD header's {key} line is not integers: {entries[key]}") from None
        if not values:
            raise MalformedFileError(path, f"the PCD header's {key} line has no value: re-export the file")
        return values

    fields = tuple(entries.get("FIELDS", []))
    if not fields:
        raise MalformedFileError(path, "the PCD header has no FIELDS line")
    sizes = tuple(ints("SIZE"))
    types = tuple(t.upper() for t in entries.get("TYPE", []))
    counts = tuple(ints("COUNT", [1] * len(fields)))
    if not (len(fields) == len(sizes) == len(types) == len(counts)):
        raise MalformedFileError(path, f"the PCD header lists {len(fields)} FIELDS but {len(sizes)} SIZE, "
                                       f"{len(types)} TYPE and {len(counts)} COUNT entries")
    empty = [name for name, count in zip(fields, counts) if count < 1]
    if empty:
        raise MalformedFileError(path, f"the PCD header gives field(s) {' '.join(empty)} COUNT < 1; every field "
                                       "needs COUNT 1 or more: re-export the file")
    vectors = [f"{axis} (COUNT {count})" for axis, count in zip(fields, counts) if axis in "xyz" and count != 1]
    if vectors:
        raise MalformedFileError(path, f"the PCD field(s) {', '.join(vectors)} hold several values per point; x, y "
                                       "and z must be one number each (COUNT 1): re-export the file")
    width = ints("WIDTH")[0]
    height = ints("HEIGHT", [1])[0]
    points = ints("POINTS", [width * height])[0]
    if width < 0 or height < 0 or points < 0:
        raise MalformedFileError(path, f"the PCD header declares WIDTH {width}, HEIGHT {height}, POINTS {points}: "
                                       "counts must not be negative")
    if points != width * height:
        raise MalformedFileError(path, f"the PCD header declares POINTS {points} but WIDTH x HEIGHT = "
                                       f"{width} x {height} = {width * height}: re-export the file")
    data = entries["DATA"][0].lower() if entries["DATA"] else ""
    if data not in ("ascii", "binary", "binary_compressed"):
        raise MalformedFileError(path, f"PCD DATA {data!r}: expected ascii, binary or binary_compressed")
    missing_xyz = [axis for axis in "xyz" if axis not in fields]
    if missing_xyz:
        raise MalformedFileError(path, f"the PCD has no {'/'.join(missing_xyz)} field (FIELDS {' '.join(fields)})")
    return PCDHeader(fields=fields, sizes=sizes, types=types, counts=counts, width=width, height=height,
                     points=points, data=data, data_offset=offset)


def read_records(path: Path, raw: bytes, header: PCDHeader) -> np.ndarray:
    """All points as a structured array ``[points]`` with ``header.numpy_dtype`` records."""
    dtype = header.numpy_dtype(path)
    n = header.points
    if header.data == "binary":
        need = n * dtype.itemsize
        have = len(raw) - header.data_offset
        if have < need:
            raise TruncatedFileError(
                path, f"binary PCD announces {n} points ({need} bytes of data) but only {have} bytes follow "
                      f"the header ({have // max(dtype.itemsize, 1)} whole points): re-copy the file")
        if have > need and not benign_tail(raw, header.data_offset + need):
            raise MalformedFileError(
                path, f"binary PCD announces {n} points ({need} bytes of data) but {have} bytes follow the header "
                      f"({have - need} more): the header does not describe the data; re-export the file")
        return np.frombuffer(raw, dtype=dtype, count=n, offset=header.data_offset).copy()
    if header.data == "binary_compressed":
        return _read_compressed(path, raw, header, dtype)
    return _read_ascii(path, raw, header, dtype)


def _read_ascii(path: Path, raw: bytes, header: PCDHeader, dtype: np.dtype) -> np.ndarray:
    columns = sum(header.counts)
    text = raw[header.data_offset:].decode("ascii", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    n = header.points
    if len(lines) < n:
        raise TruncatedFileError(path, f"ascii PCD announces {n} points but holds {len(lines)} rows: re-copy the file")
    lines = lines[:n]
    if n and len(lines[-1].split()) != columns:
        raise TruncatedFileError(path, f"the last ascii PCD row has {len(lines[-1].split())} values, "
                                       f"expected {columns}: the file was cut off")
    try:
        values = np.loadtxt(lines, dtype=np.float64, ndmin=2) if n else np.zeros((0, columns))
    except ValueError as err:
        raise MalformedFileError(path, f"ascii PCD rows do not parse as {columns} numbers: {err}") from None
    if values.shape[1] != columns:
        raise MalformedFileError(path, f"ascii PCD rows have {values.shape[1]} values, header says {columns}")
    records = np.zeros(n, dtype=dtype)
    col = 0
    for name, count, typ, size in zip(dtype.names, header.counts, header.types, header.sizes):
        block = values[:, col:col + count]
        col += count
        if name in ("rgb", "rgba") and count == 1 and size == 4:
            # PCL and open3d write packed colour in ascii as the uint32 integer even for TYPE F;
            # other writers print the float whose bits are 0x00RRGGBB (a tiny denormal).
            packed = block[:, 0]
            if np.all(np.isfinite(packed)) and np.array_equal(packed, np.rint(packed)) and (packed >= 0).all():
                bits = packed.astype(np.uint32)
            else:
                bits = packed.astype(np.float32).view(np.uint32)
            records[name] = bits.view(np.float32) if typ == "F" else bits
            continue
        records[name] = block[:, 0] if count == 1 else block
    return records


def _read_compressed(path: Path, raw: bytes, header: PCDHeader, dtype: np.dtype) -> np.ndarray:
    start = header.data_offset
    if len(raw) < start + 8:
        raise TruncatedFileError(path, "binary_compressed PCD ends before its size words: re-copy the file")
    compressed_size, uncompressed_size = np.frombuffer(raw, dtype="<u4", count=2, offset=start)
    compressed_size, uncompressed_size = int(compressed_size), int(uncompressed_size)
    expected = header.points * dtype.itemsize
    if uncompressed_size != expected:
        raise MalformedFileError(path, f"binary_compressed PCD: uncompressed size {uncompressed_size} bytes, "
                                       f"but {header.points} points x {dtype.itemsize} bytes = {expected}")
    have = len(raw) - start - 8
    if have < compressed_size:
        raise TruncatedFileError(path, f"binary_compressed PCD announces {compressed_size} compressed bytes but "
                                       f"only {have} follow: re-copy the file")
    block = raw[start + 8:start + 8 + compressed_size]
    try:
        inflated = lzf_decompress(block, uncompressed_size)
    except ValueError as err:
        raise MalformedFileError(path, f"binary_compressed PCD: corrupt LZF data ({err})") from None
    # Column-major: all values of field 0 for every point, then field 1, ...
    records = np.zeros(header.points, dtype=dtype)
    offset = 0
    for name in dtype.names:
        field_dtype = dtype.fields[name][0]
        nbytes = field_dtype.itemsize * header.points
        base, shape = (field_dtype.base, field_dtype.shape)
        column = np.frombuffer(inflated, dtype=base, count=header.points * int(np.prod(shape, dtype=int)),
                               offset=offset)
        records[name] = column.reshape((header.points, *shape)) if shape else column
        offset += nbytes
    return records


def lzf_decompress(data: bytes, expected_size: int) -> bytes:
    """Inflate one LZF block (liblzf's format, as PCL writes it) to exactly ``expected_size`` bytes.

    Control byte ``c``: ``c < 32`` -> ``c + 1`` literal bytes follow; else a back-reference of
    length ``(c >> 5) + 2`` (7 -> one more length byte) at distance ``((c & 31) << 8) + next + 1``.
    """
    out = bytearray()
    src = memoryview(data)
    i, end = 0, len(data)
    while i < end:
        ctrl = src[i]
        i += 1
        if len(out) > expected_size:
            break  # never inflate past the declared size (a hostile block could grow without bound)
        if ctrl < 32:
            run = ctrl + 1
            if i + run > end:
                raise ValueError("literal run past the end of the block")
            out += src[i:i + run]
            i += run
            continue
        length = ctrl >> 5
        if length == 7:
            if i >= end:
                raise ValueError("back-reference length past the end of the block")
            length += src[i]
            i += 1
        if i >= end:
            raise ValueError("back-reference offset past the end of the block")
        distance = ((ctrl & 0x1F) << 8) + src[i] + 1
        i += 1
        length += 2
        if len(out) + length > expected_size:
            raise ValueError(f"back-reference past the declared size of {expected_size} bytes")
        ref = len(out) - distance
        if ref < 0:
            raise ValueError("back-reference before the start of the output")
        if distance >= length:
            out += out[ref:ref + length]
        else:  # overlapping copy: the last `distance` bytes repeat
            pattern = bytes(out[ref:])
            reps, rest = divmod(length, distance)
            out += pattern * reps + pattern[:rest]
    if len(out) != expected_size:
        raise ValueError(f"inflated to {len(out)} bytes, expected {expected_size}")
    return bytes(out)


def pack_rgb(colors_u8: np.ndarray) -> np.ndarray:
    """uint8 ``[N,3]`` -> PCL packed ``rgb`` as float32 ``[N]`` (bits ``0x00RRGGBB``)."""
    c = colors_u8.astype(np.uint32)
    packed = (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]
    return packed.view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """PCL packed ``rgb``/``rgba`` (float32 or uint32 view, ``[N]``) -> float32 ``[N,3]`` in [0, 1]."""
    bits = np.ascontiguousarray(packed).view(np.uint32) if packed.dtype.itemsize == 4 else packed.astype(np.uint32)
    rgb = np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF], axis=1)
    return (rgb.astype(np.float32) / 255.0).astype(np.float32)


def encode_binary(points: np.ndarray, scalars: np.ndarray | None, colors_u8: np.ndarray | None) -> bytes:
    """A complete ``DATA binary`` PCD: fields ``x y z [anomaly] [rgb]`` (float32, packed rgb)."""
    n = points.shape[0]
    names, formats = ["x", "y", "z"], ["<f4", "<f4", "<f4"]
    if scalars is not None:
        names.append("anomaly")
        formats.append("<f4")
    if colors_u8 is not None:
        names.append("rgb")
        formats.append("<f4")
    records = np.zeros(n, dtype=np.dtype({"names": names, "formats": formats}))
    records["x"], records["y"], records["z"] = points[:, 0], points[:, 1], points[:, 2]
    if scalars is not None:
        records["anomaly"] = scalars
    if colors_u8 is not None:
        records["rgb"] = pack_rgb(colors_u8)
    k = len(names)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\n"
        "VERSION 0.7\n"
        f"FIELDS {' '.join(names)}\n"
        f"SIZE {' '.join(['4'] * k)}\n"
        f"TYPE {' '.join(['F'] * k)}\n"
        f"COUNT {' '.join(['1'] * k)}\n"
        f"WIDTH {n}\n"
        "HEIGHT 1\n"
        "VIEWPOINT 0 0 0 1 0 0 0\n"
        f"POINTS {n}\n"
        "DATA binary\n"
    )
    return header.encode("ascii") + records.tobytes()
