"""The label table: the single source of label values, names and display colours.

Every other module (infer, train, post-processing, level assignment, evaluation,
the datastore's Slicer remapping, the phantom generator) reads these names.

Values run 0..11 without gaps because 3D Slicer maps value *i* to the *i*-th
name of ``label_names`` sorted by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Structure:
    value: int
    name: str
    kind: str  # "background" | "vertebra" | "disc" | "canal"
    color: Tuple[int, int, int]  # RGB 0..255, shown by Slicer


STRUCTURES: Tuple[Structure, ...] = (
    Structure(0, "background", "background", (0, 0, 0)),
    Structure(1, "L1", "vertebra", (241, 214, 145)),
    Structure(2, "L2", "vertebra", (216, 101, 79)),
    Structure(3, "L3", "vertebra", (128, 174, 128)),
    Structure(4, "L4", "vertebra", (111, 184, 210)),
    Structure(5, "L5", "vertebra", (183, 156, 220)),
    Structure(6, "L1-L2", "disc", (255, 250, 160)),
    Structure(7, "L2-L3", "disc", (250, 140, 120)),
    Structure(8, "L3-L4", "disc", (170, 220, 170)),
    Structure(9, "L4-L5", "disc", (150, 210, 240)),
    Structure(10, "L5-S1", "disc", (220, 190, 250)),
    Structure(11, "spinal canal", "canal", (244, 214, 49)),
)

BACKGROUND = 0
NUM_CLASSES = len(STRUCTURES)  # network output channels, background included
IGNORE_VALUE = 255  # voxels excluded from every metric in reference masks (../shared/data convention)

VERTEBRAE: Tuple[int, ...] = tuple(s.value for s in STRUCTURES if s.kind == "vertebra")
DISCS: Tuple[int, ...] = tuple(s.value for s in STRUCTURES if s.kind == "disc")
CANAL: int = next(s.value for s in STRUCTURES if s.kind == "canal")

#: structure kinds in a fixed order (background first); the levels of a kind share its appearance
KINDS: Tuple[str, ...] = ("background", "vertebra", "disc", "canal")
#: index into ``KINDS`` of every label value 0..11
KIND_INDEX: Tuple[int, ...] = tuple(KINDS.index(s.kind) for s in STRUCTURES)

#: name -> value for all 12 classes, background included (what MONAI Label's ``labels`` expects)
LABELS: Dict[str, int] = {s.name: s.value for s in STRUCTURES}
NAMES: Dict[int, str] = {s.value: s.name for s in STRUCTURES}
COLORS: Dict[str, Tuple[int, int, int]] = {s.name: s.color for s in STRUCTURES if s.value != BACKGROUND}


def disc_between(upper_vertebra: int) -> int:
    """Value of the disc just below vertebra ``upper_vertebra`` (L5 -> L5-S1)."""
    if upper_vertebra not in VERTEBRAE:
        raise ValueError(f"{upper_vertebra} is not a vertebra value")
    return DISCS[VERTEBRAE.index(upper_vertebra)]


def normalise_name(name: str) -> str:
    """Canonical form used to match names sent by clients ("l1 - l2" == "L1-L2")."""
    return "".join(name.lower().split()).replace("_", "-")


_BY_NORMALISED_NAME = {normalise_name(s.name): s.value for s in STRUCTURES}
_BY_NORMALISED_NAME["canal"] = CANAL


def value_of(name: str) -> int:
    """Label value of a structure name, tolerant to case, blanks and '_' vs '-'.

    Raises ``KeyError`` with the known names when the name is not in the table.
    """
    try:
        return _BY_NORMALISED_NAME[normalise_name(name)]
    except KeyError:
        raise KeyError(f"unknown structure name {name!r}; known names: {list(LABELS)}") from None
