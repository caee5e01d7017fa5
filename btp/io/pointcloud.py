"""Read and write point clouds: ``read_point_cloud`` / ``write_point_cloud``.

Read: ``.pcd`` (ascii, binary, binary_compressed), ``.ply``, ``.xyz/.txt/.csv``
(``x y z [label]``), ``.npy`` (``[N,3]`` or ``[N,>=3]``), ``.npz`` (``points``, optional
``labels``, ``colors``). Every reader ends in one place that drops NaN/inf rows with a warning
and enforces ``min_points``, so every format fails the same typed way.

Write: ``.pcd`` (DATA binary, fields ``x y z anomaly rgb``) and ``.ply`` (binary little-endian,
``anomaly`` float + ``red green blue`` uchar), atomically (temp file + ``os.replace``).
Torch-free.
"""
from __future__ import annotations

import mmap
import os
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np

from btp.io import pcd as _pcd
from btp.io import ply as _ply
from btp.io.files import atomic_write_bytes
from btp.io.colors import heat_colors
from btp.io.errors import (
    EmptyCloudError,
    FileTooLargeError,
    InvalidValuesError,
    MalformedFileError,
    MissingFileError,
    PointCloudError,
    TooFewPointsError,
    TruncatedFileError,
    UnsupportedFormatError,
)

READ_SUFFIXES = (".pcd", ".ply", ".xyz", ".txt", ".csv", ".npy", ".npz")
WRITE_SUFFIXES = (".pcd", ".ply")
_LABEL_NAMES = ("label", "labels")
_SCALAR_NAMES = ("anomaly",)


@dataclass(eq=False)
class PointCloud:
    """One point cloud as read from a file.

    points  float32 [N, 3]
    labels  int64 [N] or None      per-point ground truth (0 normal, 1 anomalous) when the file has it
    colors  float32 [N, 3] in [0, 1] or None
    path    the file it came from (None for arrays)
    scalars float32 [N] or None    a per-point ``anomaly`` score field (what ``write_point_cloud`` writes)
    row_mask bool [R] or None      which of the file's R rows were kept (None: all of them); rows with
                                   NaN/inf are dropped, and outputs that promise one value per input
                                   row (``btp-run``'s ``.npy``) put NaN there
    offset  float64 [3] or None    ``points + offset`` are the file's coordinates: set when the file's
                                   numbers carry more precision than float32 keeps and the reader was
                                   asked to center them (``read_point_cloud(..., center=True)``)
    """

    points: np.ndarray
    _: KW_ONLY
    labels: np.ndarray | None = None
    colors: np.ndarray | None = None
    path: Path | None = None
    scalars: np.ndarray | None = None
    row_mask: np.ndarray | None = None
    offset: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])


# ---- reading ---------------------------------------------------------------------------

MAX_FILE_BYTES = 4 << 30  # default refusal size ($BTP_MAX_FILE_BYTES overrides): 5M points are ~200 MB as text


MAX_POINTS = 20_000_000  # default most points of one scan ($BTP_MAX_POINTS overrides); line scanners give <= 5M


def max_file_bytes() -> int:
    return int(os.environ.get("BTP_MAX_FILE_BYTES", MAX_FILE_BYTES))


def check_point_count(path: Path, n: int) -> None:
    """Refuse a declared point count over ``$BTP_MAX_POINTS`` before reading the data (a small
    compressed file can announce billions)."""
    limit = int(os.environ.get("BTP_MAX_POINTS", MAX_POINTS))
    if n > limit:
        raise FileTooLargeError(path, f"declares {n} points, over the {limit} one scan may have; set "
                                      "BTP_MAX_POINTS to read it")


