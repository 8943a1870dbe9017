"""Losses for labels that annotate only some structures (partial labels).

Development sets such as the fastcleverseg ones annotate only vertebral bodies, or only
discs; the rest of the spine is 0 in their masks although it is in the image. A loss that
read 0 as background would teach the network to erase what nobody drew. Here a voxel only
says what its annotation knows (the marginal cross-entropy of Shi et al., MedIA 2021):

- a voxel labelled with an annotated class ``c``: ``-log p_c``;
- a voxel labelled 0 in a mask where 0 means "none of the annotated classes": ``-log`` of
  the summed probability of background and every class the mask does not annotate;
- a voxel labelled 0 where that is not known (bodies only: 0 may be a posterior element of
  an annotated vertebra): no loss;
- a voxel labelled ``c`` in a sample whose levels are not known (a training window that does
  not show the lumbar column's anchor, the L5-S1 disc on the sacrum): ``-log`` of the summed
  probability of ``c``'s kind (every vertebra, every disc), so that it teaches the
  structure but not its level.

A fully annotated mask gives the ordinary cross-entropy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from lib.pipeline.labels import KIND_INDEX, NUM_CLASSES


@dataclass(frozen=True)
class Annotation:
    """What a label mask annotates: ``classes`` (values 1..11 drawn wherever they are),
    whether its 0 means "none of them" (``zero_is_known``) and whether its values name the
    levels or, for this sample, only the kinds of structure (``levels_known``)."""

    classes: frozenset
    zero_is_known: bool = True
    levels_known: bool = True

    @property
    def complete(self) -> bool:
        return self.zero_is_known and self.levels_known and self.classes == COMPLETE.classes

    @classmethod
    def from_manifest(cls, case: dict) -> "Annotation":
        """From a ``../shared/data`` manifest entry (``annotated_labels``, ``vertebra_extent``)."""
        classes = frozenset(int(v) for v in case.get("annotated_labels") or range(1, NUM_CLASSES))
        return cls(classes, zero_is_known=case.get("vertebra_extent") != "body_only")

    def unannotated_mask(self) -> torch.Tensor:
        """(NUM_CLASSES,) bool: background and every class this mask does not annotate."""
        mask = torch.ones(NUM_CLASSES, dtype=torch.bool)
        mask[list(self.classes)] = False
        mask[0] = True
        return mask


#: a mask that draws every structure (SPIDER): the marginal loss is the plain cross-entropy
COMPLETE = Annotation(frozenset(range(1, NUM_CLASSES)))


def marginal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, annotations: Iterable[Annotation],
                           known: torch.Tensor | None = None) -> torch.Tensor:
    """Mean marginal cross-entropy over the voxels that carry information.

    ``logits`` (N, C, ...) and ``labels`` (N, 1, ...) int64 with values 0..C-1; one
    :class:`Annotation` per item of the batch; ``known`` (N, 1, ...) bool, optional: voxels
    outside it (the ignore label) count for nothing.
    """
    annotations = list(annotations)
    log_p = torch.log_softmax(logits, 1)
    target = labels[:, 0]
    drawn = target > 0
    ce_drawn = -log_p.gather(1, target[:, None])[:, 0]
    levels_known = torch.tensor([a.levels_known for a in annotations], device=logits.device)
    if not levels_known.all():  # those samples: -log p(the drawn structure's kind)
        kind_of_class = torch.tensor(KIND_INDEX, device=logits.device)
        same_kind = kind_of_class.view((1, -1) + (1,) * (target.ndim - 1)) == kind_of_class[target][:, None]
        ce_kind = -torch.logsumexp(log_p.masked_fill(~same_kind, float("-inf")), 1)
        levels_known = levels_known.view((-1,) + (1,) * (target.ndim - 1)).expand_as(target)
        ce_drawn = torch.where(levels_known, ce_drawn, ce_kind)
    unannotated = torch.stack([a.unannotated_mask() for a in annotations]).to(logits.device)  # (N, C)
    shape = (len(annotations), NUM_CLASSES) + (1,) * (logits.ndim - 2)
    ce_zero = -torch.logsumexp(log_p.masked_fill(~unannotated.view(shape), float("-inf")), 1)
    zero_known = torch.tensor([a.zero_is_known for a in annotations], device=logits.device)
    zero_known = zero_known.view((-1,) + (1,) * (target.ndim - 1)).expand_as(target)
    counted = drawn | zero_known
    if known is not None:
        counted = counted & known[:, 0]
    loss = torch.where(drawn, ce_drawn, ce_zero)[counted]
    return loss.mean() if loss.numel() else logits.sum() * 0.0
