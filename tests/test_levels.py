"""Tests of lib.pipeline.levels.assign_levels on real reference masks (../shared/data).

Every expected result follows from the input: a reference mask is damaged in a known
way (levels permuted, a level deleted, an extra vertebra added, a disc moved, the array
reoriented) and the output is compared with the undamaged reference.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]

from conftest import missing_dependency  # noqa: E402
from lib.pipeline.errors import InvalidInput  # noqa: E402
from lib.pipeline.labels import CANAL, DISCS, IGNORE_VALUE, LABELS, NAMES, VERTEBRAE  # noqa: E402
from lib.pipeline.levels import assign_levels, finish_label  # noqa: E402

import nibabel as nib  # noqa: E402

DATA = REPO.parent / "shared" / "data"
ALL_LEVELS = ["L1", "L1-L2", "L2", "L2-L3", "L3", "L3-L4", "L4", "L4-L5", "L5", "L5-S1"]
# reliable SPIDER cases with different difficulties: plain (7), thin slab of 13 slices (22),
# L1 and L2 touching (136), L4 and L5 touching (162), compressed L1 + export group B (241)
CASES = ["spider_7_t2_SPACE", "spider_22_t2_SPACE", "spider_136_t2_SPACE", "spider_162_t2_SPACE",
         "spider_241_t2_SPACE"]


def _manifest() -> dict:
    path = DATA / "manifest.json"
    if not path.is_file():
        missing_dependency(f"real data not found at {DATA}")
    return {case["id"]: case for case in json.loads(path.read_text())["cases"]}


def load(case_id: str, require_reliable_spider: bool = True):
    """Reference mask as a prediction (255 -> 0, uint8) and its affine."""
    manifest = _manifest()
    if case_id not in manifest:
        missing_dependency(f"{case_id} not in the data manifest")
    if require_reliable_spider and not manifest[case_id]["reliable"]:
        missing_dependency(f"{case_id} is not reliable")
    image = nib.load(str(DATA / "labels" / f"{case_id}.nii.gz"))
    label = np.asarray(image.dataobj).astype(np.uint8)
    label[label == IGNORE_VALUE] = 0
    return label, image.affine.copy()


def lateral_axis(affine: np.ndarray) -> int:
    """The array axis that runs left-right (world x) in ``affine``."""
    return int(np.argmax(np.abs(np.asarray(affine)[0, :3])))


def world_z(affine: np.ndarray, mask: np.ndarray) -> float:
    """World z (mm, + superior) of the centroid of a boolean mask."""
    ijk = np.argwhere(mask).mean(axis=0)
    return float((affine @ np.append(ijk, 1.0))[2])


def pad(label: np.ndarray, affine: np.ndarray, axis: int, before: int = 0, after: int = 0):
    """Pad with background, keeping world coordinates of existing voxels unchanged."""
    widths = [(0, 0)] * 3
    widths[axis] = (before, after)
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, axis] * before
    return np.pad(label, widths), shifted


def axis_towards(affine: np.ndarray, world_direction) -> tuple:
    """(axis, step) such that +step voxels along ``axis`` moves most along ``world_direction``."""
    projection = np.asarray(world_direction, float) @ affine[:3, :3]
    axis = int(np.argmax(np.abs(projection)))
    return axis, int(np.sign(projection[axis]))


def free_spot(label: np.ndarray, size, near) -> tuple:
    """Slices of a box of odd ``size`` with a 1-voxel background margin, nearest to voxel ``near``."""
    busy = ndi.maximum_filter(label > 0, size=tuple(s + 2 for s in size), mode="constant", cval=1)
    centres = np.argwhere(~busy)
    centre = centres[np.argmin(np.abs(centres - np.asarray(near)).sum(axis=1))]
    return tuple(slice(c - s // 2, c + s // 2 + 1) for c, s in zip(centre, size))


def check_unchanged_report(report: dict) -> None:
    assert report["consistent"] is True
    assert report["present"] == ALL_LEVELS
    assert report["missing"] == [] and report["extra"] == [] and report["disc_not_between_vertebrae"] == []
    assert report["out_of_order"] == []
    assert report["relabelled"] == {}
    json.dumps(report)  # JSON-serialisable


# (a) reference in = reference out -------------------------------------------------------
@pytest.mark.parametrize("case_id", CASES)
def test_reference_passes_unchanged(case_id):
    label, affine = load(case_id)
    out, report = assign_levels(label, affine)
    assert out.dtype == np.uint8 and out.shape == label.shape
    np.testing.assert_array_equal(out, label)
    check_unchanged_report(report)


# (b) permuted levels are put back ----------------------------------------------------------
@pytest.mark.parametrize("case_id", CASES[:3])
@pytest.mark.parametrize("which", ["vertebrae", "discs", "both"])
def test_permuted_levels_are_restored(case_id, which):
    label, affine = load(case_id)
    rng = np.random.default_rng(zlib.crc32(f"{case_id}/{which}".encode()))
    lut = np.arange(256, dtype=np.uint8)
    for group in ([VERTEBRAE] if which == "vertebrae" else [DISCS] if which == "discs" else [VERTEBRAE, DISCS]):
        values = np.array(group)
        permuted = values.copy()
        while np.array_equal(permuted, values):  # a real permutation, never the identity
            permuted = rng.permutation(values)
        lut[values] = permuted
    out, report = assign_levels(lut[label], affine)
    np.testing.assert_array_equal(out, label)
    assert report["consistent"] is True
    assert report["relabelled"], "the renumbering must be reported"
    for old, new in report["relabelled"].items():  # network name -> true name: the lut inverted
        assert lut[LABELS[new]] == LABELS[old]


# (c) a deleted level is reported missing ------------------------------------------------------
@pytest.mark.parametrize("case_id", CASES[:2])
def test_deleted_vertebra_is_reported_missing(case_id):
    label, affine = load(case_id)
    damaged = label.copy()
    damaged[damaged == 3] = 0
    out, report = assign_levels(damaged, affine)
    np.testing.assert_array_equal(out, damaged)  # nothing renumbered to fill the gap
    assert report["missing"] == ["L3"]
    assert report["consistent"] is False
    assert any("L3" in m for m in report["messages"])


def test_deleted_level_with_shifted_labels_below_is_renumbered():
    """L3 deleted and the network calls L4 'L3', L3-L4 'L2-L3' ...: the discs anchor the levels."""
    label, affine = load(CASES[0])
    damaged = label.copy()
    damaged[label == 3] = 0
    damaged[label == 4], damaged[label == 5] = 3, 4
    damaged[label == 8], damaged[label == 9], damaged[label == 10] = 7, 8, 9
    damaged[label == 7] = 6  # L2-L3 now shares 'L1-L2' with the real L1-L2
    out, report = assign_levels(damaged, affine)
    expected = label.copy()
    expected[label == 3] = 0
    np.testing.assert_array_equal(out, expected)
    assert report["missing"] == ["L3"]


def test_finish_label_keeps_a_disc_named_after_its_neighbour():
    """What the model did on spider_141: every level from L3 down named one too high, and the
    L2-L3 disc painted half 'L1-L2', half 'L2-L3'. The disc is then the second piece of two
    labels; the clean-up must not drop it as a fragment before the levels are assigned, and
    the two names of one disc make one level. Expected: the undamaged reference's output."""
    label, affine = load(CASES[0])
    damaged = label.copy()
    for value in (3, 4, 5, 8, 9, 10):  # L3..L5 and L3-L4..L5-S1 named after the level above
        damaged[label == value] = value - 1
    l2_l3 = np.argwhere(label == 7)
    axis = int(np.argmax(np.ptp(l2_l3, axis=0)))  # its longest axis: half each side
    half = l2_l3[l2_l3[:, axis] < np.median(l2_l3[:, axis])]
    damaged[label == 7] = 6
    damaged[tuple(half.T)] = 7
    expected, _ = finish_label(label, affine, 0.1)
    out, report = finish_label(damaged, affine, 0.1)
    np.testing.assert_array_equal(out, expected)
    assert report["missing"] == [] and report["consistent"] is True and "L2-L3" in report["present"]
    assert (out == 7).sum() == (label == 7).sum()  # the whole disc, under one name
    assert set(report["recovered"]) == {"L2-L3"} and any("L2-L3 disc recovered" in m for m in report["messages"])
    # nothing is invented: a disc that is not there stays missing, and a spare disc piece
    # that is not between that disc's vertebrae (here: below L5-S1) does not fill it
    gone = damaged.copy()
    gone[label == 7] = 0
    axis, up = axis_towards(affine, [0, 0, 1])
    l5_s1 = np.argwhere(label == 10)
    below = l5_s1 - up * (np.ptp(l5_s1[:, axis]) + 3) * np.eye(3, dtype=int)[axis]
    inside = np.all((below >= 0) & (below < np.array(label.shape)), axis=1)
    assert inside.sum() > 0.5 * len(l5_s1)
    gone[tuple(below[inside].T)] = 6  # an extra disc named L1-L2 under the sacrum's top
    out, report = finish_label(gone, affine, 0.1)
    assert "L2-L3" in report["missing"] and "recovered" not in report and not (out == 7).any()


