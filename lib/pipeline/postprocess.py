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

What :func:`restrict_to_midline` enforces, and why: a structure lies within an anatomical
distance of the spine's midline (left-right), found from the predicted canal. The starter
network learnt from central sagittal slabs 13-30 mm wide and has never seen a lateral slice
(psoas, kidneys, ribs); on a scan 60-80 mm wide it paints vertebrae, discs and canal on every
slice (measured on the development scans of other sites: model card, *The midline prior*).

Connectivity is the full 26-neighbourhood (3x3x3), the usual choice for "same object".
Everything is vectorised: each structure is labelled once, inside its bounding box.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from lib.pipeline.errors import InvalidInput
from lib.pipeline.labels import CANAL, DISCS, KIND_INDEX, KINDS, NAMES, NUM_CLASSES, VERTEBRAE

#: 26-neighbourhood: voxels touching by a face, an edge or a corner are connected
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

#: structures that are anatomically one connected object
_SINGLE_COMPONENT = tuple(DISCS) + (CANAL,)
_FOREGROUND = tuple(VERTEBRAE) + tuple(DISCS) + (CANAL,)

#: mm from the spine's midline (left-right) beyond which a structure is not anatomy but a
#: false positive. Adult lumbar anatomy with a margin for the midline estimate: the bony canal
#: is 20-27 mm wide between the pedicles; vertebral bodies 40-55 mm and discs up to 55 mm
#: wide; the posterior elements reach furthest, the L3 transverse processes 90-100 mm tip to tip.
LATERAL_LIMIT_MM = {"canal": 16.0, "disc": 32.0, "vertebral body": 32.0, "posterior elements": 52.0}
#: below this canal volume there is no midline to measure from, and nothing is removed
MIN_CANAL_ML = 1.0
#: share of an axial plane's (smoothed) canal area that must lie within the canal's half-width
#: of its peak for the plane to tell where the midline is
MIN_CANAL_CONCENTRATION = 0.5
#: cranio-caudal window over which the midline is smoothed: a scoliotic curve bends over
#: several levels, a stray canal blob spans less
MIDLINE_SMOOTHING_MM = 40.0


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


def _axes(affine: np.ndarray) -> Tuple[int, int, int]:
    """Array axes (left-right, anterior-posterior, superior-inferior) of a voxel -> RAS affine."""
    codes = nib.aff2axcodes(affine)
    return tuple(next(i for i, c in enumerate(codes) if c in pair) for pair in ("LR", "AP", "SI"))


