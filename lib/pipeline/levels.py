"""Level assignment: renumber vertebrae and discs so that they follow the anatomy.

A segmentation network can swap levels (L3 predicted where L2 is), call T12 "L1"
(an extra vertebra at the top), or miss a level. :func:`assign_levels` renumbers the
vertebrae (labels 1..5) and discs (6..10) of a label map by their cranio-caudal order:
L1 highest ... L5 lowest, each disc between its two vertebrae. The spinal canal (11),
background and any other value are left untouched.

Geometry: the label map is a 3D array ``(X, Y, Z)`` in any voxel order (RIP, IPR,
LPS, RAS ...). ``affine`` is the 4x4 voxel->world matrix in RAS world coordinates and
mm (nibabel convention), so the cranio-caudal coordinate of voxel ``ijk`` is
``(affine @ [i, j, k, 1])[2]`` (larger = more superior). All decisions are taken in
world coordinates, so a flipped or transposed array with the matching affine gives
the same result. Volumes are in mL.

Method:

1. *Instances.* Each vertebra/disc label value is split into 26-connected
   components (one ``scipy.ndimage.label`` call per value, inside its bounding box).
   Discs come first. A vertebra label with bone over a disc's footprint both just
   above and just below it covers two levels (T12 and L1 both called "L1", often
   touching); it is split there (seeds next to the disc, geodesic flooding for the
   rest), one instance per level. Otherwise the components of a label are grouped
   largest first: the largest seeds an instance; a further component of at least
   ``min_instance_ml`` at another height than every seed (cranio-caudal extents
   barely overlap) is another instance; every other component (posterior elements
   separated from their body in a thin slab, fragments) follows the nearest
   instance of its label. Components of a label with no instance at all (every
   piece < ``min_instance_ml``) are removed.
2. *Order.* Instances are sorted top -> bottom by the world z of their centroid and
   matched to the 10 ordered slots ``[L1, L1-L2, L2, L2-L3, ..., L5, L5-S1]`` by an
   order-preserving dynamic programme: a vertebra instance may only take a vertebra
   slot, a disc only a disc slot, slots strictly increase going down. The programme
   maximises, in this order: (a) the number of instances placed; (b) the number of
   instances left out *between* placed ones (fewer is better: leftovers at the top
   or bottom are anatomy, T12 or a transitional L6; leftovers in the middle are
   errors); (c) agreement with the network's own label; (d) keeping the lowest
   instances and (e) the lowest slots, because the L5-S1 disc on the sacrum is the
   anchor that radiologists count from.
3. *Leftovers.* Instances left out at the top or bottom are reported as extra
   (possible T12 / transitional vertebra) and removed. An instance left out in the
   middle keeps its own label if no other instance took that level (it is then
   reported as ``out_of_order``, and a disc there as not between its vertebrae);
   otherwise it is removed and reported.
4. *Report.* Present/missing levels, extras, discs not between their vertebrae
   (disc centroid z not strictly between the centroids of the nearest present
   vertebrae above and below), the renumbering, and sentences for the radiologist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage as ndi

from lib.pipeline.errors import InvalidInput
from lib.pipeline.labels import CANAL, DISCS, LABELS, NAMES, VERTEBRAE
from lib.pipeline.postprocess import check_label_map, clean_label, restrict_to_midline

CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

#: the 10 lumbar levels from top to bottom: L1, L1-L2, L2, L2-L3, ..., L5, L5-S1
SLOTS: Tuple[int, ...] = tuple(v for pair in zip(VERTEBRAE, DISCS) for v in pair)
_KIND = {**{v: "vertebra" for v in VERTEBRAE}, **{d: "disc" for d in DISCS}}

#: a component whose cranio-caudal extent overlaps every seed of its label by less than
#: this fraction of its own extent lies at another level. Posterior elements overlap
#: their own body by >= 28% in the SPIDER reference masks, a neighbouring level ~0%.
NEW_LEVEL_MAX_OVERLAP = 0.1
#: ... and a piece at least this fraction of the label's largest piece is a second body
#: unless it overlaps a seed by this much: neighbouring bodies overlap a little in z
#: (tilt), while posterior elements are <= 40% of their body in SPIDER slabs
SECOND_BODY_MIN_RATIO = 0.5
SECOND_BODY_MAX_OVERLAP = 0.5
#: disc footprint sampling, and how far above/below a disc bone counts as "touching it"
FOOTPRINT_CELL_MM = 2.0
SPLIT_BAND_MM = 15.0
#: bone needed on each side of a disc (mL, at least) before a label is split there
SPLIT_MIN_ML = 0.5
#: a missing end level (L1 / L5-S1 side) counts as outside the field of view when the
#: nearest found level's seed reaches within this many mm of the scan's edge
FOV_EDGE_MM = 15.0


@dataclass
class _Instance:
    source: int  # label value the network gave it
    volume_ml: float
    centroid: np.ndarray  # world mm, (3,)
    seed_zrange: Tuple[float, float]  # world z extent of the seed component, mm
    seed_centroid: np.ndarray
    components: List[int] = field(default_factory=list)  # ids in its label's component map, seed first
    voxels: int = 0
    slot: Optional[int] = None  # index into SLOTS once placed
    status: str = "unassigned"  # "placed" | "kept out of order" | "extra" | "removed"

    @property
    def kind(self) -> str:
        return _KIND[self.source]

    @property
    def z(self) -> float:
        return float(self.centroid[2])


def _check_inputs(label: np.ndarray, affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    label = check_label_map(label)
    affine = np.asarray(affine, dtype=float)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInput(f"affine must be an invertible 4x4 voxel->world matrix, got shape {affine.shape}")
    return label.astype(np.uint8, copy=False), affine


def _overlap_fraction(a: Tuple[float, float], b: Tuple[float, float]) -> float:
    """Length of the overlap of intervals a and b, as a fraction of a's length."""
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0])) / max(a[1] - a[0], 1e-6)


