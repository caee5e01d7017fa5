"""``.ply`` files: header parsing (to catch truncation), vertex reading, binary writer.

Vertices are read with numpy directly - exact, fast, and extra vertex properties such as
``label`` are kept: binary PLY (elements before the vertices with list properties, e.g. faces
written first, are walked row by row to find the vertices, so truncation is always detected) and
ascii PLY (one line per element instance). Only a PLY whose vertex element itself has list
properties goes through open3d.
Torch-free.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from btp.io.errors import MalformedFileError, TruncatedFileError
from btp.io.files import benign_tail

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


@dataclass(kw_only=True)
class PLYElement:
    name: str
    count: int
    properties: list[tuple[str, str]] = field(default_factory=list)  # (name, ply type)
    has_list: bool = False
    # per property: (name, count type, item type) for lists, (name, None, byte size) for scalars
    list_types: list[tuple[str, str | None, object]] = field(default_factory=list)


@dataclass
class PLYHeader:
    format: str  # "ascii" | "binary_little_endian" | "binary_big_endian"
    elements: list[PLYElement]
    data_offset: int

    def element(self, name: str) -> PLYElement | None:
        return next((e for e in self.elements if e.name == name), None)


def read_header(path: Path, raw: bytes) -> PLYHeader:
    if raw[:3] != b"ply":
        raise MalformedFileError(path, "does not start with 'ply': not a PLY file")
    end = raw.find(b"end_header")
    if end < 0:
        raise TruncatedFileError(path, "the PLY header has no 'end_header' line: the file was cut off")
    newline = raw.find(b"\n", end)
    data_offset = len(raw) if newline < 0 else newline + 1
    fmt = None
    elements: list[PLYElement] = []
    for line in raw[:end].decode("ascii", errors="replace").splitlines():
        words = line.split()
        if not words or words[0] in ("comment", "obj_info", "ply"):
            continue
        if words[0] == "format":
            if len(words) < 2:
                raise MalformedFileError(path, f"bad PLY format line {line!r}: expected 'format <kind> 1.0'")
            fmt = words[1]
        elif words[0] == "element":
            try:
                elements.append(PLYElement(name=words[1], count=int(words[2])))
            except (IndexError, ValueError):
                raise MalformedFileError(path, f"bad PLY element line {line!r}") from None
            if elements[-1].count < 0:
                raise MalformedFileError(path, f"PLY element {words[1]!r} declares {words[2]} instances: "
                                               "a count must not be negative")
        elif words[0] == "property":
            if not elements:
                raise MalformedFileError(path, f"PLY property before any element: {line!r}")
            if len(words) >= 2 and words[1] == "list":
                if len(words) != 5:
                    raise MalformedFileError(path, f"bad PLY list property {line!r}: expected "
                                                   "'property list <count type> <item type> <name>'")
                if words[2] not in _PLY_TYPES or words[3] not in _PLY_TYPES:
                    raise MalformedFileError(path, f"unknown PLY type in list property {line!r}")
                if words[-1] in {name for name, _ in elements[-1].properties}:
                    raise MalformedFileError(path, f"PLY element {elements[-1].name!r} declares property "
                                                   f"{words[-1]!r} twice: re-export the file")
                elements[-1].has_list = True
                elements[-1].properties.append((words[-1], "list"))
                elements[-1].list_types.append((words[-1], words[2], words[3]))
            else:
                if len(words) != 3:
                    raise MalformedFileError(path, f"bad PLY property line {line!r}: expected 'property <type> <name>'")
                if words[1] not in _PLY_TYPES:
                    raise MalformedFileError(path, f"unknown PLY property type {words[1]!r} in {line!r}")
                if words[2] in {name for name, _ in elements[-1].properties}:
                    raise MalformedFileError(path, f"PLY element {elements[-1].name!r} declares property "
                                                   f"{words[2]!r} twice: re-export the file")
                elements[-1].properties.append((words[2], words[1]))
                elements[-1].list_types.append((words[2], None, np.dtype(_PLY_TYPES[words[1]]).itemsize))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise MalformedFileError(path, f"PLY format {fmt!r}: expected ascii or binary_little/big_endian")
    return PLYHeader(fmt, elements, data_offset)


def read_binary_vertices(path: Path, raw: bytes, header: PLYHeader) -> np.ndarray | None:
    """Binary vertex records as a structured array ``[V]`` (None: ascii, or list properties in the
    vertex element itself). Elements before the vertices that have list properties (faces written
    first) are walked row by row to find where the vertices start, so the size check is exact."""
    if header.format == "ascii":
        return None
    endian = "<" if header.format == "binary_little_endian" else ">"
    offset = header.data_offset
    for element in header.elements:
        if element.name == "vertex":
            if element.has_list:
                return None
            dtype = np.dtype([(name, endian + _PLY_TYPES[typ]) for name, typ in element.properties])
            need = element.count * dtype.itemsize
            have = len(raw) - offset
            if have < need:
                raise TruncatedFileError(
                    path, f"binary PLY announces {element.count} vertices ({need} bytes) but only {have} bytes "
                          f"follow ({have // max(dtype.itemsize, 1)} whole vertices): re-copy the file")
            _check_trailing(path, header, raw)
            return np.frombuffer(raw, dtype=dtype, count=element.count, offset=offset).copy()
        offset = _skip_element(path, raw, element, offset, endian)
    return None


def _skip_element(path: Path, raw: bytes, element: PLYElement, offset: int, endian: str) -> int:
    """The byte offset after ``element``'s rows (list properties: a count, then that many items)."""
    if not element.has_list:
        dtype = np.dtype([(name, endian + _PLY_TYPES[typ]) for name, typ in element.properties])
        return offset + element.count * dtype.itemsize
    parts = [(typ, item) for _, typ, item in element.list_types]
    size = len(raw)
    fast = _constant_rows(raw, element, parts, offset, endian)
    if fast is not None:
        return fast
    for _ in range(element.count):
        for typ, item in parts:
            if typ is None:  # a scalar property of `item` bytes
                offset += item
                continue
            count_dtype, item_dtype = np.dtype(endian + _PLY_TYPES[typ]), np.dtype(endian + _PLY_TYPES[item])
            if offset + count_dtype.itemsize > size:
                raise TruncatedFileError(path, f"binary PLY ends inside its {element.name!r} element: re-copy the file")
            n = int(np.frombuffer(raw, dtype=count_dtype, count=1, offset=offset)[0])
            if n < 0:
                raise MalformedFileError(path, f"binary PLY: a negative list length in element {element.name!r}")
            offset += count_dtype.itemsize + n * item_dtype.itemsize
    if offset > size:
        raise TruncatedFileError(path, f"binary PLY ends inside its {element.name!r} element: re-copy the file")
    return offset


