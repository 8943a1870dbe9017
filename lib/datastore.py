"""The local studies folder, with labels checked and remapped before they are stored.

``PUT /datastore/label`` from 3D Slicer sends a labelmap whose values are 1..N in its
segment order plus ``label_info`` with the segment names. Here the names are mapped
to our label table, the label must lie on the image's voxel grid, and only then is it
written (as NIfTI). Anything else is refused with a 4xx and nothing is written.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Dict

from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.errors import InvalidInput, UnknownImage
from lib.io import SCAN_PATTERNS, conform_label, read_volume

logger = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class SpineDatastore(LocalDatastore):
    def __init__(self, studies: str, **kwargs):
        super().__init__(studies, extensions=SCAN_PATTERNS, **kwargs)

    def _require_image(self, image_id: str) -> None:
        if not image_id or image_id not in self._datastore.objects:
            raise UnknownImage(f"unknown image id {image_id!r}")

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        tag = label_tag or DefaultLabelTag.FINAL.value
        if not TAG_PATTERN.match(tag):
            raise InvalidInput(f"label tag {tag!r} is not allowed: use letters, digits, '-' and '_' only")
        self._require_image(image_id)
        label_info = dict(label_info or {})
        with tempfile.TemporaryDirectory(prefix="spine-label-") as tmp:
            conformed = os.path.join(tmp, "label.nii.gz")
            summary = conform_label(label_filename, self.get_image_uri(image_id), label_info.get("label_info"), conformed)
            label_info.update(summary)
            if tag == DefaultLabelTag.FINAL.value and not summary["structures"]:
                raise InvalidInput("the label is empty: a final label must contain at least one structure")
            logger.info(f"Label for {image_id} ({tag}) holds {summary['structures']}")
            return super().save_label(image_id, conformed, tag, label_info)

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        read_volume(image_filename)  # refuse unreadable uploads before they enter the datastore
        return super().add_image(image_id, image_filename, image_info)

    def get_image_uri(self, image_id: str) -> str:
        self._require_image(image_id)
        return super().get_image_uri(image_id)
