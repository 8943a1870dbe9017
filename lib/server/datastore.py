"""The local studies folder: names checked, labels remapped, every write atomic.

``PUT /datastore/label`` from 3D Slicer sends a labelmap whose values are 1..N in its
segment order plus ``label_info`` with the segment names. Here the names are mapped
to our label table, the label must lie on the image's voxel grid, and only then is it
written (as NIfTI). Anything else is refused with a 4xx and nothing is written.

Image ids and label tags become file and folder names, so every one a client sends is
checked against one rule (:data:`ID_PATTERN`, :data:`TAG_PATTERN`): no separators, no
``..``, no NUL. Images, labels and ``datastore_v2.json`` are written to a temporary
file next to the target and renamed over it (:func:`lib.pipeline.io.atomic_output`), so a crash
leaves the previous version, never a torn file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
from typing import Any, Dict

from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.pipeline.errors import Conflict, InvalidInput, UnknownImage
from lib.pipeline.io import (
    SCAN_PATTERNS,
    atomic_copy,
    atomic_write_text,
    check_upload,
    check_volume,
    conform_label,
    read_volume,
    remove_stale_partials,
)

logger = logging.getLogger(__name__)

#: image (and label) ids: they become file names in the studies folder
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: label tags: they become folder names under ``labels/``
TAG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_name(value: Any, what: str, pattern: re.Pattern = ID_PATTERN) -> str:
    """``value`` if it is a safe file name by ``pattern`` (whole string, no ``..``), else 422."""
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        allowed = "letters, digits, '-' and '_'" + (" and '.' (not '..')" if pattern is ID_PATTERN else "")
        raise InvalidInput(f"{what} {value!r} is not allowed: use {allowed}, starting with a letter or digit")
    return value


class SpineDatastore(LocalDatastore):
    def __init__(self, studies: str, **kwargs):
        self._refresh_lock = threading.RLock()  # first: the parent's __init__ starts the file watcher
        super().__init__(studies, extensions=SCAN_PATTERNS, **kwargs)
        if getattr(self, "_handler", None) is not None:  # auto reload: atomic writes arrive as renames
            self._handler.on_moved = self._on_moved_event
        for folder in (self._datastore.image_path(), self._datastore.label_path(DefaultLabelTag.FINAL),
                       self._datastore.label_path(DefaultLabelTag.ORIGINAL)):
            for path in remove_stale_partials(folder):
                logger.warning(f"Removed an unfinished write left by a crash: {path}")

    def _on_moved_event(self, event) -> None:
        """A file renamed into place (an atomic write, also by the train/scoring processes):
        reload ``datastore_v2.json``, or rescan for images and labels, as on a change."""
        if os.path.abspath(event.dest_path) == os.path.abspath(self._datastore_config_path):
            self._init_from_datastore_file()  # no-op for our own writes: their mtime is known
        else:
            self._on_any_event(event)

    # --- names -----------------------------------------------------------------------
    def _require_image(self, image_id: Any) -> str:
        """A known image id (ids found on disk are file names already), else 422 or 404."""
        if isinstance(image_id, str) and image_id in self._datastore.objects:
            return image_id
        check_name(image_id, "image id")
        raise UnknownImage(f"unknown image id {image_id!r}")

    def _require_tag(self, tag: Any) -> str:
        """A known tag (a folder under ``labels/`` already) or a safe new one, else 422."""
        if isinstance(tag, str) and tag in self._datastore.tags():
            return tag
        return check_name(tag, "label tag", TAG_PATTERN)

    # --- images ----------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """Store an uploaded scan under ``image_id`` after checking it is one sane 3D volume.

        Refuses (409) an id that exists already: replacing a scan would orphan its labels.
        """
        ext = check_upload(image_filename, "image")
        if ext == ".zip":
            raise InvalidInput("image: a zipped DICOM series can be segmented (POST /infer) but not stored; "
                               "convert it to .nii.gz first")
        image_id = check_name(image_id or self._to_id(os.path.basename(image_filename))[0], "image id")
        array, _ = read_volume(image_filename)  # refuse unreadable uploads before they enter the datastore
        check_volume(array, "image")
        name = self._filename(image_id, ext)
        with FileLock(self._lock_file):
            if image_id in self._datastore.objects:
                raise Conflict(f"image id {image_id!r} exists already: remove it first or choose another id")
            atomic_copy(image_filename, os.path.join(self._datastore.image_path(), name))
            info = dict(image_info or {}, ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        logger.info(f"Added image {image_id} ({name})")
        return image_id

    def remove_image(self, image_id: str) -> None:
        super().remove_image(self._require_image(image_id))
        self._forget_removed()

    def get_image_uri(self, image_id: str) -> str:
        return super().get_image_uri(self._require_image(image_id))

    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        return super().get_image_info(self._require_image(image_id))

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        return super().update_image_info(self._require_image(image_id), info)

    # --- labels ----------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        tag = label_tag or DefaultLabelTag.FINAL.value
        check_name(tag, "label tag", TAG_PATTERN)
        self._require_image(image_id)
        check_upload(label_filename, "label")
        label_info = dict(label_info or {})
        with tempfile.TemporaryDirectory(prefix="spine-label-") as tmp:
            conformed = os.path.join(tmp, "label.nii.gz")
            summary = conform_label(label_filename, self.get_image_uri(image_id), label_info.get("label_info"), conformed)
            label_info.update(summary)
            if tag == DefaultLabelTag.FINAL.value and not summary["structures"]:
                raise InvalidInput("the label is empty: a final label must contain at least one structure")
            logger.info(f"Label for {image_id} ({tag}) holds {summary['structures']}")
            return self._store_label(image_id, conformed, tag, label_info)

    def _store_label(self, image_id: str, path: str, tag: str, label_info: Dict[str, Any]) -> str:
        """``LocalDatastore.save_label`` with an atomic copy (its ``shutil.copy`` can tear)."""
        name = self._filename(image_id, ".nii.gz")
        folder = self._datastore.label_path(tag)
        with FileLock(self._lock_file):
            os.makedirs(folder, exist_ok=True)
            atomic_copy(path, os.path.join(folder, name))
            label_info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id].labels[tag] = DataModel(info=label_info, ext=".nii.gz")
            self._update_datastore_file(lock=False)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        super().remove_label(self._require_image(label_id), self._require_tag(label_tag))
        self._forget_removed()

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(self._require_image(label_id), self._require_tag(label_tag))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(self._require_image(label_id), self._require_tag(label_tag))

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        return super().update_label_info(self._require_image(label_id), self._require_tag(label_tag), info)

    # --- the index and its file (datastore_v2.json) ---------------------------------
    def _forget_removed(self) -> None:
        """Drop what was just deleted from the index before the request returns.

        With auto reload, ``LocalDatastore`` leaves that to the file watcher, which runs
        later on its own thread: until then the listing and ``datastore_v2.json`` still
        name the deleted scan or label, and the watcher rewrites the file in the middle
        of whatever request comes next. (Without auto reload the parent refreshed already.)
        """
        if self._auto_reload:
            self.refresh()

    def refresh(self) -> None:
        """Reconcile the index with the files, one thread at a time (requests and the file
        watcher both call this; the parent's reconcile mutates the index unguarded)."""
        with self._refresh_lock:
            super().refresh()

    def _update_datastore_file(self, lock: bool = True) -> None:
        """Write ``datastore_v2.json`` atomically (MONAI Label truncates it in place)."""

        def write():
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()
