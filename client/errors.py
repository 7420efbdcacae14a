"""Typed errors raised by the client: one class per gRPC status code the server uses.

Callers catch `SoftpromptError` (or a subclass) instead of `grpc.RpcError`, so they need not know
that the transport is gRPC; `.code` keeps the status code for those who do.
"""

from __future__ import annotations

import grpc

__all__ = [
    "SoftpromptError",
    "NotFoundError",
    "InvalidArgumentError",
    "FailedPreconditionError",
    "ResourceExhaustedError",
    "DeadlineExceededError",
    "UnavailableError",
    "UnauthenticatedError",
    "PermissionDeniedError",
    "UnimplementedError",
    "CancelledError",
    "InternalError",
    "from_rpc_error",
]


class SoftpromptError(Exception):
    """A call to the softprompt server failed.

    Attributes:
        code: the gRPC status code.
        details: the server's message (what went wrong and how to fix it).
        rpc: the call that failed, "Service/Method" (e.g. "Training/ListTrainingJobs"); "" if unknown.
        request_id: the id the server gave the call (its `x-request-id`, also on its log lines about it); None
            when no softprompt server answered (it could not be reached, or a proxy answered in its place).
    """

    def __init__(self, code: grpc.StatusCode, details: str, *, rpc: str = "", request_id: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.rpc = rpc
        self.request_id = request_id


class NotFoundError(SoftpromptError):
    """No prompt, version or alias matches the reference."""


class InvalidArgumentError(SoftpromptError):
    """The request is malformed (bad name, parameters out of range, unreadable prompt...)."""


class FailedPreconditionError(SoftpromptError):
    """The server's state forbids the request (e.g. prompt made for another base model)."""


class ResourceExhaustedError(SoftpromptError):
    """The server is overloaded, the task is over a limit, or the request exceeds a size limit; retry later
    or send less.

    Attributes:
        retry_after: seconds the server asks the client to wait before retrying (its `retry-after`
            trailing metadata), or None when it did not say.
    """

    retry_after: float | None = None


class DeadlineExceededError(SoftpromptError):
    """The call did not finish before its deadline."""


class UnavailableError(SoftpromptError):
    """The server cannot be reached or is shutting down."""


class UnauthenticatedError(SoftpromptError):
    """The call lacks valid credentials."""


class PermissionDeniedError(SoftpromptError):
    """The caller may not perform this operation."""


class UnimplementedError(SoftpromptError):
    """The server does not implement this method (yet)."""


class CancelledError(SoftpromptError):
    """The call was cancelled."""


class InternalError(SoftpromptError):
    """The server failed unexpectedly; its logs say more."""


# The single place that decides which class a status code becomes; codes not listed (UNKNOWN,
# ALREADY_EXISTS, ...) are raised as the base SoftpromptError.
_ERROR_CLASSES: dict[grpc.StatusCode, type[SoftpromptError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def error_class(code: grpc.StatusCode) -> type[SoftpromptError]:
    """Returns the error class raised for a status code."""
    return _ERROR_CLASSES.get(code, SoftpromptError)


# The initial-metadata key under which the server returns a call's request id.
REQUEST_ID_KEY = "x-request-id"


def from_rpc_error(e: grpc.RpcError, rpc: str = "") -> SoftpromptError:
    """Converts a failed gRPC call (sync or asyncio) of `rpc` ("Service/Method") into the matching typed error."""
    # A bare grpc.RpcError need not be a grpc.Call; only failed calls carry code() and details().
    code_fn = getattr(e, "code", None)
    details_fn = getattr(e, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    error = error_class(code)(code, details or "(no details from the server)", rpc=rpc, request_id=_request_id(e))
    if isinstance(error, ResourceExhaustedError):
        error.retry_after = _retry_after(e)
    return error


def _metadata_value(e: grpc.RpcError, which: str, key: str) -> str | bytes | None:
    """The value of `key` in a failed call's `which` metadata ("initial_metadata" or "trailing_metadata"), if sent."""
    metadata_fn = getattr(e, which, None)
    try:
        metadata = metadata_fn() if callable(metadata_fn) else None
    except Exception:  # noqa: BLE001 - a call that never started may refuse to say
        return None
    return next((value for k, value in metadata or () if k == key), None)


def _retry_after(e: grpc.RpcError) -> float | None:
    """The `retry-after` trailing metadata (seconds) of a refused call, if the server sent one."""
    value = _metadata_value(e, "trailing_metadata", "retry-after")
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _request_id(e: grpc.RpcError) -> str | None:
    """The request id the server sent in the failed call's initial metadata; None if it sent none."""
    value = _metadata_value(e, "initial_metadata", REQUEST_ID_KEY)
    return value if isinstance(value, str) else None
