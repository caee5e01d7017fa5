"""The zero-shot split of ``shared/data/shapes``: which meshes train, which are held out.

Fixed in code (not drawn per seed) so every seed, every baseline and every eval sees the same
held-out set. Held out: *all* shapes of the kinds ``household`` and ``vehicle`` (whole unseen
categories) plus a fixed share of the other kinds (drawn once with
``numpy.random.default_rng(20260101)``: 20% of organic / mechanical, 25% of other, and then
written down here by name so a change of numpy cannot move it). Held-out meshes are never used
in training, pre-training or tuning. The corpus of ``btp data corpus`` adds whole held-out kicad
families (``btp.train.corpus.HELDOUT_KICAD_FAMILIES``). Torch-free.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from btp.train.corpus import HELDOUT_KICAD_FAMILIES, check_not_reserved

HELDOUT_KINDS: tuple[str, ...] = ("household", "vehicle")
HELDOUT_NAMES: tuple[str, ...] = (
    # organic (8 of 41)
    "armadillo", "chinese_dragon", "face_head", "fertility", "hand_fist", "homer", "max_planck",
    "teddy_bear",
    # mechanical (4 of 22)
    "anchor", "fandisk", "rotor", "tray_bottom_plate",
    # other (2 of 9)
    "rope_knot", "three_holes",
)


@dataclass(frozen=True, kw_only=True)
class Shape:
    name: str
    kind: str
    path: Path
    family: str = ""  # corpus entries (btp.train.corpus): "kicad:<folder>" or "shapes:<kind>"


@dataclass(frozen=True)
class ZeroShotSplit:
    train: tuple[Shape, ...]
    heldout: tuple[Shape, ...]

    def names(self, which: str) -> list[str]:
        return [s.name for s in getattr(self, which)]


def read_index(shapes_root) -> list[Shape]:
    """``index.json`` of the shapes folder -> Shape list (sorted by name)."""
    root = Path(shapes_root)
    index = root / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not found; point --shapes (or $BTP_SHAPES) at shared/data/shapes")
    entries = json.loads(index.read_text())
    shapes = sorted((Shape(name=e["name"], kind=e["kind"], path=root / e["file"],
                           family=e.get("family", "")) for e in entries),
                    key=lambda s: s.name)
    for s in shapes:
        check_not_reserved(s.path)
    return shapes


def is_heldout(shape: Shape) -> bool:
    """Held-out kinds and names of the shared shapes, and the held-out kicad families of the corpus."""
    family = shape.family.removeprefix("kicad:") if shape.family.startswith("kicad:") else None
    return shape.kind in HELDOUT_KINDS or shape.name in HELDOUT_NAMES or family in HELDOUT_KICAD_FAMILIES


def zero_shot_split(shapes_root) -> ZeroShotSplit:
    """The fixed split: (train shapes, held-out shapes), both sorted by name."""
    shapes = read_index(shapes_root)
    train = tuple(s for s in shapes if not is_heldout(s))
    heldout = tuple(s for s in shapes if is_heldout(s))
    return ZeroShotSplit(train=train, heldout=heldout)
