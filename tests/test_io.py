"""btp.io point-cloud readers/writers, heat colours and mesh sampling, on points from real meshes."""
from __future__ import annotations

import subprocess
import sys
import warnings
import zipfile

import numpy as np
import open3d as o3d
import pytest

from btp.errors import BTPError
from btp.io import (
    PointCloud,
    heat_colors,
    load_mesh,
    read_point_cloud,
    sample_surface,
    write_point_cloud,
)
from btp.io.errors import (
    EmptyCloudError,
    InvalidValuesError,
    MalformedFileError,
    MissingFileError,
    PointCloudError,
    TooFewPointsError,
    TruncatedFileError,
    UnsupportedFormatError,
)
from btp.io.pcd import lzf_decompress

N = 600


@pytest.fixture(scope="module")
def bunny(bunny_mesh):
    vertices, faces = load_mesh(bunny_mesh)
    return vertices, faces


@pytest.fixture(scope="module")
def cloud(bunny):
    """float32 [N,3] points on the bunny, labels marking the points above the median height."""
    points, _ = sample_surface(*bunny, N, seed=3)
    labels = (points[:, 1] > np.median(points[:, 1])).astype(np.int64)
    colors = np.random.default_rng(0).random((N, 3))
    return points, labels, colors


def o3d_cloud(points, colors=None):
    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    if colors is not None:
        pc.colors = o3d.utility.Vector3dVector(colors)
    return pc


# ---- meshes ----------------------------------------------------------------------------

def test_load_mesh_matches_index(bunny, shapes_root):
    import json

    vertices, faces = bunny
    entry = next(e for e in json.loads((shapes_root / "index.json").read_text())
                 if e["file"] == "cgal__stanford_bunny.ply")
    assert vertices.dtype == np.float64 and faces.dtype == np.int64
    assert vertices.shape == (entry["vertices"], 3) and faces.shape == (entry["faces"], 3)


def test_sample_surface_deterministic_on_faces_and_area_weighted(bunny):
    vertices, faces = bunny
    p1, f1 = sample_surface(vertices, faces, 4000, seed=7)
    p2, f2 = sample_surface(vertices, faces, 4000, seed=7)
    p3, _ = sample_surface(vertices, faces, 4000, seed=8)
    assert p1.dtype == np.float32 and p1.shape == (4000, 3) and f1.dtype == np.int64
    assert np.array_equal(p1, p2) and np.array_equal(f1, f2)
    assert not np.array_equal(p1, p3)
    # each point lies on the plane of its face and inside the triangle (barycentric coords >= 0)
    a, b, c = (vertices[faces[f1, k]] for k in range(3))
    normal = np.cross(b - a, c - a)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    scale = np.linalg.norm(vertices.max(0) - vertices.min(0))
    assert np.abs(np.einsum("ij,ij->i", p1 - a, normal)).max() < 1e-5 * scale
    # area weighting: points per half of the faces, sorted by area, follow the area share
    areas = 0.5 * np.linalg.norm(np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                                          vertices[faces[:, 2]] - vertices[faces[:, 0]]), axis=1)
    big = areas >= np.median(areas)
    expected = areas[big].sum() / areas.sum()
    observed = big[f1].mean()
    assert abs(observed - expected) < 0.03


def test_sample_surface_skips_degenerate_faces():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 3], [0, 1, 2]])  # face 0 is collinear: zero area
    _, face_idx = sample_surface(vertices, faces, 200, seed=0)
    assert np.all(face_idx == 1)
    with pytest.raises(EmptyCloudError):
        sample_surface(vertices, faces[:1], 10, seed=0)


def test_load_mesh_errors(tmp_path):
    with pytest.raises(MissingFileError, match="nope.ply"):
        load_mesh(tmp_path / "nope.ply")
    with pytest.raises(UnsupportedFormatError, match=r"\.obj"):
        load_mesh(tmp_path / "mesh.xyz")
    points_only = tmp_path / "points.ply"
    o3d.io.write_point_cloud(str(points_only), o3d_cloud(np.random.default_rng(0).random((10, 3))))
    with pytest.raises(EmptyCloudError, match="triangles"):
        load_mesh(points_only)


