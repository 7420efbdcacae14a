"""Errors raised while admitting and running requests. Transports map them to statuses (see grpc_api/status.py)."""

from __future__ import annotations


class ServingError(Exception):
    """Base of errors raised while admitting or running a request."""


class InvalidRequestError(ServingError):
    """A request field is out of range or inconsistent."""


class PreconditionError(ServingError):
    """The request is well-formed but the server's state cannot serve it (e.g. no chat template)."""


class OverloadedError(ServingError):
    """The request queue is full; the client should retry later."""


class UploadTooLargeError(ServingError):
    """A registration upload is larger than the server accepts."""


class DeadlineError(ServingError):
    """The request's deadline passed before it finished."""


class CancelledError(ServingError):
    """The client went away."""


class ShuttingDownError(ServingError):
    """The server is draining and takes no new requests."""


class TrainingJobNotFoundError(ServingError):
    """No training job has the given id."""


class UnsupportedModelError(Exception):
    """The base model is one the engine cannot serve exactly; raised at startup, before any port opens.

    Not a ServingError: no request ever sees it, so no transport status maps it.
    """