def centered(points: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """float64 points -> (float32 points, offset): centered at their float64 centroid first when
    casting straight to float32 would round them (large global coordinates, e.g. UTM-like offsets,
    keep their millimetres); float32-exact input is returned as it is with offset None."""
    points = np.asarray(points)
    as32 = np.ascontiguousarray(points, dtype=np.float32)
    if points.dtype != np.float64 or np.array_equal(as32, points):
        return as32, None
    offset = points.mean(axis=0, dtype=np.float64)
    return np.ascontiguousarray(points - offset, dtype=np.float32), offset


def read_point_cloud(path: str | os.PathLike, *, min_points: int = 1, center: bool = False) -> PointCloud:
    """Read one point cloud; typed errors (``btp.io.errors``) name the file and the reason.

    NaN/inf rows are dropped with a ``warnings.warn`` naming the count. Raises
    ``InvalidValuesError`` when that leaves fewer than ``min_points`` rows, ``TooFewPointsError``
    when the file simply holds fewer than ``min_points`` points (pass the model's N or K).
    ``center``: coordinates with more precision than float32 are centered in float64 before the
    cast (``PointCloud.offset``). Files over ``max_file_bytes()`` are refused before reading.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise UnsupportedFormatError(path, f"unknown point-cloud extension {path.suffix!r}; "
                                           f"supported: {', '.join(READ_SUFFIXES)}")
    if not path.exists():
        hint = "" if path.is_absolute() else f" (relative paths start at {Path.cwd()})"
        raise MissingFileError(path, f"no such file: check the path{hint}")
    if path.is_dir():
        raise MissingFileError(path, "is a directory, not a point-cloud file")
    if not path.is_file():
        raise MissingFileError(path, "is not a regular file (a FIFO, socket or device): copy the scan to a file")
    size = path.stat().st_size
    if size == 0:
        raise EmptyCloudError(path, "the file is empty (0 bytes)")
    if size > max_file_bytes():
        raise FileTooLargeError(path, f"{size / 2**30:.2f} GiB, over the {max_file_bytes() / 2**30:.2f} GiB limit "
                                      "of one scan; set BTP_MAX_FILE_BYTES to read larger files")
    reader = {".pcd": _read_pcd, ".ply": _read_ply, ".npy": _read_npy, ".npz": _read_npz}.get(suffix, _read_text)
    points, labels, colors, scalars = reader(path)
    return _finish(path, points, labels, colors, scalars, min_points, center)


def cloud_from_array(points, *, min_points: int = 1, where: str | os.PathLike | None = None) -> PointCloud:
    """An [M, 3] array that did not come from a file (a served request) -> ``PointCloud``, through
    the readers' own ending: NaN/inf rows dropped with a warning (``row_mask`` says which rows were
    kept), fewer than ``min_points`` finite rows refused (``InvalidValuesError`` /
    ``TooFewPointsError``, naming ``where``)."""
    path = Path(where) if where is not None else None
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InvalidValuesError(path, f"points have shape {list(points.shape)}; expected [M, 3]")
    return _finish(path, points, None, None, None, min_points)


def _finite_rows(points: np.ndarray) -> np.ndarray:
    """bool [M]: rows whose three coordinates are finite. The common case (all finite) is settled
    by per-column min/max, which NaN and inf always reach; numpy's ``isfinite(...).all(axis=1)``
    over an [M, 3] array is many times slower."""
    columns = [points[:, i] for i in range(points.shape[1])]
    if all(np.isfinite(c.min()) and np.isfinite(c.max()) for c in columns):
        return np.ones(points.shape[0], dtype=bool)
    finite = np.isfinite(columns[0])
    for c in columns[1:]:
        finite &= np.isfinite(c)
    return finite


def _finish(path: Path, points: np.ndarray, labels, colors, scalars, min_points: int,
            center: bool = False) -> PointCloud:
    points = np.asarray(points)
    n = points.shape[0]
    if n == 0:
        raise EmptyCloudError(path, "the file holds no points")
    if labels is not None and labels.shape[0] != n:
        raise MalformedFileError(path, f"{labels.shape[0]} labels for {n} points")
    finite = _finite_rows(points)
    if labels is not None and labels.dtype.kind == "f":
        finite &= np.isfinite(labels)
    dropped = int(n - finite.sum())
    row_mask = finite if dropped else None
    if dropped:
        warnings.warn(f"{path or '<array>'}: dropped {dropped} of {n} rows with NaN/inf values", stacklevel=3)
        points = points[finite]
        labels = labels[finite] if labels is not None else None
        colors = colors[finite] if colors is not None else None
        scalars = scalars[finite] if scalars is not None else None
    _check_float32_range(path, points)
    kept = int(points.shape[0])
    if kept < min_points:
        if dropped:
            raise InvalidValuesError(path, f"{dropped} of {n} rows have NaN/inf values; {kept} finite points "
                                           f"remain, fewer than the {min_points} needed")
        raise TooFewPointsError(path, f"{kept} points, fewer than the {min_points} needed "
                                      "(the model's num_points / group_size): use a denser scan")
    if labels is not None:
        labels = _as_labels(path, labels)
    if colors is not None:
        colors = np.clip(np.asarray(colors, dtype=np.float32), 0.0, 1.0)
    if scalars is not None:
        scalars = np.asarray(scalars, dtype=np.float32)
    points32, offset = centered(points) if center else (np.ascontiguousarray(points, dtype=np.float32), None)
    return PointCloud(points32, labels=labels, colors=colors, path=path, scalars=scalars, row_mask=row_mask,
                      offset=offset)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_float32_range(path: Path, points: np.ndarray) -> None:
    """Finite coordinates beyond float32's range (the model computes in float32) are refused with
    the likely cause rather than turned into inf."""
    if points.dtype.itemsize <= 4 or points.dtype.kind != "f" or not len(points):
        return
    biggest = max(-float(points.min()), float(points.max()))
    if biggest > FLOAT32_MAX:
        raise InvalidValuesError(path, f"coordinates up to {biggest:.3g}, beyond {FLOAT32_MAX:.3g}, the most float32 "
                                       "(what the model computes in) holds: check the file's units (e.g. metres "
                                       "written as nanometres) and byte order")


def _as_labels(path: Path, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype.kind == "f":
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise MalformedFileError(path, "the label column holds non-integer values; expected 0/1 per point")
        labels = rounded
    return labels.astype(np.int64)


def _maybe_label_column(path: Path, column: np.ndarray) -> np.ndarray | None:
    """A 4th column is ``label`` when it is integral; otherwise (intensity, ...) it is ignored with a warning."""
    finite = column[np.isfinite(column)]
    if np.array_equal(finite, np.rint(finite)):
        return column
    warnings.warn(f"{path}: the 4th column is not integer-valued, so it is not read as labels "
                  "(expected x y z label)", stacklevel=4)
    return None


@contextmanager
def _mapped(path: Path):
    """The file's bytes as a read-only memory map: a big binary scan is paged in as it is read,
    never copied whole into memory (the readers copy out only the arrays they return)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield mapped


