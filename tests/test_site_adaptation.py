"""The simulated annotator of ``lib.simulate`` (``lib.site_adaptation`` uses it too): a
pre-segmentation with wrong levels and missed bone, corrected where a bodies-only reference
draws, on a phantom's anatomy."""

from __future__ import annotations

import numpy as np

from lib.phantom import make_phantom
from lib.pipeline.labels import CANAL, DISCS, IGNORE_VALUE, VERTEBRAE
from lib.simulate import simulated_correction


def _phantom():
    _, label, affine = make_phantom(3, shape=(16, 40, 72), spacing=(3.0, 3.0, 4.0), orientation="RAS")
    return label.astype(np.uint8), affine


def test_levels_renamed_missed_bone_added_and_the_rest_accepted():
    truth, affine = _phantom()
    assert all(np.any(truth == v) for v in VERTEBRAE + DISCS)
    # the reference draws vertebrae only, and marks a vertebra above L1 as 255 (as fcs_VB2 does T12)
    reference = np.where(np.isin(truth, VERTEBRAE), truth, 0).astype(np.uint8)
    # the model: every vertebra and disc one level too low (L1 called L2, ..., L4 and L5 both
    # L5), part of L3 missed, and a piece of "L4" where the reference marks T12 (255)
    prediction = truth.copy()
    for v in VERTEBRAE[:-1]:
        prediction[truth == v] = v + 1
    for d in DISCS[:-1]:
        prediction[truth == d] = d + 1
    l3 = np.argwhere(truth == 3)
    missed = tuple(l3[: len(l3) // 3].T)
    prediction[missed] = 0
    block = (slice(0, 3), slice(0, 3), slice(0, 3))
    assert not truth[block].any()
    reference_with_t12 = reference.copy()
    reference_with_t12[block] = IGNORE_VALUE
    prediction[block] = 4

    corrected = simulated_correction(prediction, reference_with_t12, affine, annotated=list(VERTEBRAE))

    for v in VERTEBRAE:  # every vertebra where the reference draws it, missed bone included
        assert np.all(corrected[reference == v] == v), v
    assert np.all(corrected[missed] == 3)
    assert not np.isin(corrected[block], VERTEBRAE).any()  # T12 is not a lumbar vertebra
    for d in DISCS:  # discs renamed from the corrected bodies above them
        assert np.mean(corrected[truth == d] == d) > 0.95, d
    assert np.array_equal(corrected == CANAL, prediction == CANAL)  # what the reference does not draw: accepted


def test_nothing_to_correct_leaves_the_prediction():
    truth, affine = _phantom()
    reference = np.where(np.isin(truth, VERTEBRAE), truth, 0).astype(np.uint8)
    corrected = simulated_correction(truth, reference, affine, annotated=list(VERTEBRAE))
    assert np.array_equal(corrected, truth)


def test_a_disc_painted_over_a_drawn_body_gives_way_to_the_body():
    """On unseen scans the starter paints discs into vertebral bodies (fcs_VB3: a third of the
    drawn body voxels): the annotator's drawn bone wins, the rest of the disc keeps its level."""
    truth, affine = _phantom()
    reference = np.where(np.isin(truth, VERTEBRAE), truth, 0).astype(np.uint8)
    disc = DISCS[2]  # L3-L4: grown into the lower half of L3 and the upper half of L4
    grown = np.isin(truth, (3, 4)) & (np.abs(np.argwhere(np.ones(truth.shape, bool))[:, 2].reshape(truth.shape)
                                              - np.argwhere(truth == disc)[:, 2].mean()) < 4)
    prediction = truth.copy()
    prediction[grown] = disc
    assert np.count_nonzero(grown) > 0

    corrected = simulated_correction(prediction, reference, affine, annotated=list(VERTEBRAE))

    for v in VERTEBRAE:
        assert np.all(corrected[reference == v] == v), v
    assert np.all(corrected[truth == disc] == disc)
