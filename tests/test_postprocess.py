"""Tests of lib.pipeline.postprocess on real reference masks (../shared/data) with known damage added."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]

from conftest import missing_dependency  # noqa: E402
from lib.pipeline.errors import InvalidInput  # noqa: E402
from lib.pipeline.labels import CANAL, DISCS, IGNORE_VALUE, NAMES, VERTEBRAE  # noqa: E402
from lib.pipeline.postprocess import clean_label, structure_volumes_ml  # noqa: E402

import nibabel as nib  # noqa: E402

DATA = REPO.parent / "shared" / "data"
FOREGROUND_NAMES = [NAMES[v] for v in range(1, 12)]


def _manifest() -> dict:
    path = DATA / "manifest.json"
    if not path.is_file():
        missing_dependency(f"real data not found at {DATA}")
    return {case["id"]: case for case in json.loads(path.read_text())["cases"]}


def load(case_id: str):
    """Reference mask as a prediction (255 -> 0, uint8) and its spacing in mm."""
    if case_id not in _manifest():
        missing_dependency(f"{case_id} not in the data manifest")
    image = nib.load(str(DATA / "labels" / f"{case_id}.nii.gz"))
    label = np.asarray(image.dataobj).astype(np.uint8)
    label[label == IGNORE_VALUE] = 0
    return label, tuple(float(z) for z in image.header.get_zooms()[:3])


def reliable_spider(n: int):
    """First n reliable SPIDER cases (at collection time: no skip here, load() skips)."""
    path = DATA / "manifest.json"
    if not path.is_file():
        return ["spider_7_t2_SPACE"]
    cases = json.loads(path.read_text())["cases"]
    return sorted(c["id"] for c in cases if c["id"].startswith("spider_") and c["reliable"])[:n]


def deepest_voxel(mask: np.ndarray, spacing) -> np.ndarray:
    """Index of the voxel of ``mask`` farthest (in mm) from its outside, the array border included."""
    depth = ndi.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return np.array(np.unravel_index(np.argmax(depth), mask.shape))


def free_spot(label: np.ndarray, size, near) -> tuple:
    """Slices of a box of odd ``size`` with a 1-voxel background margin, nearest to voxel ``near``."""
    busy = ndi.maximum_filter(label > 0, size=tuple(s + 2 for s in size), mode="constant", cval=1)
    centres = np.argwhere(~busy)
    assert centres.size, "no free room in this mask"
    centre = centres[np.argmin(np.abs(centres - np.asarray(near)).sum(axis=1))]
    return tuple(slice(c - s // 2, c + s // 2 + 1) for c, s in zip(centre, size))


def far_spot(label: np.ndarray, size) -> tuple:
    """A free box as far as possible from the labelled voxels."""
    busy = ndi.maximum_filter(label > 0, size=tuple(s + 2 for s in size), mode="constant", cval=1)
    distance = ndi.distance_transform_edt(~busy)
    centre = np.unravel_index(np.argmax(distance), label.shape)
    return tuple(slice(c - s // 2, c + s // 2 + 1) for c, s in zip(centre, size))


def box_ml(box: tuple, spacing) -> float:
    return float(np.prod([s.stop - s.start for s in box]) * np.prod(spacing) / 1000)


CASE = "spider_7_t2_SPACE"  # 0.47 x 0.47 x 1.0 mm: 1 mL = 4551 voxels


def test_output_is_a_new_uint8_array_of_the_same_shape():
    label, spacing = load(CASE)
    before = label.copy()
    out = clean_label(label.astype(np.int64), spacing)
    assert out.dtype == np.uint8 and out.shape == label.shape
    np.testing.assert_array_equal(label, before)  # input untouched
    assert not np.shares_memory(clean_label(label, spacing), label)


def test_small_vertebra_islands_removed_large_kept():
    label, spacing = load(CASE)
    centre = np.argwhere(label == 2).mean(axis=0)
    damaged = label.copy()
    small = free_spot(damaged, (1, 9, 9), near=centre)  # 81 voxels = 0.018 mL
    damaged[small] = 2
    large = free_spot(damaged, (5, 21, 21), near=centre)  # 2205 voxels = 0.48 mL
    damaged[large] = 2
    assert box_ml(small, spacing) < 0.1 < box_ml(large, spacing)
    out = clean_label(damaged, spacing, min_island_ml=0.1)
    assert (out[small] == 0).all()
    assert (out[large] == 2).all()
    # posterior elements, a separate piece of several mL in this slab, are kept as well
    assert ndi.label(label == 2, structure=np.ones((3, 3, 3)))[1] >= 2
    assert (out[label == 2] == 2).all()
    # the threshold is a volume, not a voxel count: with 2 mm voxels the small island is 0.65 mL
    kept = clean_label(damaged, (2.0, 2.0, 2.0), min_island_ml=0.1)
    assert (kept[small] == 2).all()


def test_disc_and_canal_keep_only_their_main_part():
    label, spacing = load(CASE)
    damaged = label.copy()
    far_disc = far_spot(damaged, (5, 25, 25))  # 0.69 mL: large, but not the disc
    damaged[far_disc] = 8
    far_canal = far_spot(damaged, (3, 11, 11))
    damaged[far_canal] = CANAL
    out = clean_label(damaged, spacing)
    assert (out[far_disc] == 0).all() and (out[far_canal] == 0).all()
    np.testing.assert_array_equal(out == 8, label == 8)
    np.testing.assert_array_equal(out == CANAL, label == CANAL)
    # with single_component the canal only: the far disc piece is kept, speckle of it is not
    speck = free_spot(damaged, (1, 3, 3), near=np.argwhere(label == 8).mean(axis=0))
    damaged[speck] = 8
    pieces = clean_label(damaged, spacing, single_component=(CANAL,))
    assert (pieces[far_disc] == 8).all() and (pieces[speck] == 0).all() and (pieces[far_canal] == 0).all()
    far = np.zeros(label.shape, dtype=bool)
    far[far_disc] = True
    np.testing.assert_array_equal(pieces == 8, (label == 8) | far)


def test_a_lone_vertebra_speck_is_removed_too():
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:4, 2:4, 2:4] = 5  # 8 mm^3: the only L5 piece, but speckle
    label[6:11, 6:11, 6:11] = 4  # 125 mm^3
    out = clean_label(label, (1.0, 1.0, 1.0), min_island_ml=0.1)
    assert not (out == 5).any() and (out == 4).sum() == 125


def test_26_connected_piece_is_kept():
    """A disc piece touching the main disc only by a corner is the same component."""
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:6, 2:6, 2:6] = 7
    label[6, 6, 6] = 7  # corner contact with (5, 5, 5)
    label[9:11, 9:11, 9:11] = 7  # really separate
    out = clean_label(label, (1.0, 1.0, 1.0))
    assert out[6, 6, 6] == 7 and not out[9:11, 9:11, 9:11].any()


def test_holes_are_filled_but_never_over_another_structure():
    label, spacing = load(CASE)
    damaged = label.copy()
    # a hole in the middle of the L3 body, with a piece of L4 inside it
    centre = deepest_voxel(label == 3, spacing)
    hole = tuple(slice(c - r, c + r + 1) for c, r in zip(centre, (1, 6, 6)))
    assert ndi.binary_erosion(label == 3, structure=np.ones((3, 3, 3)))[hole].all()  # enclosed in 3D
    core = tuple(slice(c - r, c + r + 1) for c, r in zip(centre, (0, 2, 2)))
    damaged[hole] = 0
    damaged[core] = 4
    # and a hole through a disc (inside its in-plane outline, closed above and below in 3D)
    disc_hole = tuple(slice(c, c + 1) for c in deepest_voxel(label == 9, spacing))
    assert ndi.binary_erosion(label == 9, structure=np.ones((3, 3, 3)))[disc_hole].all()
    damaged[disc_hole] = 0
    out = clean_label(damaged, spacing, min_island_ml=0.0)
    expected = label.copy()
    expected[core] = 4
    np.testing.assert_array_equal(out, expected)


def test_holes_at_a_boundary_between_structures_are_not_filled_by_the_wrong_one():
    """Background enclosed by two structures together is no hole of either."""
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:8, 2:8, 2:5] = 1
    label[2:8, 2:8, 5:8] = 6
    label[4:6, 4:6, 4:6] = 0  # cavity on the 1/6 boundary
    out = clean_label(label, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(out, label)


def test_volumes_match_voxel_counts():
    label, spacing = load(CASE)
    volumes = structure_volumes_ml(label, spacing)
    assert list(volumes) == FOREGROUND_NAMES
    voxel_ml = np.prod(spacing) / 1000
    for value in range(1, 12):
        assert volumes[NAMES[value]] == round(float((label == value).sum() * voxel_ml), 3)
    assert all(v > 0 for v in volumes.values())
    body_only, body_spacing = load("fcs_VB2_06")
    volumes = structure_volumes_ml(body_only, body_spacing)
    assert all(volumes[NAMES[d]] == 0.0 for d in DISCS) and volumes[NAMES[CANAL]] == 0.0
    assert all(volumes[NAMES[v]] > 10 for v in VERTEBRAE)  # 1 mm iso bodies: 30-40 mL
    json.dumps(volumes)


@pytest.mark.parametrize("case_id", reliable_spider(4) + ["fcs_VB2_06", "fcs_IVD_11"])
def test_reference_masks_pass_nearly_unchanged(case_id):
    label, spacing = load(case_id)
    out = clean_label(label, spacing)
    assert (out == label).mean() > 0.99
    foreground = (label > 0) | (out > 0)
    assert (out[foreground] == label[foreground]).mean() > 0.99


def test_invalid_input_is_rejected():
    with pytest.raises(InvalidInput):
        clean_label(np.zeros((4, 4), np.uint8), (1, 1))
    with pytest.raises(InvalidInput):
        clean_label(np.zeros((4, 4, 4), np.uint8), (1.0, 0.0, 1.0))
    with pytest.raises(InvalidInput):
        clean_label(np.full((4, 4, 4), 0.5), (1.0, 1.0, 1.0))
    with pytest.raises(InvalidInput):
        clean_label(np.zeros((4, 4, 4), np.uint8), (1.0, 1.0, 1.0), min_island_ml=-1)
    with pytest.raises(InvalidInput):
        structure_volumes_ml(np.zeros((4, 4, 4), np.uint8), 1.0)


def _widened(case_id: str, width_mm: int = 101):
    """A real reference (central sagittal slab) placed in the middle of a scan ``width_mm``
    wide, as a clinical sagittal series is: (label, affine, first slab slice)."""
    image = nib.load(str(DATA / "labels" / f"{case_id}.nii.gz"))
    if nib.aff2axcodes(image.affine)[0] not in "LR":
        pytest.fail(f"{case_id}: expected sagittal slices along axis 0")
    label, _ = load(case_id)
    width = int(round(width_mm / float(image.header.get_zooms()[0])))
    wide = np.zeros((width,) + label.shape[1:], np.uint8)
    first = (width - label.shape[0]) // 2
    wide[first:first + label.shape[0]] = label
    affine = image.affine.copy()
    affine[:3, 3] -= affine[:3, 0] * first
    return wide, affine, first


def _paste(label: np.ndarray, value: int, source_slice: int, target_slice: int, part: np.ndarray) -> None:
    """Copy the voxels of ``value`` within ``part`` of slice ``source_slice`` onto ``target_slice``."""
    mask = (label[source_slice] == value) & part
    assert mask.sum() > 50
    label[target_slice][mask] = value


def test_structures_far_from_the_midline_are_removed_and_the_spine_kept():
    from lib.pipeline.postprocess import LATERAL_LIMIT_MM, restrict_to_midline

    case_id = reliable_spider(1)[0]
    label, affine, first = _widened(case_id)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    original = label.copy()
    middle = first + (original[first:] > 0).any((1, 2)).nonzero()[0].mean().round().astype(int)
    # the canal's anterior-posterior centre on each axial row of the mid slice (it follows the lordosis)
    canal = original[middle] == CANAL
    ap = np.arange(label.shape[2])[None, :]
    with np.errstate(invalid="ignore"):
        canal_ap = ((canal * ap).sum(1) / canal.sum(1))[:, None]  # NaN on rows without canal
    # what the network paints on lateral slices: a disc and a vertebral body 45 mm left of the
    # slab's middle, a canal piece 30 mm right; and a posterior-element piece 40 mm right, which
    # is still anatomy (transverse processes). The margins allow for this canal's own drift:
    # it runs about 10 mm obliquely across the slab from top to bottom.
    left, right = middle - int(45 / spacing[0]), middle + int(30 / spacing[0])
    far_right = middle + int(40 / spacing[0])
    with np.errstate(invalid="ignore"):
        anterior = np.sign(affine[1, 2]) * (ap - canal_ap) > 10 / spacing[2]
        posterior = np.sign(affine[1, 2]) * (ap - canal_ap) < -5 / spacing[2]
    everywhere = np.ones(label.shape[1:], bool)
    _paste(label, DISCS[2], middle, left, everywhere)
    _paste(label, VERTEBRAE[2], middle, left, anterior)
    _paste(label, CANAL, middle, right, everywhere)
    _paste(label, VERTEBRAE[3], middle, far_right, posterior)
    painted = label != original

    out, removed = restrict_to_midline(label, affine)

    assert out.dtype == np.uint8 and out.shape == label.shape
    assert (out[original > 0] == original[original > 0]).all(), "the spine itself lost voxels"
    assert not out[left].any(), "the lateral disc and body survived"
    assert not (out[right] == CANAL).any(), "the lateral canal piece survived"
    assert (out[far_right] == label[far_right]).all(), "posterior elements 40 mm out are anatomy"
    assert set(removed) == {NAMES[DISCS[2]], NAMES[VERTEBRAE[2]], NAMES[CANAL]}
    voxel_ml = float(np.prod(spacing)) / 1000
    assert removed[NAMES[CANAL]] == round(float((painted & (label == CANAL)).sum()) * voxel_ml, 3)
    assert LATERAL_LIMIT_MM["canal"] < 20 < LATERAL_LIMIT_MM["disc"] < 40 < LATERAL_LIMIT_MM["posterior elements"]

    # the same scan stored with its axes in another order gives the same answer
    order = (2, 0, 1)
    permuted_affine = np.eye(4)
    permuted_affine[:3, :3] = affine[:3, :3][:, order]
    permuted_affine[:3, 3] = affine[:3, 3]
    permuted, _ = restrict_to_midline(np.transpose(label, order), permuted_affine)
    assert (permuted == np.transpose(out, order)).all()


def test_without_a_canal_nothing_is_removed():
    from lib.pipeline.postprocess import restrict_to_midline

    label, _ = load("fcs_VB2_06")  # 77 mm wide, bodies only: no canal drawn
    out, removed = restrict_to_midline(label, nib.load(str(DATA / "labels" / "fcs_VB2_06.nii.gz")).affine)
    assert removed == {} and (out == label).all() and out is not label