# ---- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pcd", ".ply"])
def test_write_read_round_trip_with_scores(tmp_path, cloud, suffix):
    points, _, _ = cloud
    scores = np.linspace(-1.0, 3.0, N).astype(np.float32)
    path = write_point_cloud(tmp_path / f"scores{suffix}", points, scalars=scores)
    back = read_point_cloud(path)
    assert isinstance(back, PointCloud) and back.path == path
    assert back.points.dtype == np.float32 and np.array_equal(back.points, points)
    assert np.array_equal(back.scalars, scores)
    assert np.array_equal(np.round(back.colors * 255).astype(np.uint8), heat_colors(scores))
    # open3d, the viewer side, reads the same points and colours
    ref = o3d.io.read_point_cloud(str(path))
    assert np.array_equal(np.asarray(ref.points, dtype=np.float32), points)
    assert np.allclose(np.asarray(ref.colors), back.colors, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp")), "temp file left behind"


@pytest.mark.parametrize("suffix", [".pcd", ".ply"])
def test_write_explicit_colors_float_and_uint8(tmp_path, cloud, suffix):
    points, _, colors = cloud
    u8 = np.round(colors * 255).astype(np.uint8)
    a = read_point_cloud(write_point_cloud(tmp_path / f"f{suffix}", points, colors=colors))
    b = read_point_cloud(write_point_cloud(tmp_path / f"u{suffix}", points, colors=u8))
    assert a.scalars is None
    assert np.array_equal(a.colors, b.colors)
    assert np.abs(a.colors - colors).max() <= 0.5 / 255 + 1e-6


def test_write_overwrites_atomically_and_rejects_bad_input(tmp_path, cloud):
    points, _, _ = cloud
    path = tmp_path / "sub" / "out.pcd"
    write_point_cloud(path, points)
    write_point_cloud(path, points[:10])
    assert len(read_point_cloud(path)) == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.pcd"]
    with pytest.raises(UnsupportedFormatError, match=r"\.pcd, \.ply"):
        write_point_cloud(tmp_path / "out.xyz", points)
    with pytest.raises(MalformedFileError, match=r"\[N, 3\]"):
        write_point_cloud(tmp_path / "bad.ply", points[:, :2])
    with pytest.raises(MalformedFileError, match="scalars"):
        write_point_cloud(tmp_path / "bad.ply", points, scalars=np.zeros(3))
    assert not (tmp_path / "bad.ply").exists()


@pytest.mark.parametrize("mode", ["ascii", "binary", "binary_compressed"])
def test_read_pcd_written_by_open3d(tmp_path, cloud, mode):
    points, _, colors = cloud
    path = tmp_path / f"{mode}.pcd"
    assert o3d.io.write_point_cloud(str(path), o3d_cloud(points, colors), write_ascii=mode == "ascii",
                                    compressed=mode == "binary_compressed")
    assert f"DATA {mode}".encode() in path.read_bytes()[:400]
    back = read_point_cloud(path)
    assert back.points.dtype == np.float32 and back.points.shape == (N, 3)
    assert np.allclose(back.points, points, atol=1e-6 * np.abs(points).max())
    assert back.labels is None
    assert np.abs(back.colors - colors).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("ascii_ply", [True, False])
def test_read_ply_written_by_open3d(tmp_path, cloud, ascii_ply):
    points, _, colors = cloud
    path = tmp_path / "o3d.ply"
    o3d.io.write_point_cloud(str(path), o3d_cloud(points, colors), write_ascii=ascii_ply)
    back = read_point_cloud(path)
    assert np.allclose(back.points, points, atol=1e-5 * np.abs(points).max())
    assert np.abs(back.colors - colors).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("endian", ["<", ">"])
def test_binary_ply_label_property_both_endians(tmp_path, cloud, endian):
    points, labels, _ = cloud
    rec = np.zeros(N, dtype=[("x", endian + "f4"), ("y", endian + "f4"), ("z", endian + "f4"),
                             ("label", endian + "i4")])
    rec["x"], rec["y"], rec["z"], rec["label"] = points[:, 0], points[:, 1], points[:, 2], labels
    fmt = "binary_little_endian" if endian == "<" else "binary_big_endian"
    header = (f"ply\nformat {fmt} 1.0\nelement vertex {N}\nproperty float x\nproperty float y\n"
              "property float z\nproperty int label\nend_header\n")
    path = tmp_path / "labelled.ply"
    path.write_bytes(header.encode() + rec.tobytes())
    back = read_point_cloud(path)
    assert np.array_equal(back.points, points) and np.array_equal(back.labels, labels)


def test_read_mesh_ply_gives_its_vertices(bunny_mesh, bunny):
    vertices, _ = bunny
    back = read_point_cloud(bunny_mesh)
    assert np.allclose(back.points, vertices.astype(np.float32))


def _pcd_with_label(points, labels, data):
    """A PCD with fields x y z label (PCL's PointXYZL) in the given DATA mode."""
    n = len(points)
    header = (f"VERSION 0.7\nFIELDS x y z label\nSIZE 4 4 4 4\nTYPE F F F U\nCOUNT 1 1 1 1\n"
              f"WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n").encode()
    if data == "ascii":
        rows = "".join(f"{x:.9g} {y:.9g} {z:.9g} {lab}\n" for (x, y, z), lab in zip(points, labels))
        return header + rows.encode()
    columns = [points[:, 0].astype("<f4"), points[:, 1].astype("<f4"), points[:, 2].astype("<f4"),
               labels.astype("<u4")]
    if data == "binary":
        rec = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("label", "<u4")])
        for name, col in zip(rec.dtype.names, columns):
            rec[name] = col
        return header + rec.tobytes()
    body = b"".join(c.tobytes() for c in columns)  # field-major, as PCL stores it before LZF
    literal_only = b"".join(bytes([len(chunk) - 1]) + chunk for chunk in
                            (body[i:i + 32] for i in range(0, len(body), 32)))  # valid LZF, no back-references
    return header + np.array([len(literal_only), len(body)], dtype="<u4").tobytes() + literal_only