def _read_pcd(path: Path):
    with _mapped(path) as raw:
        return _read_pcd_bytes(path, raw)


def _read_pcd_bytes(path: Path, raw):
    header = _pcd.read_header(path, raw)
    if header.points == 0:
        raise EmptyCloudError(path, "the PCD header announces POINTS 0")
    check_point_count(path, header.points)
    records = _pcd.read_records(path, raw, header)
    names = records.dtype.names
    points = np.stack([records["x"], records["y"], records["z"]], axis=1)
    labels = next((records[n] for n in _LABEL_NAMES if n in names), None)
    scalars = next((records[n] for n in _SCALAR_NAMES if n in names), None)
    colors = None
    for name in ("rgb", "rgba"):
        if name in names and records.dtype.fields[name][0].itemsize == 4:
            colors = _pcd.unpack_rgb(records[name])
            break
    return points, labels, colors, scalars


def _read_ply(path: Path):
    with _mapped(path) as raw:
        return _read_ply_bytes(path, raw)


def _read_ply_bytes(path: Path, raw):
    header = _ply.read_header(path, raw)
    vertex = header.element("vertex")
    if vertex is None:
        raise MalformedFileError(path, "the PLY has no 'vertex' element")
    if vertex.count == 0:
        raise EmptyCloudError(path, "the PLY header announces 0 vertices")
    check_point_count(path, vertex.count)
    if header.format == "ascii":
        records = _ply.read_ascii_vertices(path, raw, header)
    else:
        records = _ply.read_binary_vertices(path, raw, header)
    if records is None:
        if header.format != "ascii" and len(raw) < _ply.minimum_binary_size(header):
            raise TruncatedFileError(path, f"binary PLY of {len(raw)} bytes is shorter than its header's elements "
                                           f"up to the {vertex.count} vertices can be "
                                           f"({_ply.minimum_binary_size(header)} bytes at least): re-copy the file")
        return _read_ply_open3d(path, vertex.count)
    names = records.dtype.names
    missing = [axis for axis in "xyz" if axis not in names]
    if missing:
        raise MalformedFileError(path, f"the PLY vertices have no {'/'.join(missing)} property")
    points = np.stack([records["x"], records["y"], records["z"]], axis=1)  # float32 stays float32
    labels = next((records[n] for n in _LABEL_NAMES if n in names), None)
    scalars = next((records[n] for n in _SCALAR_NAMES if n in names), None)
    colors = None
    for r, g, b in (("red", "green", "blue"), ("r", "g", "b")):
        if r in names and g in names and b in names:
            rgb = np.stack([records[r], records[g], records[b]], axis=1)
            colors = rgb.astype(np.float32) / 255.0 if rgb.dtype.kind in "ui" else rgb.astype(np.float32)
            break
    return points, labels, colors, scalars


