"""The train/validation/test split: chosen once, persisted, grown deterministically.

MONAI Label re-draws the split on every training run, so a validation image of one run
is trained on in the next and the validation Dice means little. Here each labelled
image is assigned once, when it is first seen, and keeps its side for good.

``model_dir/split.json`` holds three lists of image ids: ``train``, ``validation`` and
``test``. Test ids come only from an administrator (:mod:`lib.seed`): they are never
trained on and never validated on, so that an accuracy measured on them stays honest.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Iterable, List, Tuple

from lib.pipeline.io import atomic_write_text

SPLIT_FILENAME = "split.json"
SIDES = ("train", "validation", "test")


def split_path(model_dir: str) -> str:
    return os.path.join(model_dir, SPLIT_FILENAME)


def _stable_order(image_id: str) -> str:
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def read_split(path: str) -> Dict[str, List[str]]:
    """The persisted split (every side present, possibly empty); empty when there is no file."""
    state: Dict[str, List[str]] = {side: [] for side in SIDES}
    if os.path.exists(path):
        with open(path) as f:
            state.update({k: [str(i) for i in v] for k, v in json.load(f).items() if k in SIDES})
    return state


def _write(path: str, state: Dict[str, List[str]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=1))


def test_ids(path: str) -> List[str]:
    """Ids held out for testing: no training run may train or validate on them."""
    return read_split(path)["test"]


test_ids.__test__ = False  # a library function, not a pytest test


def update_split(path: str, image_ids: Iterable[str], val_fraction: float) -> Tuple[List[str], List[str]]:
    """Assign new ``image_ids`` and return ``(train_ids, val_ids)`` for the ids given.

    New ids are taken in a hash order (independent of arrival order within one call) and
    go to validation while it holds fewer than ``round(val_fraction * total)`` images
    (test images not counted). Test ids are never returned. The file at ``path`` is
    rewritten atomically.
    """
    state = read_split(path)
    assigned = set(state["train"]) | set(state["validation"]) | set(state["test"])
    ids = sorted(set(image_ids))
    new = sorted((i for i in ids if i not in assigned), key=_stable_order)
    for image_id in new:
        total = len(state["train"]) + len(state["validation"]) + 1
        side = "validation" if len(state["validation"]) < round(val_fraction * total) else "train"
        state[side].append(image_id)
    if new:
        _write(path, state)
    present = set(ids)
    return [i for i in state["train"] if i in present], [i for i in state["validation"] if i in present]


def assign(path: str, sides: Dict[str, Iterable[str]]) -> List[str]:
    """Put ids on the sides an administrator chose (``{"train": [...], "validation": [...], "test": [...]}``).

    An id keeps a side it already has, with one exception: ``test`` wins, because an
    image meant for testing must leave training and validation from now on (a model
    trained on it before stays so: the returned notes say so). Returns notes on every id
    that was not put where it was asked to go, or that moved.
    """
    state = read_split(path)
    notes: List[str] = []
    changed = False
    for side in ("test", "validation", "train"):  # test first: it wins
        for image_id in sorted(set(sides.get(side) or ())):
            current = next((s for s in SIDES if image_id in state[s]), None)
            if current == side:
                continue
            if current is None:
                state[side].append(image_id)
                changed = True
            elif side == "test":
                state[current].remove(image_id)
                state["test"].append(image_id)
                changed = True
                notes.append(f"{image_id}: moved from {current} to test; models trained before may have "
                             f"{'trained' if current == 'train' else 'validated'} on it")
            else:
                notes.append(f"{image_id}: asked for {side} but it is on the {current} side already: kept there")
    if changed:
        _write(path, state)
    return notes