@pytest.mark.parametrize("mode", ["ascii", "binary", "binary_compressed"])
def test_pcd_label_field_is_read(tmp_path, cloud, mode):
    points, labels, _ = cloud
    path = tmp_path / f"labels_{mode}.pcd"
    path.write_bytes(_pcd_with_label(points, labels, mode))
    back = read_point_cloud(path)
    assert back.labels.dtype == np.int64 and np.array_equal(back.labels, labels)
    assert np.allclose(back.points, points, atol=1e-6)


def test_ascii_pcd_packed_rgb_both_spellings(tmp_path, cloud):
    """PCL prints TYPE F rgb in ascii as the uint32 integer; other writers print the denormal float."""
    points, _, colors = cloud
    u8 = np.round(colors * 255).astype(np.uint32)
    bits = (u8[:, 0] << 16) | (u8[:, 1] << 8) | u8[:, 2]
    header = (f"VERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\nWIDTH {N}\n"
              f"HEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {N}\nDATA ascii\n")
    for name, packed in (("as_int", [str(b) for b in bits]), ("as_float", [f"{f:.9g}" for f in bits.view(np.float32)])):
        rows = "".join(f"{x:.9g} {y:.9g} {z:.9g} {p}\n" for (x, y, z), p in zip(points, packed))
        (tmp_path / f"{name}.pcd").write_text(header + rows)
        back = read_point_cloud(tmp_path / f"{name}.pcd")
        assert np.array_equal(np.round(back.colors * 255).astype(np.uint32), u8), name