def _constant_rows(raw: bytes, element: PLYElement, parts, offset: int, endian: str) -> int | None:
    """The end offset of an element with one list property whose every row has the first row's
    length (triangle meshes), found with one strided read; None when the rows differ."""
    lists = [(typ, item) for typ, item in parts if typ is not None]
    if len(lists) != 1 or element.count == 0:
        return None
    before = sum(item for typ, item in parts[:[t for t, _ in parts].index(lists[0][0])] if typ is None)
    count_dtype, item_dtype = np.dtype(endian + _PLY_TYPES[lists[0][0]]), np.dtype(endian + _PLY_TYPES[lists[0][1]])
    if offset + before + count_dtype.itemsize > len(raw):
        return None
    first = int(np.frombuffer(raw, dtype=count_dtype, count=1, offset=offset + before)[0])
    row = sum(item for typ, item in parts if typ is None) + count_dtype.itemsize + first * item_dtype.itemsize
    end = offset + element.count * row
    if first < 0 or end > len(raw):
        return None
    counts = np.ndarray((element.count,), dtype=count_dtype, buffer=raw, offset=offset + before, strides=(row,))
    return end if bool((counts == first).all()) else None


def _check_trailing(path: Path, header: PLYHeader, raw: bytes) -> None:
    """A binary PLY of fixed-size elements only must end where its elements do (a little trailing
    whitespace aside, as some writers add): extra bytes mean the header does not describe the data
    (or something was appended)."""
    size = len(raw)
    if any(e.has_list for e in header.elements):
        return
    endian = "<" if header.format == "binary_little_endian" else ">"
    total = header.data_offset + sum(e.count * np.dtype([(n, endian + _PLY_TYPES[t]) for n, t in e.properties]).itemsize
                                     for e in header.elements)
    if size > total and not benign_tail(raw, total):
        raise MalformedFileError(path, f"binary PLY: {size - total} bytes after the last element its header "
                                       "describes; the header does not match the data: re-export the file")