def test_finish_label_reports_a_structure_found_only_far_from_the_midline():
    """The midline prior comes last and only takes away: on a reference placed in a scan
    141 mm wide it changes nothing, and a disc found only 45 mm to the side (where the network
    paints on lateral slices) is removed and reported missing, which the same chain without
    the prior does not do."""
    label, affine = load(CASES[0])
    axis = lateral_axis(affine)
    width = int(round(141 / np.linalg.norm(affine[:3, axis])))
    first = (width - label.shape[axis]) // 2
    wide = np.zeros(label.shape[:axis] + (width,) + label.shape[axis + 1:], np.uint8)
    np.moveaxis(wide, axis, 0)[first:first + label.shape[axis]] = np.moveaxis(label, axis, 0)
    affine = affine.copy()
    affine[:3, 3] -= affine[:3, axis] * first
    plain, plain_report = finish_label(wide, affine, 0.1, midline_prior=False)
    out, report = finish_label(wide, affine, 0.1)
    np.testing.assert_array_equal(out, plain)
    assert report["lateral_removed_ml"] == {} and report["consistent"] is True

    shift = int(round(45 / np.linalg.norm(affine[:3, axis])))
    moved = wide.copy()
    moved[wide == 8] = 0  # L3-L4 taken out of the spine, and put 45 mm to the side
    np.moveaxis(moved, axis, 0)[shift:][np.moveaxis(wide == 8, axis, 0)[:-shift]] = 8
    kept, kept_report = finish_label(moved, affine, 0.1, midline_prior=False)
    assert "L3-L4" in kept_report["present"] and (kept == 8).sum() == (wide == 8).sum()
    out, report = finish_label(moved, affine, 0.1)
    assert not (out == 8).any() and "L3-L4" in report["missing"] and report["consistent"] is False
    assert set(report["lateral_removed_ml"]) == {"L3-L4"}
    assert any("L3-L4 removed" in m for m in report["messages"])
    np.testing.assert_array_equal(out[moved != 8], kept[moved != 8])  # the rest as without the prior