def test_lzf_decoder_matches_open3d_on_back_references(tmp_path):
    grid = np.stack(np.meshgrid(np.arange(20), np.arange(20), np.arange(10), indexing="ij"), -1).reshape(-1, 3)
    path = tmp_path / "grid.pcd"
    o3d.io.write_point_cloud(str(path), o3d_cloud(grid * 0.25), compressed=True)
    raw = path.read_bytes()
    assert len(raw) < grid.size * 4 // 4, "open3d should have compressed the grid (back-references)"
    back = read_point_cloud(path)
    assert np.array_equal(back.points, (grid * 0.25).astype(np.float32))
    with pytest.raises(ValueError, match="back-reference"):
        lzf_decompress(bytes([0x20, 0x05]), 4)  # reference before the start of the output


@pytest.mark.parametrize("delimiter,header", [(" ", None), (",", "x,y,z,label"), ("\t", "X Y Z LABEL")])
@pytest.mark.parametrize("suffix", [".txt", ".xyz", ".csv"])
def test_text_tables(tmp_path, cloud, delimiter, header, suffix):
    points, labels, _ = cloud
    path = tmp_path / f"table{suffix}"
    table = np.column_stack([points, labels])
    np.savetxt(path, table, fmt=["%.8f"] * 3 + ["%d"], delimiter=delimiter,
               header=header.replace(" ", delimiter) if header else "", comments="")
    back = read_point_cloud(path)
    assert np.allclose(back.points, points, atol=1e-7)
    assert back.labels.dtype == np.int64 and np.array_equal(back.labels, labels)


def test_text_xyz_only_and_non_label_fourth_column(tmp_path, cloud):
    points, labels, _ = cloud
    table = "\n".join(f"{x:.8f};{y:.8f};{z:.8f};{lab}".replace(";", ", ") for (x, y, z), lab in zip(points, labels))
    (tmp_path / "commented.csv").write_text("# exported scan\n\n# units: m\nX, Y, Z, label\n" + table + "\n")
    back = read_point_cloud(tmp_path / "commented.csv")
    assert np.allclose(back.points, points, atol=1e-7) and np.array_equal(back.labels, labels)
    np.savetxt(tmp_path / "xyz.xyz", points)
    assert read_point_cloud(tmp_path / "xyz.xyz").labels is None
    np.savetxt(tmp_path / "intensity.txt", np.column_stack([points, np.linspace(0.1, 0.9, N)]))
    with pytest.warns(UserWarning, match="not integer-valued"):
        back = read_point_cloud(tmp_path / "intensity.txt")
    assert back.labels is None and np.allclose(back.points, points)


def test_npy_and_npz(tmp_path, cloud):
    points, labels, colors = cloud
    np.save(tmp_path / "xyz.npy", points)
    np.save(tmp_path / "xyzl.npy", np.column_stack([points, labels]).astype(np.float32))
    np.save(tmp_path / "wide.npy", np.column_stack([points, colors, labels]))  # [N,7]: xyz first
    np.savez(tmp_path / "cloud.npz", points=points, labels=labels, colors=colors)
    assert np.array_equal(read_point_cloud(tmp_path / "xyz.npy").points, points)
    assert np.array_equal(read_point_cloud(tmp_path / "xyzl.npy").labels, labels)
    wide = read_point_cloud(tmp_path / "wide.npy")
    assert np.allclose(wide.points, points) and wide.labels is None
    npz = read_point_cloud(tmp_path / "cloud.npz")
    assert np.array_equal(npz.points, points) and np.array_equal(npz.labels, labels)
    assert np.allclose(npz.colors, colors, atol=1e-7)
    np.savez(tmp_path / "nopoints.npz", xyz=points)
    with pytest.raises(MalformedFileError, match="'points'.*xyz"):
        read_point_cloud(tmp_path / "nopoints.npz")
    np.save(tmp_path / "flat.npy", points[:, :2])
    with pytest.raises(MalformedFileError, match=r"\[N, 3\]"):
        read_point_cloud(tmp_path / "flat.npy")


# ---- errors ----------------------------------------------------------------------------

