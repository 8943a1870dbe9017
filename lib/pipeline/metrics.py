"""The one Dice of the project, built on MONAI's ``compute_dice``.

Every Dice the app reports comes from here: the train task's key metric (best checkpoint,
early stopping), the validation measurement behind the promotion gate
(:func:`lib.lifecycle.promotion.measure`), the benchmark's agreement between two pipelines, and
``python -m lib.evaluate``.

Rules, per structure (label values 1..11) of one image:

* in the reference and in the prediction: ``2|P∩R| / (|P|+|R|)``;
* in the reference, not predicted (*missing*): 0;
* predicted, not in the reference (*false positive*): 0;
* in neither: not scored (NaN), so it weighs nothing in any mean;
* reference voxels of 255 (ignore) count for neither side: the prediction there is dropped.

Across images a structure's Dice is the mean over the images where it is scored; the mean
Dice is the mean over the structures scored at least once. MONAI's own ``MeanDice`` differs
on two counts (``ignore_empty=True`` skips false positives; one-hot labels cannot carry 255),
so the train task uses :func:`dice_handler` instead.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np
import torch
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_dice

from lib.pipeline.labels import BACKGROUND, IGNORE_VALUE, NAMES, NUM_CLASSES

STRUCTURE_VALUES = [v for v in range(NUM_CLASSES) if v != BACKGROUND]


def structure_dice(pred, ref, batched: bool = False) -> torch.Tensor:
    """Dice of each structure between label maps, by the rules of this module.

    ``pred``, ``ref``: one label map each (any spatial shape, numpy or torch, values 0..11,
    ``ref`` may hold 255), or with ``batched`` a batch ``(B, 1, *spatial)``.
    Returns ``(S,)`` float, or ``(B, S)`` with ``batched``; S = 11 structures in label order,
    NaN where a structure is in neither map.
    """
    p = torch.as_tensor(pred).long()
    r = torch.as_tensor(ref).long()
    if not batched:
        p, r = p[None, None], r[None, None]
    if p.shape != r.shape:
        raise ValueError(f"label maps differ in shape: {tuple(p.shape)} vs {tuple(r.shape)}")
    ignore = r == IGNORE_VALUE
    p, r = p.masked_fill(ignore, BACKGROUND), r.masked_fill(ignore, BACKGROUND)
    # ignore_empty=False: a false positive scores 0 (MONAI gives 1 when both are empty: undone below)
    scores = compute_dice(p, r, include_background=False, ignore_empty=False, num_classes=NUM_CLASSES).float()
    in_either = torch.stack([((p == v) | (r == v)).flatten(1).any(1) for v in STRUCTURE_VALUES], 1)
    scores = torch.where(in_either, scores, torch.full_like(scores, float("nan")))
    return scores if batched else scores[0]


def binary_dice(pred, ref) -> float:
    """Dice of two boolean masks by the same rules (NaN when both are empty)."""
    return float(structure_dice(np.asarray(pred, dtype=np.uint8), np.asarray(ref, dtype=np.uint8))[0])


def summarise(per_image: torch.Tensor) -> Tuple[Optional[float], Dict[str, Optional[float]]]:
    """``(N, S)`` per-image structure Dice -> (mean Dice, {structure name: mean over images})."""
    per_image = torch.as_tensor(per_image, dtype=torch.float64).reshape(-1, len(STRUCTURE_VALUES))
    per_structure: Dict[str, Optional[float]] = {}
    for column, value in enumerate(STRUCTURE_VALUES):
        scored = per_image[:, column][~torch.isnan(per_image[:, column])]
        per_structure[NAMES[value]] = float(scored.mean()) if len(scored) else None
    present = [v for v in per_structure.values() if v is not None]
    return (sum(present) / len(present) if present else None), per_structure


def mean_dice(pred, ref) -> Optional[float]:
    """Mean structure Dice of one pair of label maps (None when neither holds a structure)."""
    return summarise(structure_dice(pred, ref)[None])[0]


class StructureDiceMetric(CumulativeIterationMetric):
    """MONAI cumulative metric of :func:`structure_dice`: ``y_pred``, ``y`` are label maps
    ``(B, 1, *spatial)``; ``aggregate()`` gives the mean Dice of :func:`summarise` (0 when
    nothing was scored, so that an engine can still compare epochs)."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor = None) -> torch.Tensor:
        return structure_dice(y_pred, y, batched=True)

    def aggregate(self) -> torch.Tensor:
        buffer = self.get_buffer()
        mean = summarise(buffer)[0] if isinstance(buffer, torch.Tensor) and buffer.numel() else None
        return torch.tensor(0.0 if mean is None else mean)


def dice_handler() -> IgniteMetricHandler:
    """Key-metric handler for MONAI Label's train task: engine outputs ``pred`` and ``label``
    are label maps ``(1, *spatial)`` per item (see ``lib.trainers.spine``)."""
    return IgniteMetricHandler(metric_fn=StructureDiceMetric(), output_transform=from_engine(["pred", "label"]),
                               save_details=False)
