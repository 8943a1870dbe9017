"""Seed a studies folder from labels that exist already (a site's earlier annotations).

    python -m lib.seed SITE_DIR --studies STUDIES_DIR [--model-dir DIR]

``SITE_DIR`` holds ``images/<id>.nii.gz`` and ``labels/<id>_seg.nii.gz`` (values of our
label table, :mod:`lib.pipeline.labels`; 255 = ignore becomes background) and, optionally,
``splits/train.txt``, ``splits/val.txt`` and ``splits/test.txt`` with one id per line
(``#`` starts a comment).

Each pair goes in through the datastore (:class:`lib.server.datastore.SpineDatastore`): the same
checks as an upload and a label save from Slicer (one readable 3D volume, the label on
the image's grid, known values, not empty) and the same atomic writes; the label is
stored as ``final``. A bad pair is skipped with the reason and the others go on; an image
already in the studies folder is not replaced, nor is a final label it has.

The split lists go into the persisted split (:mod:`lib.lifecycle.splits`, ``model_dir/split.json``):
``val`` ids are validation images for good, ``test`` ids are never trained or validated
on; ids on no list are assigned by the usual rule at the next training. Ends with a
summary; the exit status is 1 when a pair was skipped for a problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from monailabel.interfaces.datastore import DefaultLabelTag

from lib.lifecycle.model_store import model_dir_from_conf
from lib.lifecycle.splits import assign, read_split, split_path
from lib.server.datastore import SpineDatastore, check_name

logger = logging.getLogger(__name__)

IMAGE_SUFFIX = ".nii.gz"
LABEL_SUFFIX = "_seg.nii.gz"
#: split list file -> side in ``split.json``
SPLIT_FILES = {"train.txt": "train", "val.txt": "validation", "test.txt": "test"}


@dataclass
class SeedReport:
    imported: List[str] = field(default_factory=list)
    labels_added: List[str] = field(default_factory=list)  # image was there, without a final label
    kept: List[str] = field(default_factory=list)  # image and final label were there already
    skipped: Dict[str, str] = field(default_factory=dict)  # id -> why
    split_notes: List[str] = field(default_factory=list)
    split: Dict[str, int] = field(default_factory=dict)

    def lines(self) -> List[str]:
        out = [f"imported {len(self.imported)} image(s) with final labels"]
        if self.labels_added:
            out.append(f"added final labels to {len(self.labels_added)} image(s) already in the studies folder")
        if self.kept:
            out.append(f"kept {len(self.kept)} image(s) that already had a final label: {', '.join(self.kept)}")
        out += [f"skipped {image_id}: {why}" for image_id, why in sorted(self.skipped.items())]
        out += [f"split: {note}" for note in self.split_notes]
        if self.split:
            out.append("split now: " + ", ".join(f"{n} {side}" for side, n in self.split.items()))
        return out


def read_list(path: Path) -> List[str]:
    """Ids of a split list: one per line, blanks and ``#`` comments ignored."""
    ids = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            ids.append(line)
    return ids


def read_split_lists(site: Path, report: SeedReport) -> Dict[str, List[str]]:
    """The site's split lists by side; an id on two lists is on neither (reported)."""
    sides: Dict[str, List[str]] = {}
    for name, side in SPLIT_FILES.items():
        path = site / "splits" / name
        if path.exists():
            sides[side] = read_list(path)
    seen: Dict[str, str] = {}
    for side, ids in sides.items():
        for image_id in ids:
            if image_id in seen and seen[image_id] != side:
                report.split_notes.append(f"{image_id} is listed for both {seen[image_id]} and {side}: "
                                          "on neither list (choose one)")
            seen.setdefault(image_id, side)
    twice = {i for side, ids in sides.items() for i in ids if seen[i] != side}
    return {side: [i for i in ids if i not in twice] for side, ids in sides.items()}


def seed(site: str | os.PathLike, studies: str | os.PathLike, model_dir: str) -> SeedReport:
    """Import a site's image/label pairs and split lists (see the module docstring)."""
    site, report = Path(site), SeedReport()
    images_dir, labels_dir = site / "images", site / "labels"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: no images folder (expected images/<id>{IMAGE_SUFFIX})")
    os.makedirs(studies, exist_ok=True)
    datastore = SpineDatastore(str(studies), auto_reload=False)
    for path in sorted(images_dir.iterdir()):
        if not path.name.endswith(IMAGE_SUFFIX):
            report.skipped[path.name] = f"not a {IMAGE_SUFFIX} image"
            continue
        image_id = path.name[: -len(IMAGE_SUFFIX)]
        label = labels_dir / f"{image_id}{LABEL_SUFFIX}"
        try:
            check_name(image_id, "image id")
            if not label.exists():
                raise FileNotFoundError(f"no label {label.relative_to(site)}")
            _import_pair(datastore, image_id, path, label, report)
        except Exception as e:  # one bad pair must not stop the others
            report.skipped[image_id] = str(e) or type(e).__name__
    for orphan in sorted(labels_dir.glob(f"*{LABEL_SUFFIX}")) if labels_dir.is_dir() else []:
        image_id = orphan.name[: -len(LABEL_SUFFIX)]
        if not (images_dir / f"{image_id}{IMAGE_SUFFIX}").exists():
            report.skipped[image_id] = f"label without an image images/{image_id}{IMAGE_SUFFIX}"

    sides = read_split_lists(site, report)
    labelled = set(datastore.get_labeled_images())
    for side, ids in sides.items():
        for image_id in ids:
            if image_id not in labelled:
                report.split_notes.append(f"{image_id} ({side} list) has no final label in the studies folder: "
                                          "not assigned")
    if sides:
        chosen = {side: [i for i in ids if i in labelled] for side, ids in sides.items()}
        report.split_notes += assign(split_path(model_dir), chosen)
    report.split = {side: len(ids) for side, ids in read_split(split_path(model_dir)).items()}
    return report


def _import_pair(datastore: SpineDatastore, image_id: str, image: Path, label: Path, report: SeedReport) -> None:
    final = DefaultLabelTag.FINAL.value
    if image_id in datastore.list_images():
        if image_id in datastore.get_labeled_images():
            report.kept.append(image_id)
            return
        datastore.save_label(image_id, str(label), final, {"source": "seed"})
        report.labels_added.append(image_id)
        return
    datastore.add_image(image_id, str(image), {"source": "seed"})
    try:
        datastore.save_label(image_id, str(label), final, {"source": "seed"})
    except Exception:
        datastore.remove_image(image_id)  # no image without its label: the pair is skipped whole
        raise
    report.imported.append(image_id)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.seed", description=__doc__.split("\n")[0])
    parser.add_argument("site", help="folder with images/<id>.nii.gz, labels/<id>_seg.nii.gz, optional splits/")
    parser.add_argument("--studies", required=True, help="the server's studies folder")
    parser.add_argument("--model-dir", default=None, help="the server's model_dir (default: model/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    model_dir = model_dir_from_conf({"model_dir": args.model_dir})
    try:
        report = seed(args.site, args.studies, model_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 1 if report.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
