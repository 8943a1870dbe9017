"""Model versions over HTTP, and the server's reaction when the serving model changes.

Routes (added to MONAI Label's FastAPI app by :func:`install_admin`):

- ``GET /model/spine/versions``: every version, newest first, with the serving one;
- ``POST /model/spine/rollback?version=V``: make version ``V`` serve again (atomic; the
  history keeps everything). With MONAI Label's authentication on, only the admin role.

Scores follow the model: a :class:`VersionWatcher` in the server process notices every
change of the serving version, whoever made it (a training run's promotion, a rollback
over HTTP or from the command line), and asks for epistemic scoring of the unlabeled
images; scoring skips what this version scored already, so nothing is redone when
nothing changed.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, Callable, Dict, Optional

from fastapi import APIRouter, Depends
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC

from lib.lifecycle import versions
from lib.lifecycle.model_store import MODEL_NAME, model_version, weights_path
from lib.pipeline.errors import SpineError

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 3.0


class UnknownModel(SpineError):
    status = 404


class VersionWatcher:
    """A daemon thread: calls ``on_change(version)`` when the serving version changes."""

    def __init__(self, model_dir: str, on_change: Callable[[str], Any], interval: float = WATCH_INTERVAL_S):
        self.path = weights_path(model_dir)
        self.on_change, self.interval = on_change, interval
        self.seen = self.current()  # the start-up scoring covers the version serving now
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-watcher", daemon=True)

    def current(self) -> Optional[str]:
        try:
            return model_version(self.path)  # the sha is cached while the file is unchanged
        except OSError:
            return None

    def start(self) -> "VersionWatcher":
        self._thread.start()
        return self

    def poke(self) -> None:
        """Look now (after a change made in this process)."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                version = self.current()
                if version and version != self.seen:
                    logger.info(f"Serving model version changed: {self.seen} -> {version}")
                    self.seen = version
                    self.on_change(version)
            except Exception:
                logger.exception("Version watcher: reacting to a model change failed")


def training_state() -> Dict[str, Any]:
    """Whether a training runs, and how the last one went (MONAI Label's task list)."""
    from monailabel.utils.async_tasks.utils import tasks

    runs = list(tasks("train"))
    last = runs[-1] if runs else None
    return {
        "running": any(t.get("status") in ("SUBMITTED", "RUNNING") for t in runs),
        "last": {k: last.get(k) for k in ("id", "status", "start_ts", "end_ts")} if last else None,
    }


def versions_info(app) -> Dict[str, Any]:
    """For ``/info``: serving version and its metrics, the newest versions, split sizes, training state."""
    try:
        return {**versions.info(app.model_config.model_dir), "training": training_state()}
    except Exception as e:  # /info must answer
        logger.exception("Model versions unreadable")
        return {"error": str(e)}


def build_router(app, watcher: Optional[VersionWatcher] = None) -> APIRouter:
    router = APIRouter(prefix="/model", tags=["Model versions"])
    model_dir = app.model_config.model_dir

    def check_model(model: str) -> None:
        if model != MODEL_NAME:
            raise UnknownModel(f"unknown model {model!r}; this server has {MODEL_NAME!r}")

    @router.get("/{model}/versions", summary="Model versions, newest first, and the serving one")
    def api_versions(model: str) -> Dict[str, Any]:
        check_model(model)
        serving = versions.serving_record(model_dir)
        return {"serving": serving.get("version"),
                "versions": list(reversed(versions.list_versions(model_dir))),
                "history": versions.history(model_dir)}

    @router.post("/{model}/rollback", summary="Make an earlier model version serve again (admin)")
    def api_rollback(model: str, version: str,
                     user=Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))) -> Dict[str, Any]:
        check_model(model)
        by = getattr(user, "username", "") or "HTTP"
        record = versions.rollback(model_dir, version, by=f"HTTP ({by})")
        if watcher is not None:
            watcher.poke()
        return {"serving": record}

    return router


def install_admin(app) -> bool:
    """Add the routes to MONAI Label's FastAPI app and start the version watcher (once).

    Called in the server process only (``server_mode(True)``): train and scoring
    processes build the app too, and must neither serve routes nor watch.
    """
    module = sys.modules.get("monailabel.app")
    fastapi_app = getattr(module, "app", None)
    if fastapi_app is None or getattr(fastapi_app, "_spine_admin", False):
        return False
    watcher = VersionWatcher(app.model_config.model_dir, lambda version: app.async_scoring(None)).start()
    fastapi_app.include_router(build_router(app, watcher))
    fastapi_app._spine_admin = True
    fastapi_app._spine_version_watcher = watcher
    return True
