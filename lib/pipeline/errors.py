"""Errors that reach a user: each carries the HTTP status the server answers with.

They subclass FastAPI's ``HTTPException`` so that raising one anywhere inside a
request (infer, label save) gives the client a 4xx with the message, while the
command-line tool and Python API see an ordinary exception.
"""

from fastapi import HTTPException


class SpineError(HTTPException):
    status = 400

    def __init__(self, message: str):
        super().__init__(status_code=self.status, detail=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(SpineError):
    """The image or label cannot be used as sent (format, shape, values)."""

    status = 422


class UnknownImage(SpineError):
    status = 404


class ModelNotTrained(SpineError):
    """No weights yet: the bootstrap phase, before the first training."""

    status = 409


class Conflict(SpineError):
    """The request would overwrite or duplicate something that must not be lost."""

    status = 409


class TooLarge(SpineError):
    """An upload over ``max_upload_mb``."""

    status = 413


class PlanMismatch(SpineError):
    """Weights built for another plan (network mode, width, spacing ...) than the server's."""

    status = 409
