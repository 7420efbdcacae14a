"""Requests whose bytes do not decode as their protobuf message get INVALID_ARGUMENT, not INTERNAL.

gRPC Python decodes a request before any servicer code runs and answers a decoding failure with
INTERNAL ("Exception deserializing request!"), which tells a client with a broken encoder (a string
field that is not UTF-8, a truncated message) that the server is at fault. This interceptor swaps each
unary-request method's deserializer for one that returns a marker instead of raising, and answers the
marker with INVALID_ARGUMENT naming the message type and the decoder's complaint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from softprompt.server.grpc_api.interceptors import handlers


class _Undecodable:
    """Stands in for a request that did not decode."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError, or whatever a decoder raises
            return _Undecodable(exc)
    return deserialize


def _refuse(method: str, request: _Undecodable, context: grpc.ServicerContext) -> None:
    message = f"{type(request.error).__name__}: {request.error}"[:200]
    context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request to {method} is not a valid protobuf message of its type ({message}); "
        f"encode it with the softprompt.v1 schema (string fields must be valid UTF-8)",
    )


def _guard(method: str, behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, _Undecodable):
            _refuse(method, request, context)
        return behavior(request, context)
    return handle


class DecodeErrorInterceptor(grpc.ServerInterceptor):
    """Answers undecodable unary requests (every RPC of this server takes one) with INVALID_ARGUMENT."""

    def intercept_service(self, continuation: Callable[[Any], Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        return handlers.rebuild(handler, _guard(handler_call_details.method, handlers.behaviour(handler)),
                                _tolerant(handler.request_deserializer))
