"""Per-structure clean-up of a predicted label map, and structure volumes.

Input everywhere: a 3D integer label map ``(X, Y, Z)`` in any voxel order with the
values of :mod:`lib.pipeline.labels` (0 background, 1..5 L1..L5 whole vertebrae, 6..10 discs,
11 spinal canal), and the voxel spacing per array axis in **mm**. Volumes are in
**mL** (1 mL = 1000 mm^3). Values outside the table (e.g. 255 = ignore in reference
masks) are passed through untouched.

What :func:`clean_label` enforces, and why:

* discs and the canal are single objects, so only their largest 3D connected
  component is kept (a disc piece set aside here can still fill a missing level:
  :func:`lib.pipeline.levels.recover_missing_discs`);
* a whole vertebra may legitimately be several pieces (in a thin sagittal slab the
  body and the spinous process do not meet; the pedicles that join them lie
  outside the slab), so every vertebra piece of at least ``min_island_ml`` is kept
  and only smaller islands (speckle) are dropped;
* holes inside a structure are filled, but only where the voxel is background: a
  fill never overwrites another structure.

Connectivity is the full 26-neighbourhood (3x3x3), the usual choice for "same object".
Everything is vectorised: each structure is labelled once, inside its bounding box.
"""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy import ndimage as ndi

from lib.pipeline.errors import InvalidInput
from lib.pipeline.labels import CANAL, DISCS, NAMES, VERTEBRAE

#: 26-neighbourhood: voxels touching by a face, an edge or a corner are connected
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

#: structures that are anatomically one connected object
_SINGLE_COMPONENT = tuple(DISCS) + (CANAL,)
_FOREGROUND = tuple(VERTEBRAE) + tuple(DISCS) + (CANAL,)


def check_label_map(label: np.ndarray) -> np.ndarray:
    """A 3D array of integer values 0..255 as uint8, or :class:`InvalidInput`."""
    label = np.asarray(label)
    if label.ndim != 3:
        raise InvalidInput(f"label map must be 3D, got shape {label.shape}")
    if label.dtype.kind not in "iub":
        if label.dtype.kind != "f" or not np.all(np.mod(label, 1) == 0):
            raise InvalidInput(f"label map must hold integer values, got dtype {label.dtype}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise InvalidInput("label values must lie in 0..255")
    return label.astype(np.uint8, copy=False)


def voxel_volume_ml(spacing_mm: Sequence[float]) -> float:
    """Volume of one voxel in mL from the spacing per axis in mm."""
    spacing = np.asarray(spacing_mm, dtype=float).ravel()
    if spacing.size != 3 or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InvalidInput(f"spacing must be 3 positive numbers (mm), got {spacing_mm!r}")
    return float(np.prod(spacing)) / 1000.0


def _component_sizes(mask: np.ndarray):
    """26-connected components of ``mask``: (component map, voxel count per id, id 0 = background)."""
    components, n = ndi.label(mask, structure=CONNECTIVITY_26)
    return components, np.bincount(components.ravel(), minlength=n + 1)


def _keep_mask(value: int, mask: np.ndarray, min_island_voxels: float,
               single_component: Sequence[int] = _SINGLE_COMPONENT) -> np.ndarray:
    """Voxels of one structure (inside its bounding box) that survive island removal."""
    components, sizes = _component_sizes(mask)
    if value in single_component:
        if sizes.size <= 2:  # one component (or none): nothing to remove
            return mask
        keep_ids = np.zeros(sizes.size, dtype=bool)
        keep_ids[1 + int(np.argmax(sizes[1:]))] = True
    else:  # vertebra (or any structure not in single_component): several pieces, drop only speckle
        keep_ids = sizes >= min_island_voxels
        keep_ids[0] = False
        if keep_ids[1:].all():
            return mask
    return keep_ids[components]


def clean_label(label: np.ndarray, spacing_mm: Sequence[float], min_island_ml: float = 0.1,
                single_component: Sequence[int] = _SINGLE_COMPONENT) -> np.ndarray:
    """Clean a predicted label map structure by structure.

    Args:
        label: 3D integer array ``(X, Y, Z)``, values 0..11 (any voxel order).
        spacing_mm: voxel size along each array axis, in mm.
        min_island_ml: pieces smaller than this (mL) of the other structures are removed.
        single_component: structures reduced to their largest 26-connected component
            (default: the discs and the canal); the others keep every piece of at least
            ``min_island_ml`` (the pieces :func:`lib.pipeline.levels.recover_missing_discs`
            chooses from).

    Returns:
        a new ``uint8`` array of the same shape: ``single_component`` structures reduced
        to their largest 26-connected component, islands < ``min_island_ml`` of the others
        removed, holes of every structure filled where the voxel is background.
    """
    label = check_label_map(label)
    if not np.isfinite(min_island_ml) or min_island_ml < 0:
        raise InvalidInput(f"min_island_ml must be >= 0, got {min_island_ml}")
    min_island_voxels = float(min_island_ml) / voxel_volume_ml(spacing_mm)
    out = label.copy()
    # one pass over the array gives every structure's bounding box (index value-1)
    boxes = ndi.find_objects(label)

    # 1) island removal, each structure inside its own bounding box
    for value in _FOREGROUND:
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        mask = label[box] == value
        keep = _keep_mask(value, mask, min_island_voxels, single_component)
        if keep is not mask:
            sub = out[box]  # a view: writes go to ``out``
            sub[mask & ~keep] = 0

    # 2) hole filling after removal, so that a removed island enclosed by another
    #    structure becomes a hole of that structure and is filled by it
    boxes = ndi.find_objects(out)
    for value in _FOREGROUND:
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        sub = out[box]
        mask = sub == value
        # a hole touching the box face touches the outside (the box is tight), so
        # filling inside the box equals filling in the whole array
        holes = ndi.binary_fill_holes(mask) & ~mask & (sub == 0)
        sub[holes] = value
    return out


def structure_volumes_ml(label: np.ndarray, spacing_mm: Sequence[float]) -> Dict[str, float]:
    """Volume in mL of each of the 11 foreground structures, keyed by name (0.0 when absent).

    Rounded to 3 decimals (1 uL); voxels of values outside the table are not counted.
    """
    label = check_label_map(label)
    counts = np.bincount(label.ravel(), minlength=256)
    voxel_ml = voxel_volume_ml(spacing_mm)
    return {NAMES[v]: round(float(counts[v]) * voxel_ml, 3) for v in sorted(_FOREGROUND)}
