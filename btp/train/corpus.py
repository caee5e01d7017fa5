"""The training corpus: ``btp data corpus --out DIR`` (shared shapes + Debian's kicad-packages3d).

Built on demand, never committed. ``DIR`` gets the same layout as ``shared/data/shapes`` so every
training command takes it as ``--shapes DIR``:

    DIR/index.json      [{name, kind, family, file, source, licence, sha256, vertices, faces}, ...]
    DIR/meshes/*.ply    one triangle mesh per entry (kicad parts decimated to <= max_faces)
    DIR/corpus.json     how it was built (options, package version, counts, skipped files)

Sources:
- every mesh of ``shared/data/shapes`` (kind and name as there, family = ``shapes:<kind>``);
- up to ``per_family`` parts of each folder ``<family>.3dshapes`` of Debian's ``kicad-packages3d``
  (``/usr/share/kicad/3dmodels``; CC-BY-SA-4.0 with the KiCad libraries exception), read from
  their VRML ``.wrl`` with pymeshlab, decimated with its quadric edge collapse, deduplicated by a
  hash of the normalised geometry. The parts of a family are taken evenly spread over its
  sorted file list, so one run always picks the same files.

Ten kicad folders are reserved for independent evaluation (``RESERVED_KICAD_FOLDERS``): the
corpus builder skips them by name before looking inside, and ``check_not_reserved`` refuses any
path through them - for every purpose (training, tuning, our own evaluation).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath

import numpy as np

from btp.errors import BTPError
from btp.io.files import atomic_write_bytes, file_sha256

KICAD_ROOT = Path("/usr/share/kicad/3dmodels")
KICAD_PACKAGE = "kicad-packages3d"
KICAD_LICENCE = "CC-BY-SA-4.0 with the KiCad libraries exception (Debian package kicad-packages3d)"

# Reserved for independent evaluation: never read, listed or loaded by anything in btp.
RESERVED_KICAD_FOLDERS: tuple[str, ...] = (
    "Relay_THT", "Connector_Dsub", "Transformer_THT", "Capacitor_THT", "Fuse", "Potentiometer_THT",
    "Buzzer_Beeper", "Heatsink", "Connector_RJ", "Battery",
)

# Our own zero-shot split of the kicad families: these never train; they are the held-out
# validation/test families of the card (chosen by hand for variety of shape, before any run).
HELDOUT_KICAD_FAMILIES: tuple[str, ...] = (
    "Button_Switch_THT", "Connector_IDC", "Connector_Molex", "Converter_DCDC", "Crystal",
    "Display_7Segment", "Inductor_THT", "LED_THT", "Package_QFP", "Package_TO_SOT_THT",
    "TerminalBlock_Phoenix", "Varistor",
)


class ReservedDataError(BTPError, PermissionError):
    """A path lies in one of the kicad folders reserved for independent evaluation."""


class CorpusError(BTPError, RuntimeError):
    """The corpus cannot be built (missing package or library); says how to fix it."""


def reserved_folder(path: str | PurePath) -> str | None:
    """The reserved family a path goes through (``<name>.3dshapes`` as any component), else None."""
    for part in PurePath(path).parts:
        if part.endswith(".3dshapes") and part[: -len(".3dshapes")] in RESERVED_KICAD_FOLDERS:
            return part[: -len(".3dshapes")]
    return None


def check_not_reserved(path: str | PurePath) -> None:
    """Raise ReservedDataError for a path inside a reserved kicad folder (without touching it)."""
    family = reserved_folder(path)
    if family is not None:
        raise ReservedDataError(
            f"{path}: {family}.3dshapes is reserved for independent evaluation and is never loaded "
            f"by btp (reserved: {', '.join(RESERVED_KICAD_FOLDERS)})")


def kicad_families(root: str | Path = KICAD_ROOT) -> list[str]:
    """Family names (``<name>.3dshapes`` folders) under ``root``, reserved ones excluded by name."""
    root = Path(root)
    names = sorted(p.name[: -len(".3dshapes")] for p in root.iterdir()
                   if p.name.endswith(".3dshapes") and p.is_dir())
    return [n for n in names if n not in RESERVED_KICAD_FOLDERS]


def family_files(root: str | Path, family: str, per_family: int) -> list[Path]:
    """Up to ``per_family`` candidate ``.wrl`` files of one family, evenly spread over its sorted
    list, then the rest in order (fallbacks when a pick fails or duplicates another)."""
    folder = Path(root) / f"{family}.3dshapes"
    check_not_reserved(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".wrl")
    if not files:
        return []
    k = min(per_family, len(files))
    picks = {int(round(i * (len(files) - 1) / max(k - 1, 1))) for i in range(k)}
    return [files[i] for i in sorted(picks)] + [f for i, f in enumerate(files) if i not in picks]


def read_wrl(path: str | Path, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """A KiCad VRML part -> (vertices float64 [V,3] in mm, faces int64 [F,3]), decimated to
    <= max_faces with quadric edge collapse; duplicate vertices merged first."""
    check_not_reserved(path)
    try:
        import pymeshlab
    except ImportError as exc:
        raise CorpusError("reading kicad .wrl parts needs pymeshlab: pip install 'btp-edge[corpus]'") from exc
    ms = pymeshlab.MeshSet()
    ms.load_new_mesh(str(path))
    ms.meshing_remove_duplicate_vertices()
    ms.meshing_remove_unreferenced_vertices()
    if ms.current_mesh().face_number() > max_faces:
        ms.meshing_decimation_quadric_edge_collapse(targetfacenum=max_faces, preservetopology=False)
    m = ms.current_mesh()
    # KiCad's VRML unit is 0.1 inch.
    return np.asarray(m.vertex_matrix(), np.float64) * 2.54, np.asarray(m.face_matrix(), np.int64)


def geometry_hash(vertices: np.ndarray, faces: np.ndarray) -> str:
    """Hash of the shape up to position and scale, robust to float noise: vertex and face counts,
    the normalised covariance spectrum (3 decimals) and a 16-bin histogram of vertex radii from
    the centroid - identical parts under other names (or moved, or in other units) collide."""
    v = vertices - vertices.mean(axis=0)
    radii = np.linalg.norm(v, axis=1)
    r = float(radii.max()) or 1.0
    spectrum = np.linalg.eigvalsh((v / r).T @ (v / r) / max(len(v), 1))
    hist = np.histogram(radii / r, bins=16, range=(0.0, 1.0))[0]
    key = f"{len(vertices)}|{len(faces)}|{np.round(spectrum, 3).tolist()}|{hist.tolist()}"
    return hashlib.sha256(key.encode()).hexdigest()


def write_ply(path: Path, vertices: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY (float32 vertices, int32 triangles), written atomically."""
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(vertices)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    face_rec = np.empty(len(faces), dtype=[("n", "u1"), ("idx", "<i4", (3,))])
    face_rec["n"] = 3
    face_rec["idx"] = faces
    atomic_write_bytes(path, header + np.asarray(vertices, "<f4").tobytes() + face_rec.tobytes())