def _components(value: int, label: np.ndarray, box, affine: np.ndarray):
    """26-connected components of one label value inside its bounding box.

    Returns (component map of the box, number of components, voxel indices in the box
    (tuple of 3 arrays), component id per voxel, world coordinates per voxel (3, N) in mm).
    """
    components, n = ndi.label(label[box] == value, structure=CONNECTIVITY_26)
    coords = np.nonzero(components)
    ids = components[coords]
    offset = np.array([s.start for s in box], dtype=float)
    world = affine[:3, :3] @ (np.stack(coords).astype(float) + offset[:, None]) + affine[:3, 3:4]
    return components, n, coords, ids, world


@dataclass
class _DiscPlane:
    """Mid-plane and footprint of one disc instance (world mm), to split a vertebra
    component that reaches across the disc (two touching vertebrae with one label)."""

    centroid: np.ndarray
    normal: np.ndarray  # unit, pointing superior
    axes: np.ndarray  # (2, 3) in-plane unit vectors
    footprint: np.ndarray  # 2D bool grid of cells of FOOTPRINT_CELL_MM, over the disc
    origin: np.ndarray  # cell index of footprint[0, 0]

    @classmethod
    def fit(cls, world: np.ndarray) -> "_DiscPlane":
        centroid = world.mean(axis=1)
        centred = world - centroid[:, None]
        _, vectors = np.linalg.eigh(centred @ centred.T)  # ascending variance
        # the disc normal is its thinnest direction; in a thin sagittal slab the slab
        # width can be thinner than the disc, so only near-cranio-caudal axes qualify
        steep = [i for i in range(3) if abs(vectors[2, i]) >= 0.5]
        normal = vectors[:, steep[0]] if steep else np.array([0.0, 0.0, 1.0])
        normal = normal * np.sign(normal[2])
        # in-plane axes: the disc's longest direction made orthogonal to the normal, and a third
        longest = vectors[:, 2] if not steep or steep[0] != 2 else vectors[:, 1]
        first = longest - (longest @ normal) * normal
        first /= np.linalg.norm(first)
        axes = np.stack([first, np.cross(normal, first)])
        cells = np.floor((axes @ centred) / FOOTPRINT_CELL_MM).astype(int)
        origin = cells.min(axis=1) - 1
        grid = np.zeros(tuple(cells.max(axis=1) - origin + 2), dtype=bool)
        grid[tuple(cells - origin[:, None])] = True
        grid = ndi.binary_dilation(grid, structure=np.ones((3, 3), bool))  # close the cell sampling gaps
        return cls(centroid, normal, axes, grid, origin)

    def project(self, world: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Signed distance (mm, + superior) to the mid-plane, and whether each point lies over the disc."""
        centred = world - self.centroid[:, None]
        height = self.normal @ centred
        cells = np.floor((self.axes @ centred) / FOOTPRINT_CELL_MM).astype(int) - self.origin[:, None]
        shape = np.array(self.footprint.shape)[:, None]
        inside = np.all((cells >= 0) & (cells < shape), axis=0)
        over = np.zeros(world.shape[1], dtype=bool)
        over[inside] = self.footprint[tuple(cells[:, inside])]
        return height, over


def _levels_across_discs(components: np.ndarray, n: int, coords, ids: np.ndarray, world: np.ndarray,
                         discs: Sequence[_DiscPlane], min_voxels: float) -> Tuple[int, np.ndarray]:
    """Separate the levels of one vertebra label that lies on both sides of a disc.

    Bone of the label over a disc's footprint within SPLIT_BAND_MM above *and* below
    it means the label covers two vertebrae (T12 and L1 both called "L1"), whether
    they touch (osteophytes, facets, segmentation bridges) or not. Bone near such a
    disc seeds one level per side (level = how many of these discs lie above it); the
    rest of each seeded component (posterior elements) is flooded geodesically from
    the seeds. ``components`` and ``ids`` are relabelled in place so that every
    component holds one level only.

    Returns (new number of components, level per component id: -1 = no seed).
    """
    no_levels = np.full(n + 1, -1)
    if not discs or n == 0:
        return n, no_levels
    level = np.zeros(ids.size, dtype=np.int32)
    seed = np.zeros(ids.size, dtype=bool)
    for disc in discs:
        if not (world[2].min() < disc.centroid[2] < world[2].max()):
            continue
        height, over = disc.project(world)
        above = over & (height > 0) & (height < SPLIT_BAND_MM)
        below = over & (height < 0) & (height > -SPLIT_BAND_MM)
        if above.sum() >= min_voxels and below.sum() >= min_voxels:
            level += height < 0
            seed |= above | below
    if not seed.any():
        return n, no_levels
    from skimage.segmentation import watershed  # only needed here; its import is slow

    seeded = np.zeros(n + 1, dtype=bool)
    seeded[ids[seed]] = True
    markers = np.zeros(components.shape, dtype=np.int32)
    markers[tuple(co[seed] for co in coords)] = level[seed] + 1
    # flat image: each voxel goes to the seed it is nearest to inside its component
    flooded = watershed(np.zeros(components.shape, dtype=np.uint8), markers,
                        mask=seeded[components], connectivity=3)[coords]
    # one new component per (old component, level); unseeded components keep level -1
    keys = ids.astype(np.int64) * (int(level.max()) + 2) + flooded
    unique, new_ids = np.unique(keys, return_inverse=True)
    ids[:] = new_ids.reshape(ids.shape) + 1
    components[coords] = ids
    levels = np.concatenate([[-1], unique % (int(level.max()) + 2) - 1])
    return unique.size, levels


def _group_instances(value: int, n: int, ids: np.ndarray, world: np.ndarray, affine: np.ndarray,
                     voxel_ml: float, min_instance_ml: float,
                     levels: Optional[np.ndarray] = None) -> Tuple[List[_Instance], int]:
    """Group the components of one label into instances (levels).

    Components with a known level (``levels[id] >= 0``, from :func:`_levels_across_discs`)
    form one instance per level. The others are taken largest first: a piece seeds a
    new instance when it is at another height than every seed of the label, else it
    follows the nearest instance. Returns (instances, voxels of orphan pieces).
    """
    counts = np.bincount(ids, minlength=n + 1)
    sums = np.stack([np.bincount(ids, weights=w, minlength=n + 1) for w in world])  # (3, n+1)
    index = np.arange(1, n + 1)
    # a voxel spans +-half its z-extent around its centre: keeps one-slice pieces non-degenerate
    half_voxel_z = 0.5 * float(np.abs(affine[2, :3]).sum())
    zmin = np.asarray(ndi.minimum(world[2], ids, index)) - half_voxel_z
    zmax = np.asarray(ndi.maximum(world[2], ids, index)) + half_voxel_z
    if levels is None:
        levels = np.full(n + 1, -1)

    instances: List[_Instance] = []
    by_level: Dict[int, _Instance] = {}
    orphan_voxels = 0
    largest = int(counts[1:].max()) if n else 0
    for c in index[np.argsort(-counts[1:], kind="stable")]:  # largest first: bodies seed instances
        if counts[c] == 0:
            continue
        centroid = sums[:, c] / counts[c]
        zrange = (float(zmin[c - 1]), float(zmax[c - 1]))
        if levels[c] >= 0:
            target = by_level.get(int(levels[c]))
            if target is None:
                target = by_level[int(levels[c])] = _Instance(value, 0.0, centroid, zrange, centroid)
                instances.append(target)
            target.components.append(int(c))
            continue
        overlaps = [_overlap_fraction(zrange, inst.seed_zrange) for inst in instances]
        big = counts[c] * voxel_ml >= min_instance_ml
        if big and (not instances or max(overlaps) < NEW_LEVEL_MAX_OVERLAP
                    or (counts[c] >= SECOND_BODY_MIN_RATIO * largest and max(overlaps) < SECOND_BODY_MAX_OVERLAP)):
            instances.append(_Instance(value, 0.0, centroid, zrange, centroid))
            target = instances[-1]
        elif instances:
            # follower (posterior elements, fragment): nearest instance of its label among
            # those at the same height, else among all
            candidates = [i for i, o in zip(instances, overlaps) if o > 0] or instances
            target = min(candidates, key=lambda inst: float(np.linalg.norm(inst.seed_centroid - centroid)))
        else:
            orphan_voxels += int(counts[c])
            continue
        target.components.append(int(c))
    for inst in instances:
        members = np.array(inst.components)
        inst.voxels = int(counts[members].sum())
        inst.volume_ml = inst.voxels * voxel_ml
        inst.centroid = sums[:, members].sum(axis=1) / inst.voxels
    return instances, orphan_voxels


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _order_dp(instances: Sequence[_Instance]) -> Dict[int, int]:
    """Order-preserving matching of instances (sorted top -> bottom) to SLOTS.

    Returns {instance index: slot index}. Scores are integer tuples compared
    lexicographically: (placed, -left out in the middle, agreeing labels,
    sum of placed instance indices, sum of slot indices) -- the last two prefer the
    lowest instances and slots on ties (L5-S1 is the anchor).
    """
    n, n_slots = len(instances), len(SLOTS)
    best: List[List[Optional[tuple]]] = [[None] * n_slots for _ in range(n)]
    parent: List[List[Optional[Tuple[int, int]]]] = [[None] * n_slots for _ in range(n)]
    # run[s]: best (score adjusted by +(k'+1) in the "middle" term, k', s') over earlier
    # instances k' placed in a slot s' < s; the adjustment turns the middle penalty
    # -(k - k' - 1) into a constant -k added when instance k is placed
    run: List[Optional[tuple]] = [None] * n_slots
    for k, inst in enumerate(instances):
        for s, slot_value in enumerate(SLOTS):
            if _KIND[slot_value] != inst.kind:
                continue
            agree = int(inst.source == slot_value)
            score, par = (1, 0, agree, k, s), None  # first placed: everything above is "top extra"
            if run[s] is not None:
                chained = _add(run[s][0], (1, -k, agree, k, s))
                if chained > score:
                    score, par = chained, (run[s][1], run[s][2])
            best[k][s], parent[k][s] = score, par
        prefix = None  # best over slots s' < s of instance k, adjusted
        for s in range(n_slots):
            if prefix is not None and (run[s] is None or prefix[0] > run[s][0]):
                run[s] = prefix
            if best[k][s] is not None:
                adjusted = _add(best[k][s], (0, k + 1, 0, 0, 0))
                if prefix is None or adjusted > prefix[0]:
                    prefix = (adjusted, k, s)
    end, end_score = None, None
    for k in range(n):
        for s in range(n_slots):
            if best[k][s] is not None and (end_score is None or best[k][s] > end_score):
                end, end_score = (k, s), best[k][s]
    placed: Dict[int, int] = {}
    while end is not None:
        placed[end[0]] = end[1]
        end = parent[end[0]][end[1]]
    return placed


def _position(k: int, instances: Sequence[_Instance]) -> str:
    """Where instance k lies relative to the placed instances, e.g. 'between L2 and L2-L3'."""
    above = [i for i in instances[:k] if i.slot is not None]
    below = [i for i in instances[k + 1:] if i.slot is not None]
    up = NAMES[SLOTS[above[-1].slot]] if above else None
    down = NAMES[SLOTS[below[0].slot]] if below else None
    if up and down:
        return f"between {up} and {down}"
    if down:
        return f"above {down}"
    if up:
        return f"below {up}"
    return "alone"


def _discs_not_between(by_slot: Dict[int, _Instance]) -> List[str]:
    """Discs whose centroid z is not strictly between the nearest present vertebrae above and below."""
    bad = []
    for s, disc in sorted(by_slot.items()):
        if disc.kind != "disc":
            continue
        above = [by_slot[t] for t in range(s - 1, -1, -1) if t in by_slot and by_slot[t].kind == "vertebra"]
        below = [by_slot[t] for t in range(s + 1, len(SLOTS)) if t in by_slot and by_slot[t].kind == "vertebra"]
        if (above and not disc.z < above[0].z) or (below and not disc.z > below[0].z):
            bad.append(NAMES[SLOTS[s]])
    return bad


def _extras_sentence(kind: str, entries: List[dict], top: bool) -> str:
    """'extra vertebra above L1 removed (possibly T12)' / '2 extra discs below L5-S1 removed (...)'."""
    if kind == "vertebra":
        guess = "possibly T12" if top else "possibly a transitional L6, or the sacrum"
    else:
        guess = "possibly T12-L1" if top else "possibly L6-S1 or S1-S2"
    plural = "vertebrae" if kind == "vertebra" else "discs"
    what = f"extra {kind}" if len(entries) == 1 else f"{len(entries)} extra {plural}"
    if len(entries) > 1:
        guess += " and beyond"
    position = entries[0]["position"] if top else entries[-1]["position"]
    return f"{what} {position} removed ({guess})"


def assign_levels(label: np.ndarray, affine: np.ndarray, min_instance_ml: float = 0.5) -> Tuple[np.ndarray, dict]:
    """Renumber vertebrae and discs by cranio-caudal order (see the module docstring).

    Args:
        label: 3D integer label map ``(X, Y, Z)``, values of :mod:`lib.pipeline.labels`, any voxel order.
        affine: 4x4 voxel->world matrix, RAS world coordinates in mm (nibabel convention).
        min_instance_ml: components smaller than this (mL) never count as a level of
            their own; they follow the instance of their label.

    Returns:
        ``(relabelled, report)``: a new ``uint8`` array of the same shape, and a
        JSON-serialisable dict with keys ``consistent``, ``present``, ``missing``,
        ``extra`` (list of ``{kind, label, position, volume_ml}``),
        ``outside_field_of_view`` (missing end levels beyond a found level that reaches the
        scan's edge), ``disc_not_between_vertebrae``, ``out_of_order`` (levels that kept the network's
        label although they do not fit the order), ``relabelled`` (network name -> new
        name, for the largest instance of each renamed label), ``vertebrae_found``,
        ``discs_found`` (instances, extras included), ``removed_fragments_ml`` (label
        name -> mL of pieces smaller than ``min_instance_ml`` with no main part) and
        ``messages`` (sentences for the radiologist).
    """
    label, affine = _check_inputs(label, affine)
    if not np.isfinite(min_instance_ml) or min_instance_ml < 0:
        raise InvalidInput(f"min_instance_ml must be >= 0, got {min_instance_ml}")
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    out = label.copy()
    boxes = ndi.find_objects(label)  # one pass: bounding box of every value

    # 1) instances of every disc label, then of every vertebra label (discs first: a
    #    vertebra component reaching across a disc is split at it)
    per_label = {}  # value -> (box, component map, its instances)
    instances: List[_Instance] = []
    orphan_ml: Dict[str, float] = {}
    disc_planes: List[_DiscPlane] = []
    for value in tuple(DISCS) + tuple(VERTEBRAE):
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        components, n, coords, ids, world = _components(value, label, box, affine)
        levels = None
        if value in VERTEBRAE:
            n, levels = _levels_across_discs(components, n, coords, ids, world, disc_planes,
                                             max(min_instance_ml, SPLIT_MIN_ML) / voxel_ml)
        insts, orphan_voxels = _group_instances(value, n, ids, world, affine, voxel_ml, min_instance_ml, levels)
        if value in DISCS:
            for inst in insts:  # the seed (largest) piece only: fragments would blur the plane
                disc_planes.append(_DiscPlane.fit(world[:, ids == inst.components[0]]))
        per_label[value] = (box, components, insts)
        instances.extend(insts)
        if orphan_voxels:
            orphan_ml[NAMES[value]] = orphan_voxels * voxel_ml

    # 2) order: top -> bottom (ties: label, then size, for determinism)
    instances.sort(key=lambda i: (-i.z, i.source, -i.voxels))
    placed = _order_dp(instances)
    for k, s in placed.items():
        instances[k].slot, instances[k].status = s, "placed"

    # 3) leftovers: top/bottom = extra anatomy; middle = keep own label if that level is free
    first, last = (min(placed), max(placed)) if placed else (len(instances), -1)
    used = {inst.slot for inst in instances if inst.slot is not None}
    extras, middle_removed = [], []
    for k in sorted((k for k in range(len(instances)) if k not in placed), key=lambda k: -instances[k].voxels):
        inst = instances[k]
        own_slot = SLOTS.index(inst.source)
        if first < k < last and own_slot not in used:
            inst.slot, inst.status = own_slot, "kept out of order"
            used.add(own_slot)
        else:
            inst.status = "extra" if (k < first or k > last) else "removed"
    for k, inst in enumerate(instances):
        if inst.status in ("extra", "removed"):
            entry = {"kind": inst.kind, "label": NAMES[inst.source], "position": _position(k, instances),
                     "volume_ml": round(inst.volume_ml, 3), "top": k < first}
            (extras if inst.status == "extra" else middle_removed).append(entry)

    # 4) write the new labels: one lookup table per label value, indexed by component id
    for value, (box, components, insts) in per_label.items():
        lut = np.zeros(int(components.max()) + 1, dtype=np.uint8)  # orphans and removed -> 0
        for inst in insts:
            if inst.slot is not None:
                lut[inst.components] = SLOTS[inst.slot]
        sub = out[box]  # view into ``out``
        inside = components > 0
        sub[inside] = lut[components[inside]]

    return out, _report(instances, extras, middle_removed, orphan_ml, _scan_zrange(label.shape, affine))


def _scan_zrange(shape: Tuple[int, ...], affine: np.ndarray) -> Tuple[float, float]:
    """World z (mm) of the scan's lowest and highest voxel centres."""
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    z = (affine @ corners.T)[2]
    return float(z.min()), float(z.max())


def _outside_fov(by_slot: Dict[int, "_Instance"], zrange: Tuple[float, float]) -> Dict[str, dict]:
    """Missing levels beyond the highest / lowest found level, when that level reaches within
    :data:`FOV_EDGE_MM` of the scan's upper / lower edge: the scan ends there, so they are
    outside the field of view rather than missed. Name -> ``{side, edge_mm, nearest}``."""
    if not by_slot:
        return {}
    out: Dict[str, dict] = {}
    top, bottom = min(by_slot), max(by_slot)
    gap_top = zrange[1] - by_slot[top].seed_zrange[1]
    gap_bottom = by_slot[bottom].seed_zrange[0] - zrange[0]
    if gap_top <= FOV_EDGE_MM:
        for s in range(0, top):
            out[NAMES[SLOTS[s]]] = {"side": "above", "edge_mm": round(gap_top, 1), "nearest": NAMES[SLOTS[top]]}
    if gap_bottom <= FOV_EDGE_MM:
        for s in range(bottom + 1, len(SLOTS)):
            out[NAMES[SLOTS[s]]] = {"side": "below", "edge_mm": round(gap_bottom, 1),
                                    "nearest": NAMES[SLOTS[bottom]]}
    return out


def _report(instances: List[_Instance], extras: List[dict], middle_removed: List[dict],
            orphan_ml: Dict[str, float], scan_zrange: Tuple[float, float]) -> dict:
    by_slot = {inst.slot: inst for inst in instances if inst.slot is not None}
    outside = _outside_fov(by_slot, scan_zrange)
    present = [NAMES[SLOTS[s]] for s in sorted(by_slot)]
    missing = [NAMES[v] for s, v in enumerate(SLOTS) if s not in by_slot]
    not_between = _discs_not_between(by_slot)
    out_of_order = [NAMES[SLOTS[s]] for s, inst in sorted(by_slot.items()) if inst.status == "kept out of order"]

    relabelled: Dict[str, str] = {}
    for inst in sorted(instances, key=lambda i: -i.voxels):  # the largest instance of a label speaks for it
        if inst.slot is not None and SLOTS[inst.slot] != inst.source:
            relabelled.setdefault(NAMES[inst.source], NAMES[SLOTS[inst.slot]])
    slot_of_name = {NAMES[v]: s for s, v in enumerate(SLOTS)}
    relabelled = dict(sorted(relabelled.items(), key=lambda item: slot_of_name[item[1]]))  # anatomical order

    n_vertebrae = sum(i.kind == "vertebra" for i in instances)
    n_discs = sum(i.kind == "disc" for i in instances)
    messages: List[str] = []
    for kind, n_found in (("vertebra", n_vertebrae), ("disc", n_discs)):
        parts = []
        for top in (True, False):
            mine = [e for e in extras if e["kind"] == kind and e["top"] == top]
            if mine:
                parts.append(_extras_sentence(kind, mine, top))
        if parts:
            plural = "vertebrae" if kind == "vertebra" else "discs"
            advice = "check for transitional anatomy" if kind == "vertebra" else "check the level count"
            messages.append(f"{n_found} {plural} found: " + "; ".join(parts) + f"; {advice}")
    for e in middle_removed:
        messages.append(f"a {e['kind']} region labelled {e['label']} ({e['volume_ml']:.1f} mL) {e['position']} "
                        "does not fit the cranio-caudal level order and was removed")
    if relabelled:
        pairs = ", ".join(f"{old} -> {new}" for old, new in relabelled.items())
        messages.append(f"levels renumbered by cranio-caudal order: {pairs}")
    for side in ("above", "below"):
        names = [n for n in missing if outside.get(n, {}).get("side") == side]
        if names:
            e = outside[names[0]]
            messages.append(f"{', '.join(names)} outside the field of view: the scan ends {e['edge_mm']:.0f} mm "
                            f"{side} {e['nearest']}")
    missed = [n for n in missing if n not in outside]
    if missed:
        messages.append(f"not found: {', '.join(missed)} (missed by the segmentation, or outside the field of "
                        "view: check the image)")
    for name in not_between:
        upper, lower = name.split("-")
        where = f"below the {upper} vertebra" if lower == "S1" else f"between the {upper} and {lower} vertebrae"
        messages.append(f"{name} disc is not {where}: check the labels at this level")
    for name in out_of_order:
        if name not in not_between:
            messages.append(f"{name} is out of cranio-caudal order; it keeps the network's label: check this level")
    for name, ml in orphan_ml.items():
        messages.append(f"removed {ml:.2f} mL of small {name} fragments with no main part")
    consistent = not missing and not extras and not middle_removed and not not_between and not out_of_order
    if consistent:
        messages.insert(0, "L1-L5 and the 5 lumbar discs found in cranio-caudal order")

    return {
        "consistent": bool(consistent),
        "present": present,
        "missing": missing,
        "outside_field_of_view": [n for n in missing if n in outside],
        "extra": [{k: v for k, v in e.items() if k != "top"} for e in extras + middle_removed],
        "disc_not_between_vertebrae": not_between,
        "out_of_order": out_of_order,
        "relabelled": relabelled,
        "vertebrae_found": int(n_vertebrae),
        "discs_found": int(n_discs),
        "removed_fragments_ml": {k: round(v, 3) for k, v in orphan_ml.items()},
        "messages": messages,
    }


def recover_missing_discs(levelled: np.ndarray, pieces: np.ndarray, affine: np.ndarray, report: dict,
                          min_instance_ml: float = 0.5) -> Tuple[np.ndarray, dict]:
    """Fill a disc level that :func:`assign_levels` left missing with a disc piece the
    clean-up set aside, where one lies between that disc's two vertebrae.

    The clean-up keeps the largest piece of each disc label: the network's level names
    are trusted first, which keeps extra discs (T12-L1, S1-S2) from shifting the levels.
    But a network that names a disc after its neighbour leaves that disc as the second
    piece of the neighbour's label, and it is gone before the levels are known. Here,
    for each missing L1-L2 ... L4-L5 whose vertebra above and below are present, the
    largest set-aside piece (26-connected, at least ``min_instance_ml``) whose centroid lies
    between the two vertebrae's centroids (world z) takes that level.

    ``levelled``: the output of :func:`assign_levels`; ``pieces``: the label map before the
    largest-piece rule (same grid, speckle removed); ``affine``: 4x4 voxel -> RAS mm;
    ``report``: the level report, updated (``present``, ``missing``, ``consistent``,
    ``messages``; ``recovered``: disc -> the network's name for the piece and its volume).
    """
    missing = [d for d in DISCS[:-1] if NAMES[d] in report["missing"]]
    spare = np.isin(pieces, DISCS) & (levelled == 0)
    if not missing or not spare.any():
        return levelled, report
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    components, n = ndi.label(spare, structure=CONNECTIVITY_26)
    index = np.arange(1, n + 1)
    sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
    centroids = np.array(ndi.center_of_mass(spare, components, index)).reshape(-1, 3)
    piece_z = (affine[:3, :3] @ centroids.T + affine[:3, 3:4])[2]

    def vertebra_z(value: int) -> Optional[float]:
        voxels = np.argwhere(levelled == value)
        return float((affine[:3, :3] @ voxels.mean(axis=0) + affine[:3, 3])[2]) if voxels.size else None

    out, recovered = levelled.copy(), {}
    used = np.zeros(n, dtype=bool)
    for disc in missing:
        above, below = vertebra_z(VERTEBRAE[DISCS.index(disc)]), vertebra_z(VERTEBRAE[DISCS.index(disc) + 1])
        if above is None or below is None:
            continue
        fits = (~used) & (sizes * voxel_ml >= min_instance_ml) & (piece_z < above) & (piece_z > below)
        if not fits.any():
            continue
        c = int(np.argmax(np.where(fits, sizes, 0)))
        used[c] = True
        mask = components == c + 1
        out[mask] = disc
        named = np.bincount(pieces[mask], minlength=256)
        recovered[NAMES[disc]] = {"network_label": NAMES[int(np.argmax(named))],
                                  "volume_ml": round(float(sizes[c] * voxel_ml), 3)}
    if not recovered:
        return levelled, report
    report = dict(report)
    report["recovered"] = recovered
    report["present"] = [NAMES[v] for v in SLOTS if NAMES[v] in report["present"] or NAMES[v] in recovered]
    report["missing"] = [name for name in report["missing"] if name not in recovered]
    messages = [m for m in report["messages"] if not m.startswith("not found: ")]
    for name, r in recovered.items():
        messages.append(f"{name} disc recovered: a {r['volume_ml']:.1f} mL piece the network labelled "
                        f"{r['network_label']} lies between the {name.replace('-', ' and ')} vertebrae")
    missed = [name for name in report["missing"] if name not in report["outside_field_of_view"]]
    if missed:
        messages.append(f"not found: {', '.join(missed)} (missed by the segmentation, or outside the field of "
                        "view: check the image)")
    report["consistent"] = bool(not report["missing"] and not report["extra"]
                                and not report["disc_not_between_vertebrae"] and not report["out_of_order"])
    if report["consistent"]:
        messages.insert(0, "L1-L5 and the 5 lumbar discs found in cranio-caudal order")
    report["messages"] = messages
    return out, report


def finish_label(label: np.ndarray, affine: np.ndarray, min_island_ml: float,
                 midline_prior: bool = True) -> Tuple[np.ndarray, dict]:
    """What the user gets from a label decision: :func:`lib.pipeline.postprocess.clean_label`
    (speckle under ``min_island_ml`` removed, the largest piece of each disc label and of the
    canal kept), :func:`assign_levels`, then :func:`recover_missing_discs` from the pieces the
    clean-up set aside, and last, with ``midline_prior``,
    :func:`lib.pipeline.postprocess.restrict_to_midline` (what lies too far left or right of the
    spine's midline removed). ``label`` (X, Y, Z) uint8 in the grid of ``affine`` (voxel ->
    RAS mm); returns the label and the level report, whose ``lateral_removed_ml`` says what the
    midline prior removed, per structure. One chain for the infer task, the validation
    measurement behind promotion and checkpoint choice, and the benchmark.

    The prior comes after the level assignment on purpose: it only takes away voxels, and
    the levels stay those that the whole prediction supports."""
    spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
    pieces = clean_label(label, spacing, min_island_ml, single_component=(CANAL,))
    levelled, report = assign_levels(clean_label(pieces, spacing, min_island_ml), affine)
    levelled, report = recover_missing_discs(levelled, pieces, affine, report)
    removed: Dict[str, float] = {}
    if midline_prior:
        levelled, removed = restrict_to_midline(levelled, affine)
        gone = [name for name in report["present"] if name in removed and not (levelled == LABELS[name]).any()]
        if gone:
            report["present"] = [name for name in report["present"] if name not in gone]
            report["missing"] = report["missing"] + gone
            report["consistent"] = False
            report["messages"] = [m for m in report["messages"] if not m.startswith("L1-L5 and the 5")] + [
                f"{', '.join(gone)} removed: found only further from the spine's midline than anatomy allows"]
    report["lateral_removed_ml"] = removed
    return levelled, report
