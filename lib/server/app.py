"""Server-level behaviour of the app that MONAI Label leaves to each app.

- the local studies folder is a :class:`lib.server.datastore.SpineDatastore` (names checked,
  labels checked, writes atomic);
- input limits come from ``--conf max_voxels N`` and ``--conf max_upload_mb N``;
- HTTP behaviour (upload limit, CORS, tokens and roles, infer admission, version routes)
  is wired in by :func:`lib.server.http.wire_http`, once, when the server process starts;
- ``/infer`` reads only uploads and datastore images: a client-sent server path (as
  ``image`` or in ``params``) is refused, and an infer never overwrites a final label;
- scoring is launched only when the serving model changed since the last launch,
  not on every ``/activelearning`` call (MONAI Label's default);
- training starts on its own when enough new final labels arrived (:mod:`lib.lifecycle.autotrain`),
  on a label save, after a run, at start-up and periodically; ``/info`` shows the
  settings and counters under ``auto_train``.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from typing import Any, Dict, List

from monailabel.config import settings
from monailabel.interfaces.datastore import DefaultLabelTag

from lib.lifecycle.autotrain import AutoTrainer, AutoTrainSettings
from lib.lifecycle.model_store import MODEL_NAME, model_version
from lib.pipeline.errors import InvalidInput
from lib.pipeline.io import check_upload, configure_limits
from lib.server.admin import versions_info
from lib.server.datastore import SpineDatastore
from lib.server.http import ADMISSION, configure_admission, wire_http

logger = logging.getLogger(__name__)

#: ``result_extension`` an infer may ask for (it becomes a temporary file's suffix)
RESULT_EXTENSION = re.compile(r"(\.[A-Za-z0-9]{1,8}){1,3}")
#: states of a MONAI Label task that is queued or running
ACTIVE_TASK_STATES = ("SUBMITTED", "RUNNING")


def is_upload(path: Any) -> bool:
    """Whether ``path`` is a file MONAI Label's endpoints stored from this request's upload.

    They use ``tempfile.NamedTemporaryFile(suffix=...).name``: a ``tmp*`` file directly in
    the temporary folder. Anything else a client names is a path on the server.
    """
    if not isinstance(path, str) or "\0" in path:
        return False
    real = os.path.realpath(path)
    return (os.path.dirname(real) == os.path.realpath(tempfile.gettempdir())
            and os.path.basename(real).startswith("tmp") and os.path.isfile(real))


class SpineServerMixin:
    """Mixed into the app class in ``apps/spine/main.py`` before ``MONAILabelApp``."""

    _scored_version = None
    _auto_trainer_instance = None
    _auto_trainer_lock = threading.Lock()

    def init_datastore(self):
        limits = configure_limits(self.conf)
        logger.info(f"Input limits: {limits}")
        logger.info(f"Infer admission: {configure_admission(self.conf).info()}")
        logger.info(f"Auto-train: {self.auto_trainer().settings}")  # a bad setting stops the start here
        if self.studies.startswith(("http://", "https://")):
            if settings.MONAI_LABEL_DATASTORE.lower() not in ("", "dicomweb"):  # xnat, dsa
                return super().init_datastore()
            from lib.server.dicomweb import init_dicomweb_datastore  # MR by default, SEG without dcmqi

            self.studies = self.studies.rstrip("/").strip()
            return init_dicomweb_datastore(self.studies, self.conf)
        return SpineDatastore(
            self.studies,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def infer(self, request, datastore=None):
        return super().infer(self._checked_infer_request(request, datastore or self.datastore()), datastore)

    def batch_infer(self, request, datastore=None):
        """MONAI Label's batch infer (``POST /batch/infer/spine``): every image asked for gets an
        ``original`` label. Without CUDA its default (``multi_gpu``) divides by the number of
        GPUs, 0 (ZeroDivisionError, HTTP 500): on a CPU the images go to the CPU instead."""
        import torch

        request = dict(request)
        if not torch.cuda.is_available():
            request.update(multi_gpu=False, device="cpu")
        return super().batch_infer(request, datastore)

    @staticmethod
    def _checked_infer_request(request: Dict[str, Any], datastore) -> Dict[str, Any]:
        """Refuse what an infer request must not do, before any file is read.

        ``image``: an upload (checked like any upload) or a datastore id, never a server
        path. ``label``: an upload only. ``result_extension``: a plain suffix. A saved
        result goes to the ``original`` tag: an infer must not replace a final label.
        """
        image = request.get("image")
        if is_upload(image):
            check_upload(image, "image")
        elif isinstance(image, str) and isinstance(datastore, SpineDatastore):
            datastore.get_image_uri(image)  # 422 for a bad id, 404 for an unknown one
        label = request.get("label")
        if label is not None and not is_upload(label):
            raise InvalidInput("label: send the file as an upload; server paths are not accepted")
        ext = request.get("result_extension")
        if ext and not (isinstance(ext, str) and RESULT_EXTENSION.fullmatch(ext)):
            raise InvalidInput(f"result_extension {ext!r} is not a file suffix such as '.nii.gz' or '.nrrd'")
        if request.get("save_label") and str(request.get("label_tag") or "") == DefaultLabelTag.FINAL.value:
            raise InvalidInput("an infer result cannot be saved as the 'final' label: save it as 'original'")
        return request

    def async_scoring(self, method, params=None):
        path = self.model_config.path
        try:
            version = model_version(path)
        except FileNotFoundError:
            return {}  # untrained: nothing to score with
        if method is None and version == self._scored_version:
            return {}
        self._scored_version = version
        logger.info(f"Scoring unlabeled images with model version {version}")
        return super().async_scoring(method, params)

    # --- retraining on its own (lib/lifecycle/autotrain.py) ---------------------------------------
    def auto_trainer(self) -> AutoTrainer:
        with self._auto_trainer_lock:
            if self._auto_trainer_instance is None:
                self._auto_trainer_instance = AutoTrainer(
                    self.model_config.model_dir,
                    AutoTrainSettings.from_conf(self.conf),
                    labeled_images=lambda: self.datastore().get_labeled_images(),
                    training_busy=self._training_busy,
                    start_training=self._start_auto_training,
                    wait_finished=self._wait_training_finished,
                )
            return self._auto_trainer_instance

    def info(self):
        meta = super().info()
        meta["auto_train"] = self.auto_trainer().info()
        meta["versions"] = versions_info(self)  # serving version, its metrics, versions, training state
        meta["infer_admission"] = ADMISSION.info()
        return meta

    def server_mode(self, mode: bool):
        super().server_mode(mode)
        if mode:  # the server process only: not the train/scoring subprocesses that build the app too
            wire_http(self)
            self.auto_trainer().start_periodic()

    def on_save_label(self, image_id, label_id):
        res = super().on_save_label(image_id, label_id)
        if self._server_mode:
            self.auto_trainer().check(f"label {image_id}")
        return res

    @staticmethod
    def _train_tasks() -> List[Dict[str, Any]]:
        from monailabel.utils.async_tasks.utils import tasks

        return list(tasks("train"))

    def _training_busy(self) -> bool:
        from monailabel.utils.async_tasks.utils import processes

        # a task is SUBMITTED before its process exists: MONAI Label's own check misses it
        return bool(processes("train")) or any(t.get("status") in ACTIVE_TASK_STATES for t in self._train_tasks())

    def _start_auto_training(self) -> bool:
        """Start the ``spine`` training as a train request would; False if one already runs.

        Returns once the task's process exists (or after 30 s), so that a train request
        arriving right after is refused (429) by MONAI Label instead of queued behind it.
        """
        task = self.async_training(MODEL_NAME)
        if not task:
            return False
        deadline = time.time() + 30
        while task.get("status") == "SUBMITTED" and time.time() < deadline:
            time.sleep(0.05)
        return True

    def _wait_training_finished(self, poll: float = 2.0) -> None:
        while self._training_busy():
            time.sleep(poll)