# (d) an extra vertebra above L1 is removed -----------------------------------------------
@pytest.mark.parametrize("case_id", CASES[:3])
def test_extra_vertebra_above_l1_is_removed(case_id):
    label, affine = load(case_id)
    axis, up = axis_towards(affine, [0, 0, 1])
    l1 = label == 1
    extent = np.nonzero(np.any(l1, axis=tuple(a for a in range(3) if a != axis)))[0]
    height = int(extent[-1] - extent[0] + 1)
    # room above L1 for a copy of L1 one vertebra height higher
    if up < 0:
        label, affine = pad(label, affine, axis, before=height)
    else:
        label, affine = pad(label, affine, axis, after=height)
    l1 = label == 1
    copy = np.roll(l1, up * height, axis=axis)
    assert not (copy & l1).any()
    damaged = label.copy()
    damaged[copy & (label == 0)] = 1  # never overwrite the canal that goes on above L1

    out, report = assign_levels(damaged, affine)
    np.testing.assert_array_equal(out, label)
    assert report["consistent"] is False
    assert report["present"] == ALL_LEVELS
    assert len(report["extra"]) == 1
    extra = report["extra"][0]
    assert extra["kind"] == "vertebra" and extra["position"] == "above L1" and extra["label"] == "L1"
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert extra["volume_ml"] == pytest.approx((damaged == 1).sum() * voxel_ml - l1.sum() * voxel_ml, abs=1e-3)
    assert any("6 vertebrae" in m and "above L1" in m and "T12" in m for m in report["messages"])