@dataclass(kw_only=True)
class CorpusOptions:
    per_family: int = 4
    max_faces: int = 20000
    min_faces: int = 40
    shapes: str = ""  # shared/data/shapes
    kicad_root: str = str(KICAD_ROOT)


def _package_version(name: str) -> str | None:
    import subprocess

    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def build_corpus(out: str | Path, options: CorpusOptions, log=print) -> dict:
    """Write the corpus to ``out`` (see the module docstring) -> the corpus.json summary."""
    out = Path(out)
    meshes = out / "meshes"
    meshes.mkdir(parents=True, exist_ok=True)
    entries: list[dict] = []
    seen: dict[str, str] = {}
    skipped: list[str] = []

    if options.shapes:
        shapes_root = Path(options.shapes)
        index = json.loads((shapes_root / "index.json").read_text())
        for e in sorted(index, key=lambda e: e["name"]):
            src = shapes_root / e["file"]
            dest = meshes / f"shapes__{e['name']}{src.suffix}"
            shutil.copyfile(src, dest)
            entries.append({"name": e["name"], "kind": e["kind"], "family": f"shapes:{e['kind']}",
                            "file": f"meshes/{dest.name}", "source": f"shared/data/shapes/{e['file']} ({e.get('source', '')})",
                            "licence": e.get("licence", ""), "sha256": file_sha256(dest),
                            "vertices": e.get("vertices"), "faces": e.get("faces")})
        log(f"corpus: {len(entries)} meshes from {shapes_root}")

    kicad_root = Path(options.kicad_root)
    if not kicad_root.is_dir():
        raise CorpusError(f"{kicad_root}: not found; install Debian's kicad-packages3d "
                          "(sudo apt-get install kicad-packages3d) or pass --kicad-root")
    version = _package_version(KICAD_PACKAGE)
    families = kicad_families(kicad_root)
    for fam_i, family in enumerate(families):
        taken = 0
        for path in family_files(kicad_root, family, options.per_family):
            if taken >= options.per_family:
                break
            try:
                vertices, faces = read_wrl(path, options.max_faces)
            except Exception as exc:  # pymeshlab raises its own PyMeshLabException on bad files
                skipped.append(f"{path}: {exc}")
                continue
            if len(faces) < options.min_faces:
                skipped.append(f"{path}: {len(faces)} faces < {options.min_faces}")
                continue
            digest = geometry_hash(vertices, faces)
            if digest in seen:
                skipped.append(f"{path}: same geometry as {seen[digest]}")
                continue
            seen[digest] = path.name
            name = f"kicad__{family}__{path.stem}"
            dest = meshes / f"{name}.ply"
            write_ply(dest, vertices, faces)
            entries.append({"name": name, "kind": "industrial", "family": f"kicad:{family}",
                            "file": f"meshes/{dest.name}",
                            "source": f"Debian package {KICAD_PACKAGE} {version or '?'}: {path}",
                            "licence": KICAD_LICENCE, "sha256": file_sha256(dest),
                            "vertices": int(len(vertices)), "faces": int(len(faces))})
            taken += 1
        log(f"corpus: [{fam_i + 1}/{len(families)}] {family}: {taken} parts")

    (out / "index.json").write_text(json.dumps(entries, indent=1))
    summary = {"options": asdict(options), "kicad_package_version": version, "meshes": len(entries),
               "kicad_families": families, "reserved_never_read": list(RESERVED_KICAD_FOLDERS),
               "heldout_kicad_families": list(HELDOUT_KICAD_FAMILIES), "skipped": skipped}
    (out / "corpus.json").write_text(json.dumps(summary, indent=1))
    log(f"corpus: wrote {len(entries)} meshes to {out} ({len(skipped)} files skipped, see corpus.json)")
    return summary
