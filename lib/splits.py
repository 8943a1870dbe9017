"""The train/validation split: chosen once, persisted, grown deterministically.

MONAI Label re-draws the split on every training run, so a validation image of one run
is trained on in the next and the validation Dice means little. Here each labelled
image is assigned once, when it is first seen, and keeps its side for good.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, List, Tuple

from lib.io import atomic_write_text


def _stable_order(image_id: str) -> str:
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def update_split(path: str, image_ids: Iterable[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Assign new ``image_ids`` and return ``(train_ids, val_ids)`` for the ids given.

    New ids are taken in a hash order (independent of arrival order within one call) and
    go to validation while it holds fewer than ``round(val_fraction * total)`` images.
    The file at ``path`` is rewritten atomically.
    """
    state: Dict[str, List[str]] = {"train": [], "validation": []}
    if os.path.exists(path):
        with open(path) as f:
            state.update(json.load(f))
    assigned = set(state["train"]) | set(state["validation"])
    ids = sorted(set(image_ids))
    new = sorted((i for i in ids if i not in assigned), key=_stable_order)
    for image_id in new:
        total = len(state["train"]) + len(state["validation"]) + 1
        side = "validation" if len(state["validation"]) < round(val_fraction * total) else "train"
        state[side].append(image_id)
    if new:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write_text(path, json.dumps(state, indent=1))
    present = set(ids)
    return [i for i in state["train"] if i in present], [i for i in state["validation"] if i in present]
