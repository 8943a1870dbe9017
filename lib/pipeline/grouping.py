"""Structure kinds before levels: kind logits, the label decision and the kind-aware loss.

The network has one output channel per label value (background, L1..L5, five discs,
canal). The five vertebrae look alike, and so do the five discs: what tells L2 from L3
is where it lies, which a 96-voxel window often does not show. A network that is sure a
voxel is vertebra but unsure of the level spreads the vertebra probability over five
channels, and a plain argmax then picks background (0.3 beats 0.7 / 5). So:

* :func:`kind_logits` folds the 12 channels into the 4 kinds of :data:`lib.pipeline.labels.KINDS`
  by ``logsumexp`` over each kind's channels: ``softmax(kind_logits) = `` the summed
  probabilities of each kind;
* :func:`structure_argmax` decides the kind first (argmax of the kind logits), then the
  level inside that kind (argmax over the kind's channels); :mod:`lib.pipeline.levels` then puts
  the levels in anatomical order. For a confident network it equals the plain argmax.
  It is an option (``--conf label_decision kind_first``), not the default: on the weakly
  trained starter weights it grew the vertebra kind over the undetected discs, so the
  vertebrae merged into one column that level assignment cannot split (model/README.md);
* :class:`KindAwareLoss` adds the base loss on the kind logits to the base loss on the
  12 channels, so training learns "vertebra / disc / canal" directly, not only through
  the levels (faster on few labels and few steps).

Shapes: logits ``(C, X, Y, Z)`` for one scan or ``(B, C, X, Y, Z)`` for a batch (the
channel axis is given), ``C = NUM_CLASSES``; label maps hold values 0..11.
"""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from lib.pipeline.labels import KIND_INDEX, KINDS, NUM_CLASSES
from lib.pipeline.plans import LABEL_DECISIONS

#: for each kind, the label values of its channels (background: (0,), vertebra: (1..5) ...)
_KIND_MEMBERS = tuple(tuple(v for v, k in enumerate(KIND_INDEX) if k == kind) for kind in range(len(KINDS)))


def kind_logits(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """12 label logits -> 4 kind logits (``logsumexp`` over each kind's channels) along ``dim``."""
    if logits.shape[dim] != NUM_CLASSES:
        raise ValueError(f"expected {NUM_CLASSES} channels on axis {dim}, got shape {tuple(logits.shape)}")
    return torch.stack(
        [torch.logsumexp(logits.index_select(dim, torch.tensor(m, device=logits.device)), dim=dim)
         for m in _KIND_MEMBERS],
        dim=dim,
    )


def kind_of_label(label: torch.Tensor) -> torch.Tensor:
    """Label map with values 0..11 -> map of kind indices 0..3 (same shape and dtype)."""
    table = torch.tensor(KIND_INDEX, dtype=torch.long, device=label.device)
    return table[label.long()].to(label.dtype)


def structure_argmax(logits: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Kind first, then level: ``(..., C, ...)`` logits -> label values (channel axis removed).

    Voxels whose logits are all equal carry no evidence (the zero padding that undoes a
    crop) and are background, as a plain argmax would make them.
    """
    kinds = kind_logits(logits, dim).argmax(dim)
    label = torch.zeros_like(kinds)
    for kind, members in enumerate(_KIND_MEMBERS):
        inside = kinds == kind
        if len(members) == 1:
            label[inside] = members[0]
            continue
        best = logits.index_select(dim, torch.tensor(members, device=logits.device)).argmax(dim)
        label[inside] = members[0] + best[inside]
    label[logits.amax(dim) == logits.amin(dim)] = 0
    return label


def decide(logits: torch.Tensor, decision: str = "argmax", dim: int = 0) -> torch.Tensor:
    """Label values from logits by the plan's ``label_decision``."""
    if decision == "kind_first":
        return structure_argmax(logits, dim)
    if decision == "argmax":
        return logits.argmax(dim)
    raise ValueError(f"label_decision must be one of {LABEL_DECISIONS}, got {decision!r}")


class StructureDecisiond(MapTransform):
    """``pred`` logits ``(C, X, Y, Z)`` -> label map ``(X, Y, Z)`` uint8 by the given decision;
    a MetaTensor keeps its affine and metadata (the writer needs them)."""

    def __init__(self, keys="pred", decision: str = "argmax"):
        super().__init__(keys)
        if decision not in LABEL_DECISIONS:
            raise ValueError(f"label_decision must be one of {LABEL_DECISIONS}, got {decision!r}")
        self.decision = decision

    def __call__(self, data: Mapping[Hashable, object]):
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            logits = pred.as_tensor() if isinstance(pred, MetaTensor) else torch.as_tensor(pred)
            label = decide(logits, self.decision, dim=0).to(torch.uint8)
            d[key] = MetaTensor(label, affine=pred.affine, meta=pred.meta) if isinstance(pred, MetaTensor) else label
        return d


class KindAwareLoss(torch.nn.Module):
    """``level_loss(logits, y) + weight * kind_loss(kind_logits(logits), kind(y))``.

    ``logits`` ``(B, C, ...)``, targets ``(B, 1, ...)`` with values 0..11; both losses take
    logits and integer targets (e.g. MONAI ``DiceCELoss(to_onehot_y=True, softmax=True)``),
    ``kind_loss`` over the 4 kinds.
    """

    def __init__(self, level_loss: torch.nn.Module, kind_loss: torch.nn.Module, weight: float = 1.0):
        super().__init__()
        self.level_loss, self.kind_loss, self.weight = level_loss, kind_loss, float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.level_loss(logits, target)
        if self.weight:
            loss = loss + self.weight * self.kind_loss(kind_logits(logits, dim=1), kind_of_label(target))
        return loss