def test_errors_are_typed_and_name_the_file(tmp_path):
    assert issubclass(PointCloudError, BTPError) and issubclass(PointCloudError, ValueError)
    missing = tmp_path / "absent.pcd"
    with pytest.raises(MissingFileError) as err:
        read_point_cloud(missing)
    assert err.value.path == missing and str(missing) in str(err.value) and err.value.reason
    with pytest.raises(UnsupportedFormatError, match=r"\.pcd.*\.npz") as err:
        read_point_cloud(tmp_path / "scan.las")
    assert err.value.path.name == "scan.las"


def test_empty_clouds(tmp_path, cloud):
    points, _, _ = cloud
    (tmp_path / "zero.pcd").write_bytes(b"")
    with pytest.raises(EmptyCloudError, match="zero.pcd"):
        read_point_cloud(tmp_path / "zero.pcd")
    (tmp_path / "none.pcd").write_text("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
                                       "WIDTH 0\nHEIGHT 1\nPOINTS 0\nDATA ascii\n")
    with pytest.raises(EmptyCloudError, match="POINTS 0"):
        read_point_cloud(tmp_path / "none.pcd")
    (tmp_path / "header.csv").write_text("x,y,z\n")
    with pytest.raises(EmptyCloudError):
        read_point_cloud(tmp_path / "header.csv")
    np.save(tmp_path / "none.npy", np.zeros((0, 3), np.float32))
    with pytest.raises(EmptyCloudError):
        read_point_cloud(tmp_path / "none.npy")


@pytest.mark.parametrize("suffix", [".npy", ".pcd", ".txt"])
def test_nan_rows_dropped_with_warning(tmp_path, cloud, suffix):
    points, labels, _ = cloud
    bad = points.copy()
    bad[[5, 50, 500], 1] = [np.nan, np.inf, -np.inf]
    path = tmp_path / f"nan{suffix}"
    if suffix == ".npy":
        np.save(path, bad)
    elif suffix == ".pcd":
        write_point_cloud(path, bad)
    else:
        np.savetxt(path, bad)
    with pytest.warns(UserWarning, match=r"dropped 3 of 600 rows"):
        back = read_point_cloud(path, min_points=N - 3)
    keep = np.ones(N, bool)
    keep[[5, 50, 500]] = False
    assert np.allclose(back.points, points[keep])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidValuesError, match="3 of 600 rows"):
            read_point_cloud(path, min_points=N - 2)


