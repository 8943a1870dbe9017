"""The one Dice (lib.pipeline.metrics): its rules, and that every consumer uses it."""

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from lib.benchmark import agreement_report
from lib.pipeline.labels import CANAL, IGNORE_VALUE, NAMES
from lib.pipeline.metrics import StructureDiceMetric, binary_dice, mean_dice, structure_dice, summarise


def _maps():
    ref = np.zeros((6, 6, 6), np.uint8)
    ref[:3] = 1            # L1: 108 voxels
    ref[3:, :2] = 6        # L1-L2: 36 voxels, never predicted (missing)
    pred = ref.copy()
    pred[:3, :, :3] = 0    # half of L1 lost
    pred[3:, :2] = 0
    pred[5, 5, 5] = CANAL  # only predicted (false positive)
    return pred, ref


def test_rules_per_structure():
    pred, ref = _maps()
    scores = structure_dice(pred, ref)
    assert scores.shape == (11,)
    assert scores[0] == pytest.approx(2 * 54 / (54 + 108))           # L1: overlap
    assert scores[5] == 0.0                                           # L1-L2: missing
    assert scores[10] == 0.0                                          # canal: false positive
    assert all(math.isnan(float(scores[i])) for i in (1, 2, 3, 4, 6, 7, 8, 9))  # in neither: not scored
    # the overlap term is MONAI's own
    p = torch.as_tensor(pred == 1)[None, None].float()
    r = torch.as_tensor(ref == 1)[None, None].float()
    assert float(scores[0]) == pytest.approx(float(compute_dice(p, r)[0, 0]))
    assert mean_dice(pred, ref) == pytest.approx(float(scores[0]) / 3)


def test_ignore_voxels_count_for_neither_side():
    pred, ref = _maps()
    ref_ignoring = ref.copy()
    ref_ignoring[:3, :, :3] = IGNORE_VALUE  # exactly where the prediction lost L1
    assert float(structure_dice(pred, ref_ignoring)[0]) == 1.0
    pred_there = pred.copy()
    pred_there[:3, :, :3] = 2  # whatever is predicted under 255 is not judged
    assert math.isnan(float(structure_dice(pred_there, ref_ignoring)[1]))


def test_summary_over_images_and_the_train_metric_agree():
    pred, ref = _maps()
    empty = np.zeros_like(ref)
    per_image = torch.stack([structure_dice(pred, ref), structure_dice(ref, ref), structure_dice(empty, empty)])
    mean, per_structure = summarise(per_image)
    assert per_structure[NAMES[1]] == pytest.approx((2 * 54 / 162 + 1.0) / 2)
    assert per_structure[NAMES[6]] == pytest.approx(0.5) and per_structure[NAMES[2]] is None
    assert mean == pytest.approx(np.mean([per_structure[NAMES[v]] for v in (1, 6, 11)]))
    # the train task's key metric (MONAI cumulative metric, lists of channel-first items)
    metric = StructureDiceMetric()
    items = [(pred, ref), (ref, ref), (empty, empty)]
    metric([torch.as_tensor(p)[None] for p, _ in items], [torch.as_tensor(r)[None] for _, r in items])
    assert float(metric.aggregate()) == pytest.approx(mean)
    metric.reset()
    metric([torch.as_tensor(empty)[None]], [torch.as_tensor(empty)[None]])
    assert float(metric.aggregate()) == 0.0  # nothing scored


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ in shape"):
        structure_dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_agreement_and_evaluate_use_the_same_dice():
    pred, ref = _maps()
    report = agreement_report(pred, ref)
    assert report["mean"] == pytest.approx(mean_dice(pred, ref))
    assert report["canal"] == 0.0
    assert report["foreground"] == pytest.approx(binary_dice(pred > 0, ref > 0))
    empty = np.zeros_like(ref)
    assert agreement_report(empty, empty) == {"mean": 1.0, "canal": 1.0, "foreground": 1.0}
    assert math.isnan(binary_dice(empty, empty))