def _odd(n: float) -> int:
    return max(1, int(round(n)) // 2 * 2 + 1)


def _fit_midline(planes: np.ndarray, z: np.ndarray, x: np.ndarray, mass: np.ndarray,
                 z_spacing: float, x_spacing: float, tolerance_mm: float, rounds: int = 10) -> np.ndarray:
    """Left-right midline (voxels) at every plane of ``planes``: a robust polynomial fit of the
    canal's centres ``x`` at planes ``z`` weighted by their canal ``mass``; Tukey's
    biweight with a cut-off of twice ``tolerance_mm`` drops planes whose peak is a stray
    blob instead of the tube. Degree 2 (a scoliotic bend) over a cranio-caudal span of more
    than 100 mm, 1 over more than 30 mm, else a constant."""
    span_mm = (z.max() - z.min()) * z_spacing
    degree = 2 if span_mm > 100 else 1 if span_mm > 30 else 0
    weights = mass.astype(float)
    for _ in range(rounds):
        if weights.sum() <= 0:
            break
        coefficients = np.polyfit(z, x, degree, w=np.sqrt(weights))
        residual_mm = np.abs(x - np.polyval(coefficients, z)) * x_spacing
        biweight = np.clip(1 - (residual_mm / (2 * tolerance_mm)) ** 2, 0, None) ** 2
        weights = mass * biweight
    return np.polyval(coefficients, planes)


def restrict_to_midline(label: np.ndarray, affine: np.ndarray,
                        limits_mm: Dict[str, float] = LATERAL_LIMIT_MM) -> Tuple[np.ndarray, Dict[str, float]]:
    """Remove structures further from the spine's midline (left-right) than anatomy allows.

    Args:
        label: 3D label map ``(X, Y, Z)`` in any voxel order, values of :mod:`lib.pipeline.labels`.
        affine: its 4x4 voxel -> RAS mm matrix (tells which axis is left-right, and the spacing).
        limits_mm: half-widths in mm, keys as :data:`LATERAL_LIMIT_MM`: the canal, the discs,
            the vertebrae anterior to the canal's centre (bodies) and at or behind it (arches).

    The midline: per axial plane, the canal area along left-right after a box mean over
    :data:`MIDLINE_SMOOTHING_MM` cranio-caudally (a stray lateral canal blob does not
    outweigh the tube), and the centre of that area within the canal's half-width of its
    peak; only planes where the canal is compact around the peak count
    (:data:`MIN_CANAL_CONCENTRATION`; elsewhere the network painted canal across the
    slices). A robust polynomial through those centres (:func:`_fit_midline`) gives the
    midline of every plane, so a compact blob far from the tube, at the scan's top or
    bottom, does not pull it. The canal's anterior-posterior centre within the midline band
    (median-filtered over the same window) splits the vertebrae into bodies (anterior) and
    posterior elements.

    Returns a new uint8 array (unchanged where the canal is under :data:`MIN_CANAL_ML`) and
    the volume removed per structure name in mL (only structures that lost voxels).
    """
    label = check_label_map(label)
    affine = np.asarray(affine, dtype=float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = voxel_volume_ml(spacing)
    lr, ap, si = _axes(affine)
    # everything below works on the foreground voxels' coordinates, not on whole volumes:
    # on a full field of view the spine is a few per cent of the scan
    coords = np.nonzero(label)
    values = label[coords]
    at_si, at_lr, at_ap = coords[si], coords[lr], coords[ap]
    is_canal = values == CANAL
    if np.count_nonzero(is_canal) * voxel_ml < MIN_CANAL_ML:
        return label.copy(), {}
    n_si, n_lr = label.shape[si], label.shape[lr]
    # canal area per (axial plane, left-right position), smoothed cranio-caudally
    area = np.bincount(at_si[is_canal] * n_lr + at_lr[is_canal], minlength=n_si * n_lr).reshape(n_si, n_lr)
    window = _odd(MIDLINE_SMOOTHING_MM / spacing[si])
    profile = ndi.uniform_filter1d(area.astype(np.float32), window, axis=0, mode="nearest")
    profile = ndi.uniform_filter1d(profile, _odd(6.0 / spacing[lr]), axis=1, mode="nearest")
    planes, positions = np.arange(n_si), np.arange(n_lr)
    peak = profile.argmax(1)
    near_peak = np.abs(positions[None, :] - peak[:, None]) * spacing[lr] <= limits_mm["canal"]
    total = profile.sum(1)
    mass = (profile * near_peak).sum(1)
    # a plane tells the midline only where its canal is one compact tube, not paint across the slices
    compact = (total > 0) & (mass >= MIN_CANAL_CONCENTRATION * total)
    if not compact.any():
        return label.copy(), {}
    # the centre of the canal around the peak, not the peak itself: where the canal fills a
    # narrow slab the profile is flat-topped and its argmax wanders from plane to plane
    centre = (profile * near_peak * positions[None, :]).sum(1)[compact] / mass[compact]
    midline = _fit_midline(planes, planes[compact], centre, mass[compact], spacing[si], spacing[lr],
                           limits_mm["canal"])
    midline = np.clip(midline, 0, n_lr - 1)
    distance = np.abs(at_lr - midline[at_si]) * spacing[lr]  # mm, per foreground voxel
    # anterior-posterior centre of the canal in the midline band, per axial plane
    band = is_canal & (distance <= limits_mm["canal"])
    if not band.any():
        band = is_canal
    counts = np.bincount(at_si[band], minlength=n_si)
    sums = np.bincount(at_si[band], weights=at_ap[band], minlength=n_si)
    known = counts > 0
    ap_centre = np.interp(planes, planes[known], sums[known] / counts[known])
    ap_centre = ndi.median_filter(ap_centre, size=window, mode="nearest")
    anterior_sign = np.sign(affine[1, ap]) or 1.0  # RAS +y is anterior
    anterior = (at_ap - ap_centre[at_si]) * anterior_sign > 0

    kind = np.zeros(256, dtype=np.uint8)  # KINDS index per label value; values outside the table: background
    kind[:NUM_CLASSES] = KIND_INDEX
    kinds = kind[values]
    vertebra_limit = np.where(anterior, limits_mm["vertebral body"], limits_mm["posterior elements"])
    remove = (((kinds == KINDS.index("canal")) & (distance > limits_mm["canal"]))
              | ((kinds == KINDS.index("disc")) & (distance > limits_mm["disc"]))
              | ((kinds == KINDS.index("vertebra")) & (distance > vertebra_limit)))
    out = label.copy()
    out[tuple(c[remove] for c in coords)] = 0
    removed_counts = np.bincount(values[remove], minlength=256)
    removed = {NAMES[v]: round(float(removed_counts[v]) * voxel_ml, 3) for v in _FOREGROUND if removed_counts[v]}
    return out, removed


def structure_volumes_ml(label: np.ndarray, spacing_mm: Sequence[float]) -> Dict[str, float]:
    """Volume in mL of each of the 11 foreground structures, keyed by name (0.0 when absent).

    Rounded to 3 decimals (1 uL); voxels of values outside the table are not counted.
    """
    label = check_label_map(label)
    counts = np.bincount(label.ravel(), minlength=256)
    voxel_ml = voxel_volume_ml(spacing_mm)
    return {NAMES[v]: round(float(counts[v]) * voxel_ml, 3) for v in sorted(_FOREGROUND)}
