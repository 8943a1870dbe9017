"""Server-level behaviour of the app that MONAI Label leaves to each app.

- the local studies folder is a :class:`lib.datastore.SpineDatastore` (labels checked);
- scoring is launched only when the serving model changed since the last launch,
  not on every ``/activelearning`` call (MONAI Label's default).
"""

from __future__ import annotations

import logging

from monailabel.config import settings

from lib.datastore import SpineDatastore
from lib.model_store import model_version

logger = logging.getLogger(__name__)


class SpineServerMixin:
    """Mixed into the app class in ``apps/spine/main.py`` before ``MONAILabelApp``."""

    _scored_version = None

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SpineDatastore(
            self.studies,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

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