def _read_ply_open3d(path: Path, announced: int):
    import open3d as o3d

    cloud = o3d.io.read_point_cloud(str(path), format="ply")
    points = np.asarray(cloud.points)
    if points.shape[0] < announced:  # (open3d zero-fills some truncated files: only a short read shows)
        raise TruncatedFileError(path, f"the PLY header announces {announced} vertices but only "
                                       f"{points.shape[0]} could be read: re-copy the file")
    colors = np.asarray(cloud.colors, dtype=np.float32) if cloud.has_colors() else None
    return points, None, colors, None


def _read_npy(path: Path):
    with open(path, "rb") as fh:
        try:
            version = np.lib.format.read_magic(fh)
            read_array_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)
            shape, _fortran_order, dtype = read_array_header(fh)
        except ValueError as err:
            raise MalformedFileError(path, f"not a numpy .npy file ({err})") from None
        data_start = fh.tell()
    if dtype.hasobject:
        raise MalformedFileError(path, "the .npy holds Python objects; save a float array [N, 3] instead")
    check_point_count(path, int(shape[0]) if shape else 0)
    if dtype.names is not None and not {"x", "y", "z"} <= set(dtype.names):
        raise MalformedFileError(path, f"the .npy holds records with fields {list(dtype.names)}; expected fields "
                                       "x, y, z or a float array [N, 3]")
    need = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise TruncatedFileError(path, f"the .npy header announces shape {shape} ({need} bytes) but the file "
                                       f"has {size} bytes: re-copy the file")
    array = np.load(path, allow_pickle=False, mmap_mode="r")  # a big file is paged in, not copied whole
    if size > need:
        raise MalformedFileError(path, f"the .npy header announces shape {shape} ({need} bytes) but the file has "
                                       f"{size - need} bytes more: it is not one array; re-save it")
    if array.dtype.names is not None:  # records with x, y, z fields
        array = np.stack([array["x"], array["y"], array["z"]], axis=1)
    return _split_columns(path, array, "the .npy array")


def _npz_rows(path: Path, archive, key: str) -> int:
    """Rows of ``key`` from its .npy header inside the archive, without inflating the data."""
    try:
        with archive.zip.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (KeyError, ValueError, zipfile.BadZipFile, OSError, EOFError) as err:
        raise MalformedFileError(path, f"the .npz's {key!r} array has no readable header ({err})") from None
    if dtype.hasobject:
        raise MalformedFileError(path, f"the .npz's {key!r} array holds Python objects; save a float array [N, 3]")
    return int(shape[0]) if shape else 0


def _check_array(path: Path, array: np.ndarray, what: str) -> None:
    """An array of points must be [N, >=3] real numbers; [3, N] says so (it looks transposed)."""
    if array.ndim == 2 and array.shape[0] in (3, 4) and array.shape[1] > 9:
        raise MalformedFileError(path, f"{what} has shape {array.shape}: it looks transposed (one row per axis); "
                                       "save it as [N, 3], one row per point (points.T)")
    if array.ndim != 2 or array.shape[1] < 3:
        raise MalformedFileError(path, f"{what} has shape {array.shape}; expected [N, 3] or [N, >=3] "
                                       "(x y z first)")
    if array.dtype.kind not in "fiu":
        raise MalformedFileError(path, f"{what} has dtype {array.dtype}; expected real numbers (float or int)")


def _split_columns(path: Path, array: np.ndarray, what: str):
    _check_array(path, array, what)
    array = array if array.dtype == np.float32 else array.astype(np.float64)  # float32 stays float32
    labels = _maybe_label_column(path, array[:, 3]) if array.shape[1] == 4 else None
    return array[:, :3], labels, None, None


