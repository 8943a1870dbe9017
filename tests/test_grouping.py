"""Kind-first label decision and the kind-aware loss (lib/pipeline/grouping.py)."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss

from lib.pipeline.grouping import KindAwareLoss, StructureDecisiond, decide, kind_logits, kind_of_label, structure_argmax
from lib.pipeline.labels import CANAL, DISCS, KIND_INDEX, KINDS, NUM_CLASSES, VERTEBRAE
from lib.pipeline.plans import SpinePlan
from lib.pipeline.transforms import discrete_post_transforms


def _logits_from_probabilities(*voxels):
    """(12, N, 1, 1) logits whose softmax is each voxel's probability vector."""
    p = torch.tensor(voxels, dtype=torch.float64).T
    return p.clamp_min(1e-12).log()[:, :, None, None]


def _probabilities(**mass):
    p = np.zeros(NUM_CLASSES)
    for value, m in mass.items():
        p[int(value.strip("v"))] = m
    return list(p)


def test_kind_table_follows_the_label_table():
    assert KINDS[0] == "background" and KIND_INDEX[0] == 0
    assert {KINDS[KIND_INDEX[v]] for v in VERTEBRAE} == {"vertebra"}
    assert {KINDS[KIND_INDEX[v]] for v in DISCS} == {"disc"}
    assert KINDS[KIND_INDEX[CANAL]] == "canal"


def test_kind_softmax_is_the_summed_probability():
    logits = torch.randn(2, NUM_CLASSES, 3, 4, 5)
    p = logits.softmax(1)
    kinds = kind_logits(logits, dim=1).softmax(1)
    for k in range(len(KINDS)):
        members = [v for v in range(NUM_CLASSES) if KIND_INDEX[v] == k]
        assert torch.allclose(kinds[:, k], p[:, members].sum(1), atol=1e-6)
    label = torch.arange(NUM_CLASSES)
    assert kind_of_label(label).tolist() == list(KIND_INDEX)


def test_a_sure_vertebra_of_unsure_level_is_a_vertebra():
    # 0.7 vertebra spread over three levels (L3 most likely), 0.3 background
    unsure_level = _probabilities(v0=0.3, v2=0.2, v3=0.3, v4=0.2)
    logits = _logits_from_probabilities(unsure_level)
    assert int(logits.argmax(0).flatten()[0]) in (0, 3)  # plain argmax: a tie at best
    assert int(structure_argmax(logits).flatten()[0]) == 3
    # a disc voxel: kind disc wins over a strong single vertebra channel
    disc = _probabilities(v2=0.35, v7=0.3, v8=0.35)
    assert int(structure_argmax(_logits_from_probabilities(disc)).flatten()[0]) == 8
    assert int(_logits_from_probabilities(disc).argmax(0).flatten()[0]) in (2, 8)


def test_confident_logits_give_the_plain_argmax():
    torch.manual_seed(0)
    values = torch.randint(0, NUM_CLASSES, (6, 7, 8))
    logits = torch.nn.functional.one_hot(values, NUM_CLASSES).permute(3, 0, 1, 2).float() * 20 + torch.randn(
        NUM_CLASSES, 6, 7, 8)
    assert torch.equal(structure_argmax(logits), logits.argmax(0))
    assert torch.equal(decide(logits, "argmax"), logits.argmax(0))


def test_voxels_without_evidence_are_background():
    logits = torch.zeros(NUM_CLASSES, 2, 2, 2)  # what undoing a crop pads with
    logits[CANAL, 0, 0, 0] = 5.0
    label = structure_argmax(logits)
    assert int(label[0, 0, 0]) == CANAL
    assert int(label.sum()) == CANAL  # every other voxel is background


def test_decision_transform_keeps_the_affine_and_is_uint8():
    affine = torch.diag(torch.tensor([2.0, 1.5, 1.5, 1.0]))
    logits = MetaTensor(torch.randn(NUM_CLASSES, 4, 5, 6), affine=affine)
    out = StructureDecisiond("pred", "kind_first")({"pred": logits})["pred"]
    assert isinstance(out, MetaTensor) and out.shape == (4, 5, 6) and out.dtype == torch.uint8
    assert torch.equal(torch.as_tensor(out.affine, dtype=torch.float64), affine.double())
    chain = discrete_post_transforms(SpinePlan.from_conf({"label_decision": "argmax"}))
    plain = chain[0]({"pred": logits})["pred"]
    assert torch.equal(plain.as_tensor(), logits.as_tensor().argmax(0).to(torch.uint8))
    with pytest.raises(ValueError, match="label_decision"):
        SpinePlan.from_conf({"label_decision": "vote"})


def test_kind_aware_loss_is_the_sum_and_trains_the_kinds():
    torch.manual_seed(0)
    target = torch.randint(0, NUM_CLASSES, (1, 1, 8, 8, 8))
    logits = torch.randn(1, NUM_CLASSES, 8, 8, 8, requires_grad=True)
    levels, kinds = DiceCELoss(to_onehot_y=True, softmax=True), DiceCELoss(to_onehot_y=True, softmax=True)
    loss = KindAwareLoss(levels, kinds, weight=0.5)(logits, target)
    expected = levels(logits, target) + 0.5 * kinds(kind_logits(logits, 1), kind_of_label(target))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert torch.allclose(KindAwareLoss(levels, kinds, weight=0.0)(logits, target), levels(logits, target))
