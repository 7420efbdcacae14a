"""Rebuilding a gRPC method handler around new behaviour: what every interceptor here needs.

A handler is one of four kinds (request and response each streamed or not); a rebuilt one keeps the
kind and the response serializer and takes the behaviour and request deserializer it is given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function the handler runs for a call."""
    return getattr(handler, _KINDS[(handler.request_streaming, handler.response_streaming)][0])


def rebuild(handler: grpc.RpcMethodHandler, run: Callable[..., Any],
            request_deserializer: Callable[[bytes], Any] | None) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind and response type that runs `run` on requests decoded by
    `request_deserializer` (None: the raw bytes)."""
    factory = _KINDS[(handler.request_streaming, handler.response_streaming)][1]
    return factory(run, request_deserializer=request_deserializer, response_serializer=handler.response_serializer)