def test_real_t12_called_l1_is_removed():
    """T12 and T12-L1 of the reference (ignore-labelled there) given the labels L1 and L1-L2."""
    case_id = "spider_136_t2_SPACE"  # T12 touches L1 here: the label must be split at the disc
    label, affine = load(case_id)
    raw = np.asarray(nib.load(str(DATA / "labels" / f"{case_id}.nii.gz")).dataobj)
    three_class = np.asarray(nib.load(str(DATA / "labels3" / f"{case_id}.nii.gz")).dataobj)
    z_l1 = world_z(affine, label == 1)
    ijk = np.indices(label.shape).reshape(3, -1)
    above_l1 = ((affine[2, :3] @ ijk + affine[2, 3]) > z_l1).reshape(label.shape)
    t12 = (raw == IGNORE_VALUE) & (three_class == 1) & above_l1
    t12_l1 = (raw == IGNORE_VALUE) & (three_class == 2) & above_l1
    damaged = label.copy()
    damaged[t12], damaged[t12_l1] = 1, 6
    out, report = assign_levels(damaged, affine)
    assert report["present"] == ALL_LEVELS
    assert (out[label > 0] == label[label > 0]).mean() > 0.999
    assert (out[t12 | t12_l1] == 0).mean() > 0.99
    assert any(e["kind"] == "vertebra" and e["position"] == "above L1" for e in report["extra"])


# (e) orientation does not matter -------------------------------------------------------------
@pytest.mark.parametrize("case_id", CASES[:2])
def test_reoriented_arrays_give_the_same_result(case_id):
    label, affine = load(case_id)
    lut = np.arange(256, dtype=np.uint8)
    lut[list(VERTEBRAE)] = [3, 1, 2, 5, 4]
    lut[list(DISCS)] = [7, 6, 10, 8, 9]
    damaged = lut[label]
    damaged[damaged == 2] = 0  # a missing level too, so that the report is not trivial
    reference_out, reference_report = assign_levels(damaged, affine)

    # nibabel's canonical RAS reorientation
    canonical = nib.as_closest_canonical(nib.Nifti1Image(damaged, affine))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S") != nib.aff2axcodes(affine)
    out, report = assign_levels(np.asarray(canonical.dataobj), canonical.affine)
    expected = np.asarray(nib.as_closest_canonical(nib.Nifti1Image(reference_out, affine)).dataobj)
    np.testing.assert_array_equal(out, expected)
    assert report == reference_report

    # a manual flip of axis 1 and a transposition, with the affine updated by hand
    n1 = damaged.shape[1]
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, n1 - 1
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # new (p, q, r) = old (k, i, j)
    moved_affine = affine @ flip @ perm
    moved = np.ascontiguousarray(damaged[:, ::-1, :].transpose(2, 0, 1))
    sample = np.array([3, 100, 50])  # the same voxel in both grids has the same world position
    np.testing.assert_allclose(moved_affine @ np.append(sample, 1),
                               affine @ np.array([sample[1], n1 - 1 - sample[2], sample[0], 1]))
    out, report = assign_levels(moved, moved_affine)
    np.testing.assert_array_equal(out, reference_out[:, ::-1, :].transpose(2, 0, 1))
    assert report == reference_report


