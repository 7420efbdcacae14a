"""Errors raised while admitting and running requests. Transports map them to statuses (see grpc_api/status.py)."""

from __future__ import annotations


class ServingError(Exception):
    """Base of errors raised while admitting or running a request."""


class InvalidRequestError(ServingError):
    """A request field is out of range or inconsistent.

    `field` names the request field at fault, as the service calls it ("max_new_tokens", "input"), so that a
    transport can name it as its caller sent it (HTTP: `max_tokens`, `prompt`); None when no one field is.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PreconditionError(ServingError):
    """The request is well-formed but the server's state cannot serve it (e.g. no chat template)."""


class OverloadedError(ServingError):
    """The request queue is full; the client should retry later (after `retry_after_s`)."""

    retry_after_s: float = 1.0


class TaskLimitError(OverloadedError):
    """A task is over one of its --task-policy limits (`limit`: max_queued or tokens_per_second); the other
    tasks are unaffected."""

    def __init__(self, message: str, *, task: str, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.task = task
        self.limit = limit
        self.retry_after_s = retry_after_s


class PriorityNotAllowedError(ServingError):
    """A request asks for a priority more urgent than its caller's role may."""


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