def minimum_binary_size(header: PLYHeader) -> int:
    """The fewest bytes a binary PLY can have up to the end of its vertices (every list empty)."""
    size = header.data_offset
    for element in header.elements:
        row = sum(1 if typ == "list" else np.dtype(_PLY_TYPES[typ]).itemsize for _, typ in element.properties)
        size += element.count * row
        if element.name == "vertex":
            break
    return size


def read_ascii_vertices(path: Path, raw: bytes, header: PLYHeader) -> np.ndarray | None:
    """Vertex records of an ascii PLY as a structured array ``[V]`` (None: list properties)."""
    if header.format != "ascii":
        return None
    vertex = header.element("vertex")
    if vertex is None or vertex.has_list:
        return None
    skip = 0
    for element in header.elements:
        if element.name == "vertex":
            break
        skip += element.count
    lines = raw[header.data_offset:].decode("ascii", errors="replace").splitlines()
    rows = [ln for ln in lines if ln.strip()][skip:skip + vertex.count]
    columns = len(vertex.properties)
    if len(rows) < vertex.count or (rows and len(rows[-1].split()) < columns):
        whole = len(rows) - (1 if rows and len(rows[-1].split()) < columns else 0)
        raise TruncatedFileError(path, f"ascii PLY announces {vertex.count} vertices but only {whole} whole "
                                       "vertex rows follow: re-copy the file")
    try:
        values = np.loadtxt(rows, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise MalformedFileError(path, f"ascii PLY vertex rows do not parse as numbers ({err})") from None
    if values.shape[1] != columns:
        raise MalformedFileError(path, f"ascii PLY vertex rows have {values.shape[1]} values, header says {columns}")
    records = np.zeros(vertex.count, dtype=[(name, _PLY_TYPES[typ]) for name, typ in vertex.properties])
    for i, (name, _) in enumerate(vertex.properties):
        records[name] = values[:, i]
    return records


def encode_binary(points: np.ndarray, scalars: np.ndarray | None, colors_u8: np.ndarray | None) -> bytes:
    """A complete binary little-endian PLY: ``x y z`` float, ``[anomaly]`` float, ``[red green blue]`` uchar."""
    n = points.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    lines = ["property float x", "property float y", "property float z"]
    if scalars is not None:
        fields.append(("anomaly", "<f4"))
        lines.append("property float anomaly")
    if colors_u8 is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        lines += ["property uchar red", "property uchar green", "property uchar blue"]
    records = np.zeros(n, dtype=np.dtype(fields))
    records["x"], records["y"], records["z"] = points[:, 0], points[:, 1], points[:, 2]
    if scalars is not None:
        records["anomaly"] = scalars
    if colors_u8 is not None:
        records["red"], records["green"], records["blue"] = colors_u8[:, 0], colors_u8[:, 1], colors_u8[:, 2]
    header = "\n".join(["ply", "format binary_little_endian 1.0", "comment written by btp-edge",
                        f"element vertex {n}", *lines, "end_header"]) + "\n"
    return header.encode("ascii") + records.tobytes()