def test_all_nan_is_an_error(tmp_path):
    np.save(tmp_path / "allnan.npy", np.full((20, 3), np.nan, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidValuesError, match="allnan.npy"):
            read_point_cloud(tmp_path / "allnan.npy")


def test_too_few_points_names_the_need(tmp_path, cloud):
    points, _, _ = cloud
    path = write_point_cloud(tmp_path / "small.ply", points[:100])
    assert len(read_point_cloud(path, min_points=100)) == 100
    with pytest.raises(TooFewPointsError, match="100 points, fewer than the 2048"):
        read_point_cloud(path, min_points=2048)


@pytest.mark.parametrize("writer", ["ours", "open3d"])
def test_truncated_binary_pcd(tmp_path, cloud, writer):
    points, _, _ = cloud
    path = tmp_path / "full.pcd"
    if writer == "ours":
        write_point_cloud(path, points, scalars=points[:, 0])
    else:
        o3d.io.write_point_cloud(str(path), o3d_cloud(points))
    raw = path.read_bytes()
    cut = tmp_path / "cut.pcd"
    cut.write_bytes(raw[:-37])
    with pytest.raises(TruncatedFileError, match=r"cut.pcd.*announces 600 points"):
        read_point_cloud(cut)


def test_truncated_compressed_and_ascii_pcd(tmp_path, cloud):
    points, _, _ = cloud
    for mode in ("compressed", "ascii"):
        path = tmp_path / f"{mode}.pcd"
        o3d.io.write_point_cloud(str(path), o3d_cloud(points), write_ascii=mode == "ascii",
                                 compressed=mode == "compressed")
        raw = path.read_bytes()
        cut = tmp_path / f"cut_{mode}.pcd"
        cut.write_bytes(raw[: len(raw) - len(raw) // 3])
        with pytest.raises(TruncatedFileError, match=f"cut_{mode}.pcd"):
            read_point_cloud(cut)
    (tmp_path / "header_only.pcd").write_bytes(b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\n")
    with pytest.raises(TruncatedFileError, match="DATA"):
        read_point_cloud(tmp_path / "header_only.pcd")


@pytest.mark.parametrize("writer", ["ours", "open3d"])
def test_truncated_binary_ply(tmp_path, cloud, writer):
    points, _, colors = cloud
    path = tmp_path / "full.ply"
    if writer == "ours":
        write_point_cloud(path, points, colors=colors)
    else:
        o3d.io.write_point_cloud(str(path), o3d_cloud(points, colors))
    raw = path.read_bytes()
    cut = tmp_path / "cut.ply"
    cut.write_bytes(raw[:-100])
    with pytest.raises(TruncatedFileError, match=r"cut.ply.*announces 600 vertices"):
        read_point_cloud(cut)


def test_truncated_ascii_ply_and_text(tmp_path, cloud):
    points, labels, _ = cloud
    path = tmp_path / "ascii.ply"
    o3d.io.write_point_cloud(str(path), o3d_cloud(points), write_ascii=True)
    lines = path.read_text().splitlines(keepends=True)
    (tmp_path / "cut.ply").write_text("".join(lines[:-40]))
    with pytest.raises(TruncatedFileError, match="cut.ply"):
        read_point_cloud(tmp_path / "cut.ply")
    np.savetxt(tmp_path / "gt.txt", np.column_stack([points, labels]), fmt="%.6f %.6f %.6f %d")
    text = (tmp_path / "gt.txt").read_text()
    (tmp_path / "cut.txt").write_text(text[: text.rindex(" ")])  # last row loses its label
    with pytest.raises(TruncatedFileError, match="last row has 3 values"):
        read_point_cloud(tmp_path / "cut.txt")


def test_truncated_npy_and_npz(tmp_path, cloud):
    points, labels, _ = cloud
    np.save(tmp_path / "full.npy", points)
    raw = (tmp_path / "full.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[:-12])
    with pytest.raises(TruncatedFileError, match="cut.npy"):
        read_point_cloud(tmp_path / "cut.npy")
    np.savez(tmp_path / "full.npz", points=points, labels=labels)
    raw = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PointCloudError, match="cut.npz"):
        read_point_cloud(tmp_path / "cut.npz")
    assert not zipfile.is_zipfile(tmp_path / "cut.npz")


# ---- heat colours ----------------------------------------------------------------------

def test_heat_colors_follow_turbo():
    from matplotlib import colormaps

    scores = np.linspace(0.0, 10.0, 1000)
    colors = heat_colors(scores)
    assert colors.dtype == np.uint8 and colors.shape == (1000, 3)
    lut_positions = np.round(np.linspace(0.0, 1.0, 1000) * 255) / 255  # the 256-entry table's bins
    reference = colormaps["turbo"](lut_positions)[:, :3] * 255
    assert np.abs(colors.astype(float) - reference).max() <= 4.0
    # low scores blue-ish, high scores red-ish
    assert colors[0, 2] > colors[0, 0] and colors[-1, 0] > colors[-1, 2]


def test_heat_colors_range_nan_and_constant():
    clipped = heat_colors(np.array([-5.0, 0.0, 0.5, 1.0, 9.0]), vmin=0.0, vmax=1.0)
    assert np.array_equal(clipped[0], clipped[1]) and np.array_equal(clipped[3], clipped[4])
    assert not np.array_equal(clipped[1], clipped[2])
    with_nan = heat_colors(np.array([0.0, np.nan, 1.0]))
    assert np.array_equal(with_nan[1], [128, 128, 128])
    constant = heat_colors(np.full(4, 0.3))
    assert (constant == constant[0]).all()


def test_io_imports_without_torch():
    code = ("import sys, btp.io, btp.io.errors; from btp.io import iter_samples, read_point_cloud; "
            "assert 'torch' not in sys.modules, 'btp.io pulled in torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
