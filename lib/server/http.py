"""The one place where the app wires its HTTP behaviour into MONAI Label's FastAPI app.

:func:`wire_http` is called once, in the server process (``server_mode(True)``), and puts in
front of MONAI Label's routes, outermost first:

- :class:`UploadLimit`: a request whose body is over ``--conf max_upload_mb`` is answered
  413 before it is read;
- CORS narrowed to ``--conf cors_origins`` (MONAI Label allows every origin);
- with MONAI Label's authentication on, :class:`lib.server.auth.AccessControl`: every
  non-public path needs a valid token, a few the admin role; MONAI Label's own endpoints
  check tokens with :func:`lib.server.auth.from_token`;
- :class:`AdmissionLimit`: ``/infer`` runs in a worker thread (MONAI Label computes it on
  the event loop, which stalls every other request), at most ``--conf
  max_concurrent_infers`` at once with up to ``--conf max_queued_infers`` waiting; more are
  answered 503 at once, with ``Retry-After``;

and adds the model version routes of :mod:`lib.server.admin`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import re
import sys
import threading
import time
from typing import Any, Dict, List, Optional

from fastapi.middleware.cors import CORSMiddleware
from monailabel.config import settings
from starlette.middleware import Middleware

from lib.pipeline.io import LIMITS
from lib.server.admin import install_admin
from lib.server.auth import AccessControl, install_token_check, send_json

logger = logging.getLogger(__name__)

UPLOAD_METHODS = {"POST", "PUT", "PATCH"}
#: defaults of ``--conf max_concurrent_infers`` / ``max_queued_infers``: one infer already
#: uses every core (or the GPU), so a second at once only doubles the memory peak
MAX_CONCURRENT_INFERS = 1
MAX_QUEUED_INFERS = 4


class UploadLimit:
    """ASGI middleware: answer 413 to a request whose ``Content-Length`` is over the limit.

    Checked before the body is read, so a huge upload costs neither disk nor time. A
    chunked body (no length) is checked after upload, file by file (:func:`check_upload`).
    """

    def __init__(self, app, max_bytes_of=lambda: LIMITS.max_upload_bytes):
        self.app = app
        self.max_bytes_of = max_bytes_of

    async def __call__(self, scope, receive, send):
        length = self._content_length(scope)
        limit = self.max_bytes_of()
        if length is not None and length > limit:
            await self._refuse(send, f"request body of {length / 2**20:.1f} MB is over the limit of "
                                     f"{limit / 2**20:g} MB (max_upload_mb)")
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _content_length(scope) -> int | None:
        if scope.get("type") != "http" or scope.get("method") not in UPLOAD_METHODS:
            return None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    @staticmethod
    async def _refuse(send, message: str) -> None:
        await send_json(send, 413, {"detail": message})


class InferAdmission:
    """How many infers may compute at once and wait for their turn; the rest are refused.

    ``max_running`` infers hold a slot (a semaphore taken in the worker thread) while up to
    ``max_queued`` more wait for one; :class:`AdmissionLimit` refuses any request beyond,
    before its body is read. Counts include a request's upload and response.
    """

    def __init__(self, max_running: int = MAX_CONCURRENT_INFERS, max_queued: int = MAX_QUEUED_INFERS):
        self._lock = threading.Lock()
        self.admitted = self.running = self.refused = 0
        self.mean_s: float | None = None  # moving average of an infer's compute time
        self.configure(max_running, max_queued)

    def configure(self, max_running: int, max_queued: int) -> "InferAdmission":
        if max_running < 1 or max_queued < 0:
            raise ValueError(f"max_concurrent_infers ({max_running}) must be >= 1 and "
                             f"max_queued_infers ({max_queued}) >= 0")
        self.max_running, self.max_queued = max_running, max_queued
        self.slots = threading.BoundedSemaphore(max_running)
        return self

    def try_admit(self) -> bool:
        with self._lock:
            if self.admitted >= self.max_running + self.max_queued:
                self.refused += 1
                return False
            self.admitted += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.admitted -= 1

    @contextlib.contextmanager
    def slot(self):
        """Hold one of ``max_running`` slots for the body (blocks the worker thread until one is free)."""
        slots = self.slots  # the one acquired is the one released, even if reconfigured meanwhile
        with slots:
            with self._lock:
                self.running += 1
            start = time.monotonic()
            try:
                yield
            finally:
                seconds = time.monotonic() - start
                with self._lock:
                    self.running -= 1
                    self.mean_s = seconds if self.mean_s is None else 0.8 * self.mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        """Seconds after which a refused client may find room: the queue ahead, at the recent pace."""
        per_infer = self.mean_s if self.mean_s is not None else 5.0
        return max(1, min(600, math.ceil(per_infer * max(self.admitted, 1) / self.max_running)))

    def info(self) -> Dict[str, Any]:
        return {"max_concurrent_infers": self.max_running, "max_queued_infers": self.max_queued,
                "admitted": self.admitted, "running": self.running, "refused": self.refused}


#: the server's one admission state (module-level like :data:`lib.pipeline.io.LIMITS`)
ADMISSION = InferAdmission()


def configure_admission(conf: Optional[Dict[str, Any]]) -> InferAdmission:
    """Set :data:`ADMISSION` from ``--conf`` strings; nonsense stops the start-up."""
    conf = conf or {}
    try:
        running = int(conf.get("max_concurrent_infers", MAX_CONCURRENT_INFERS))
        queued = int(conf.get("max_queued_infers", MAX_QUEUED_INFERS))
    except (TypeError, ValueError) as e:
        raise ValueError(f"max_concurrent_infers and max_queued_infers must be whole numbers ({e})") from None
    return ADMISSION.configure(running, queued)


def infer_path() -> re.Pattern:
    return re.compile(re.escape(settings.MONAI_LABEL_API_STR) + r"/infer/[^/]+/?")


class AdmissionLimit:
    """ASGI middleware for ``POST /infer/<model>``: beyond :class:`InferAdmission`'s room, 503 at once
    (JSON ``detail``, ``Retry-After``; the request is not read, nothing is queued); within
    it, the request goes to ``infer_app`` (:func:`worker_thread_infer_app`).
    """

    def __init__(self, app, infer_app=None, admission: Optional[InferAdmission] = None):
        self.app = app
        self.admission = admission or ADMISSION
        self.infer_app = infer_app or app
        self.path = infer_path()

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or not self.path.fullmatch(scope.get("path", "")):
            return await self.app(scope, receive, send)
        if not self.admission.try_admit():
            a = self.admission
            detail = (f"the server is busy: {a.max_running} infer(s) running and {a.max_queued} waiting "
                      f"(max_concurrent_infers, max_queued_infers); try again later")
            await send_json(send, 503, {"detail": detail}, [(b"retry-after", str(a.retry_after()).encode())])
            return
        try:
            await self.infer_app(scope, receive, send)
        finally:
            self.admission.leave()


def worker_thread_infer_app(admission: Optional[InferAdmission] = None):
    """An ASGI app serving ``POST /infer/{model}`` from a worker thread, one admission slot per infer.

    MONAI Label's endpoint is ``async`` but computes synchronously, so an infer holds the
    event loop: every other request (``/info``, label saves) waits, and a limit in front
    of it never sees a queue. This route has MONAI Label's parameters and role check
    (its signature) and calls MONAI Label's ``run_inference``, but is a plain function,
    which FastAPI runs in its thread pool. :class:`AdmissionLimit` sends infers here.
    """
    from fastapi import FastAPI
    from monailabel.endpoints import infer as infer_endpoint
    from monailabel.utils.others.generic import handle_torch_linalg_multithread

    admission = admission or ADMISSION

    def infer_in_worker_thread(**kwargs):
        kwargs.pop("user", None)  # checked by the dependency; run_inference does not take it
        with admission.slot():
            handle_torch_linalg_multithread(None)  # as MONAI Label does for its own infer threads
            return infer_endpoint.run_inference(**kwargs)

    infer_in_worker_thread.__signature__ = inspect.signature(infer_endpoint.api_run_inference)
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.add_api_route(f"{settings.MONAI_LABEL_API_STR}/infer/{{model}}", infer_in_worker_thread, methods=["POST"])
    return app


def harden_http_app(cors_origins: List[str]) -> bool:
    """Put :class:`UploadLimit` in front of MONAI Label's FastAPI app and narrow its CORS;
    behind CORS (so that refusals carry its headers) :class:`lib.server.auth.AccessControl` when
    auth is on, then :class:`AdmissionLimit` with infers in worker threads.

    MONAI Label allows every origin (``*`` with credentials) unless an environment
    variable it cannot serialise is set; here the origins come from ``--conf cors_origins``
    (comma-separated, default none: the OHIF viewer is served from the same origin and
    Slicer is no browser). The app object exists before our app class and its middleware
    stack is already built at start-up, so the stack is rebuilt once.
    """
    module = sys.modules.get("monailabel.app")
    fastapi_app = getattr(module, "app", None)
    if fastapi_app is None or getattr(fastapi_app, "_spine_hardened", False):
        return False
    for middleware in fastapi_app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = cors_origins
    fastapi_app.user_middleware.insert(0, Middleware(UploadLimit))
    install_token_check()
    if settings.MONAI_LABEL_AUTH_ENABLE:
        fastapi_app.user_middleware.append(Middleware(AccessControl))
    fastapi_app.user_middleware.append(Middleware(AdmissionLimit, infer_app=worker_thread_infer_app()))
    fastapi_app.middleware_stack = fastapi_app.build_middleware_stack()
    fastapi_app._spine_hardened = True
    return True


def wire_http(app) -> None:
    """Wire everything of this module into MONAI Label's FastAPI app (once; a no-op in the
    train and scoring processes, which build the app class without a FastAPI app)."""
    origins = [o.strip() for o in str(app.conf.get("cors_origins", "")).split(",") if o.strip()]
    harden_http_app(origins)
    install_admin(app)  # version routes; rescoring when the serving version changes