def _read_npz(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        raise MalformedFileError(path, "is a single .npy array, not a .npz archive: rename it to .npy")
    if not zipfile.is_zipfile(path):
        raise MalformedFileError(path, "is not a .npz archive (a zip file): truncated, or another format "
                                       "saved as .npz; save it with np.savez(path, points=...)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise MalformedFileError(path, f"not a readable .npz archive ({err}); truncated?") from None
    with archive:
        keys = list(archive.files)
        if "points" not in keys:
            raise MalformedFileError(path, f"the .npz has no 'points' array (keys: {keys}); "
                                           "save it with np.savez(path, points=..., labels=...)")
        check_point_count(path, _npz_rows(path, archive, "points"))
        try:
            points = archive["points"]
            labels = archive["labels"] if "labels" in keys else None
            colors = archive["colors"] if "colors" in keys else None
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise TruncatedFileError(path, f"an array in the .npz cannot be read ({err}): re-copy the file") from None
    _check_array(path, points, "the .npz's 'points'")
    if labels is not None:
        labels = labels.reshape(-1)
    if colors is not None:
        if colors.shape != (points.shape[0], 3):
            raise MalformedFileError(path, f"'colors' has shape {colors.shape}; expected [{points.shape[0]}, 3]")
        colors = colors.astype(np.float32) / 255.0 if colors.dtype.kind in "ui" else colors.astype(np.float32)
    return points[:, :3].astype(np.float64), labels, colors, None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _read_text(path: Path):
    """``x y z [label]`` rows, whitespace- or comma-separated, one optional header line."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        first_lines, first_line_number = [], 0  # the first two rows that are not blank or '#' comments
        for number, line in enumerate(fh):
            if line.strip() and not line.lstrip().startswith("#"):
                first_lines.append(line)
                first_line_number = first_line_number if len(first_lines) > 1 else number
            if len(first_lines) == 2:
                break
    if not first_lines:
        raise EmptyCloudError(path, "the file holds no rows")
    delimiter = "," if "," in first_lines[-1] else None

    def split(line: str) -> list[str]:
        return [w.strip() for w in line.split(delimiter)] if delimiter else line.split()

    names = None
    if not all(_is_number(w) for w in split(first_lines[0])):
        names = [w.lower().strip("\"'") for w in split(first_lines[0])]
        if len(first_lines) == 1:
            raise EmptyCloudError(path, "the file holds a header line but no rows")
    try:
        array = np.loadtxt(path, dtype=np.float64, delimiter=delimiter,
                           skiprows=first_line_number + 1 if names else 0, comments="#", ndmin=2)
    except ValueError as err:
        raise _text_error(path, delimiter, names is not None, err) from None
    if names is None:
        return _split_columns(path, array, "the text table")
    if array.shape[1] != len(names):
        raise MalformedFileError(path, f"the header names {len(names)} columns but rows have {array.shape[1]}")
    axes = [names.index(a) if a in names else i for i, a in enumerate("xyz")]
    label_col = next((names.index(n) for n in _LABEL_NAMES if n in names), None)
    labels = array[:, label_col] if label_col is not None else None
    return array[:, axes], labels, None, None


def _text_error(path: Path, delimiter: str | None, has_header: bool, err: Exception) -> PointCloudError:
    counts = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip() and not line.lstrip().startswith("#"):
                counts.append(len(line.split(delimiter)))
    body = counts[1:] if has_header else counts
    if len(body) >= 2 and len(set(body[:-1])) == 1 and body[-1] < body[0]:
        return TruncatedFileError(path, f"the last row has {body[-1]} values, the others {body[0]}: "
                                        "the file was cut off")
    return MalformedFileError(path, f"rows do not parse as numbers in x y z [label] columns ({err})")


# ---- writing ---------------------------------------------------------------------------

def write_point_cloud(path: str | os.PathLike, points: np.ndarray, scalars: np.ndarray | None = None,
                      colors: np.ndarray | None = None) -> Path:
    """Write ``points [N,3]`` with an optional ``anomaly`` scalar ``[N]`` and RGB colours ``[N,3]``.

    ``colors`` may be uint8 or float in [0, 1]; when omitted and ``scalars`` is given, the colours
    are ``heat_colors(scalars)``. ``.pcd`` -> DATA binary; ``.ply`` -> binary little-endian.
    The file appears complete or not at all (temp file in the same folder, then ``os.replace``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise UnsupportedFormatError(path, f"cannot write {path.suffix!r}; supported: {', '.join(WRITE_SUFFIXES)}")
    points = np.asarray(points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise MalformedFileError(path, f"points have shape {points.shape}; expected [N, 3]")
    n = points.shape[0]
    if n == 0:
        raise EmptyCloudError(path, "refusing to write a cloud with no points")
    if scalars is not None:
        scalars = np.asarray(scalars, dtype=np.float32).reshape(-1)
        if scalars.shape[0] != n:
            raise MalformedFileError(path, f"{scalars.shape[0]} scalars for {n} points")
    colors_u8 = None
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != (n, 3):
            raise MalformedFileError(path, f"colors have shape {colors.shape}; expected [{n}, 3]")
        if colors.dtype == np.uint8:
            colors_u8 = colors
        else:
            colors_u8 = np.clip(np.round(colors.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    elif scalars is not None:
        colors_u8 = heat_colors(scalars)
    encode = _pcd.encode_binary if suffix == ".pcd" else _ply.encode_binary
    atomic_write_bytes(path, encode(points, scalars, colors_u8))
    return path