# (f) a disc outside its vertebrae is reported ---------------------------------------------
def test_disc_moved_out_of_place_is_reported():
    label, affine = load(CASES[0])
    ap_axis, forward = axis_towards(affine, [0, 1, 0])  # anterior
    si_axis, up = axis_towards(affine, [0, 0, 1])
    assert ap_axis != si_axis
    disc = label == 8  # L3-L4
    ap_extent = np.ptp(np.nonzero(disc.any(axis=tuple(a for a in range(3) if a != ap_axis)))[0]) + 1
    shift_ap = int(ap_extent + 40)  # clear of the vertebral bodies, in front of the spine
    if forward < 0:
        label, affine = pad(label, affine, ap_axis, before=shift_ap)
    else:
        label, affine = pad(label, affine, ap_axis, after=shift_ap)
    disc = label == 8
    # up to a quarter of the way from the L3 centroid to the L2-L3 disc: above L3
    z_l3, z_l2l3, z_disc = (world_z(affine, label == v) for v in (3, 7, 8))
    mm_per_voxel = abs(affine[2, si_axis])
    shift_si = int(round((z_l3 + 0.25 * (z_l2l3 - z_l3) - z_disc) / mm_per_voxel))
    moved = np.roll(np.roll(disc, forward * shift_ap, axis=ap_axis), up * shift_si, axis=si_axis)
    damaged = label.copy()
    damaged[disc] = 0
    assert (damaged[moved] == 0).all()
    damaged[moved] = 8

    out, report = assign_levels(damaged, affine)
    assert report["consistent"] is False
    assert report["disc_not_between_vertebrae"] == ["L3-L4"]
    assert report["out_of_order"] == ["L3-L4"] and report["extra"] == []
    assert any("L3-L4" in m and "not between" in m for m in report["messages"])
    np.testing.assert_array_equal(out, damaged)  # no other level changes, the disc keeps its label


# (g) partial annotations: discs only, bodies only ----------------------------------------------
def _fcs_case(prefix: str) -> str:
    cases = sorted(c for c in _manifest() if c.startswith(prefix))
    if not cases:
        missing_dependency(f"no {prefix} case in the data")
    return cases[0]


def test_discs_only_keeps_discs_in_order():
    label, affine = load(_fcs_case("fcs_IVD_"), require_reliable_spider=False)
    assert not np.isin(label, VERTEBRAE).any()
    for damaged in (label, np.array([0, 1, 2, 3, 4, 5, 9, 6, 10, 8, 7, 11], np.uint8)[label]):
        out, report = assign_levels(damaged, affine)
        np.testing.assert_array_equal(out, label)
        assert report["present"] == [NAMES[d] for d in DISCS]
        assert report["missing"] == [NAMES[v] for v in VERTEBRAE]
        assert report["consistent"] is False and report["extra"] == []
        assert any("not found" in m and "L1" in m for m in report["messages"])


def test_bodies_only_keeps_bodies_in_order():
    label, affine = load(_fcs_case("fcs_VB2_"), require_reliable_spider=False)
    assert not np.isin(label, DISCS).any()
    damaged = np.array([0, 4, 5, 1, 3, 2] + list(range(6, 12)), np.uint8)[label]
    out, report = assign_levels(damaged, affine)
    np.testing.assert_array_equal(out, label)
    assert report["present"] == [NAMES[v] for v in VERTEBRAE]
    assert report["missing"] == [NAMES[d] for d in DISCS]


# other behaviour -----------------------------------------------------------------------------
def test_canal_and_other_values_are_untouched():
    label, affine = load(CASES[0])
    damaged = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11], np.uint8)[label]
    out, _ = assign_levels(damaged, affine)
    np.testing.assert_array_equal(out == CANAL, label == CANAL)
    empty, report = assign_levels(np.zeros((4, 5, 6), np.uint8), np.eye(4))
    assert not empty.any() and report["missing"] == ALL_LEVELS and report["consistent"] is False


def test_pieces_and_small_fragments_follow_their_label():
    """Posterior elements (separate components in these slabs) and a fragment smaller than
    min_instance_ml follow the renumbering of their label's main instance."""
    label, affine = load(CASES[0])
    assert ndi.label(label == 1, structure=np.ones((3, 3, 3)))[1] >= 2  # body + posterior elements
    damaged = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11], np.uint8)[label]  # L1 <-> L2 swapped
    spot = free_spot(label, (3, 5, 5), near=np.argwhere(label == 1).mean(axis=0))
    damaged[spot] = 2  # ~0.02 mL, called 'L2' like the true L1
    out, report = assign_levels(damaged, affine)
    expected = label.copy()
    expected[spot] = 1
    np.testing.assert_array_equal(out, expected)
    assert report["relabelled"] == {"L2": "L1", "L1": "L2"}
    assert report["consistent"] is True


