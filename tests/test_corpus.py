"""btp.train.corpus: the reserved kicad folders are refused by name and never read; the corpus
builder writes meshes with a manifest (source, licence, sha256); the split holds out families."""
from __future__ import annotations

import json

import numpy as np
import pytest

from btp.eval.meshdefects import _icosphere
from btp.train import corpus
from btp.train.corpus import (RESERVED_KICAD_FOLDERS, CorpusOptions, ReservedDataError, build_corpus,
                              check_not_reserved, family_files, kicad_families)


def _vrml(path, scale=1.0, shift=(0, 0, 0)):
    v, f = _icosphere(2)
    v = v * scale + np.asarray(shift)
    pts = ", ".join(" ".join(f"{c:.5f}" for c in p) for p in v)
    idx = ", ".join(f"{a} {b} {c} -1" for a, b, c in f)
    path.write_text("#VRML V2.0 utf8\nShape { geometry IndexedFaceSet { coord Coordinate { point [ "
                    f"{pts} ] }} coordIndex [ {idx} ] }} }}\n")


@pytest.fixture()
def fake_kicad(tmp_path):
    root = tmp_path / "3dmodels"
    for name in ("Package_DIP", "Crystal", *RESERVED_KICAD_FOLDERS[:3]):
        (root / f"{name}.3dshapes").mkdir(parents=True)
    _vrml(root / "Package_DIP.3dshapes" / "DIP-8.wrl")
    _vrml(root / "Package_DIP.3dshapes" / "DIP-8_copy.wrl", scale=3.0, shift=(5, 0, 0))  # same shape, moved
    _vrml(root / "Package_DIP.3dshapes" / "DIP-14.wrl", scale=np.array([1.0, 1.0, 0.5]))  # another shape
    _vrml(root / "Crystal.3dshapes" / "HC49.wrl", scale=np.array([2.0, 1.0, 1.0]))
    for name in RESERVED_KICAD_FOLDERS[:3]:
        _vrml(root / f"{name}.3dshapes" / "part.wrl")
    return root


def test_reserved_folders_are_refused_by_name():
    for name in RESERVED_KICAD_FOLDERS:
        with pytest.raises(ReservedDataError, match=f"{name}.3dshapes is reserved"):
            check_not_reserved(f"/usr/share/kicad/3dmodels/{name}.3dshapes/anything.wrl")
    check_not_reserved("/usr/share/kicad/3dmodels/Relay_SMD.3dshapes/x.wrl")  # a neighbour is fine
    check_not_reserved("/data/Relay_THT_notes/x.wrl")  # only the folder name itself counts


def test_the_builder_never_reads_a_reserved_folder(fake_kicad, tmp_path, monkeypatch):
    assert kicad_families(fake_kicad) == ["Crystal", "Package_DIP"]
    with pytest.raises(ReservedDataError):
        family_files(fake_kicad, "Relay_THT", 4)
    with pytest.raises(ReservedDataError):
        corpus.read_wrl(fake_kicad / "Relay_THT.3dshapes" / "part.wrl", 1000)
    read = []
    real = corpus.read_wrl
    monkeypatch.setattr(corpus, "read_wrl", lambda p, m: read.append(p) or real(p, m))
    summary = build_corpus(tmp_path / "out", CorpusOptions(kicad_root=str(fake_kicad)), log=lambda *_: None)
    assert read and not any(corpus.reserved_folder(p) for p in read)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    names = sorted(e["name"] for e in index)
    assert names == ["kicad__Crystal__HC49", "kicad__Package_DIP__DIP-14", "kicad__Package_DIP__DIP-8"]
    assert any("same geometry" in s for s in summary["skipped"])  # DIP-8_copy deduplicated
    for e in index:
        mesh = tmp_path / "out" / e["file"]
        assert mesh.is_file() and e["licence"].startswith("CC-BY-SA-4.0") and len(e["sha256"]) == 64
        from btp.io.files import file_sha256
        assert file_sha256(mesh) == e["sha256"] and e["family"].startswith("kicad:")
    from btp.io import load_mesh

    v, f = load_mesh(tmp_path / "out" / index[0]["file"])
    assert len(f) == 320 and np.isfinite(v).all()


def test_split_holds_out_families_and_refuses_reserved_paths(tmp_path):
    from btp.train.split import read_index, zero_shot_split

    entries = [{"name": "a", "kind": "industrial", "family": "kicad:Crystal", "file": "a.ply"},
               {"name": "b", "kind": "industrial", "family": "kicad:Package_DIP", "file": "b.ply"}]
    (tmp_path / "index.json").write_text(json.dumps(entries))
    split = zero_shot_split(tmp_path)
    assert split.names("heldout") == ["a"] and split.names("train") == ["b"]  # Crystal is a held-out family
    entries.append({"name": "c", "kind": "industrial", "family": "kicad:Fuse", "file": "Fuse.3dshapes/c.ply"})
    (tmp_path / "index.json").write_text(json.dumps(entries))
    with pytest.raises(ReservedDataError):
        read_index(tmp_path)