def test_speckle_does_not_disturb_the_levels():
    """Hundreds of tiny blobs of random labels (no clean-up first): levels are still found,
    and the blobs only follow their label (clean_label is what removes them)."""
    label, affine = load(CASES[0])
    rng = np.random.default_rng(7)
    damaged = label.copy()
    for _ in range(300):
        centre, radius = [rng.integers(0, n) for n in label.shape], int(rng.integers(0, 3))
        damaged[tuple(slice(max(0, c - radius), c + radius + 1) for c in centre)] = rng.integers(1, 12)
    lut = np.array([0, 5, 4, 3, 2, 1, 10, 9, 8, 7, 6, 11], np.uint8)  # and every level reversed
    out, report = assign_levels(lut[damaged], affine)
    assert report["consistent"] is True and report["present"] == ALL_LEVELS
    foreground = label > 0
    assert (out[foreground] == damaged[foreground]).mean() > 0.99


def test_invalid_input_is_rejected():
    with pytest.raises(InvalidInput):
        assign_levels(np.zeros((4, 4), np.uint8), np.eye(4))
    with pytest.raises(InvalidInput):
        assign_levels(np.zeros((4, 4, 4), np.uint8), np.eye(3))
    with pytest.raises(InvalidInput):
        assign_levels(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4)))


def test_a_512x512x20_label_in_scanner_order():
    """A clinical-size grid in another voxel order gives the same consistent levels (its
    speed is measured by ``python -m lib.benchmark``, not asserted here)."""
    label, affine = load("spider_136_t2_SPACE")
    big = np.zeros((512, 512, 20), np.uint8)
    part = label[:20, :512, :512].transpose(1, 2, 0)  # RIP (S, AP are axes 1, 2) -> (I, P, R)
    big[: part.shape[0], : part.shape[1], : part.shape[2]] = part
    big_affine = affine[:, [1, 2, 0, 3]]
    out, report = assign_levels(big, big_affine)
    assert report["consistent"] is True
    assert np.array_equal(out[: part.shape[0], : part.shape[1], : part.shape[2]], part)


def test_end_levels_cut_by_the_field_of_view_are_reported_as_such():
    """A scan that ends inside L5 (or inside L1) misses L5-S1 (or L1) because of its field of
    view; a level deleted in the middle of the scan is reported as not found instead."""
    label, affine = load("spider_7_t2_SPACE")  # RIP: axis 1 runs superior -> inferior
    rows = np.nonzero((label == LABELS["L5-S1"]).any(axis=(0, 2)))[0]
    cut = label[:, : rows[0] - 3]  # ends 3 voxels above the L5-S1 disc
    _, report = assign_levels(cut, affine)
    assert report["missing"] == ["L5-S1"] and report["outside_field_of_view"] == ["L5-S1"]
    assert any("L5-S1 outside the field of view" in m and "below L5" in m for m in report["messages"])
    top = np.nonzero((label == LABELS["L1"]).any(axis=(0, 2)))[0]
    start = (top[0] + top[-1]) // 2  # starts in the middle of L1: L1 itself is still found
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([0, start, 0]) + affine[:3, 3]
    _, report = assign_levels(label[:, start:], shifted)
    assert report["outside_field_of_view"] == [] and "L1" in report["present"]
    l1_gone = label[:, top[-1] + 1:].copy()
    l1_gone[l1_gone == LABELS["L1"]] = 0
    shifted[:3, 3] = affine[:3, :3] @ np.array([0, top[-1] + 1, 0]) + affine[:3, 3]
    _, report = assign_levels(l1_gone, shifted)
    assert "L1" in report["outside_field_of_view"]
    deleted = label.copy()
    deleted[deleted == LABELS["L5-S1"]] = 0  # the scan goes on ~10 mm below: missed, not cut
    _, report = assign_levels(deleted, affine)
    assert report["missing"] == ["L5-S1"] and report["outside_field_of_view"] == []
    assert any(m.startswith("not found: L5-S1") for m in report["messages"])
