"""One gRPC interceptor for every service: a request id per RPC, and each RPC's status and duration recorded.

The id is the client's `x-request-id` metadata when it is a sane token, else a fresh one; it goes
back to the client as initial metadata and is set in `logs.REQUEST_ID` while the handler runs, so
the servicers' log lines carry it. Status codes set by `context.abort` (how `service.py` reports
every error) are read back from the context. A stream is counted when it ends; one the client
abandons mid-way is counted by the RPC's done-callback instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from softprompt.server.grpc_api.interceptors import handlers
from softprompt.server.observability.logs import REQUEST_ID, REQUEST_ID_KEY, request_id
from softprompt.server.observability.metrics import Metrics

log = logging.getLogger(__name__)

def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    """The status the RPC ends with: the one its handler set or aborted with, else `default` while the client
    still waits, else how the client went away (a handler may return normally after that)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if context.is_active():
        return default
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


class _Call:
    """One RPC's outcome, recorded exactly once, whichever thread sees the end first."""

    def __init__(self, metrics: Metrics, method: str, rid: str, context: grpc.ServicerContext) -> None:
        self.metrics = metrics
        self.method = method
        self.rid = rid
        self.started = time.monotonic()
        self._done = False
        self._lock = threading.Lock()
        # Runs when the RPC ends; only does something when the handler never finished (the client left).
        if not context.add_callback(lambda: self.finish(_code(context, grpc.StatusCode.CANCELLED))):
            self.finish(_code(context, grpc.StatusCode.CANCELLED))  # the client was gone before the handler started
        context.send_initial_metadata(((REQUEST_ID_KEY, rid),))

    def finish(self, code: grpc.StatusCode) -> None:
        """Records the RPC's status, duration and log line, the first time only."""
        with self._lock:
            if self._done:
                return
            self._done = True
        seconds = time.monotonic() - self.started
        self.metrics.rpc_done(self.method, code.name, seconds)
        # Successful RPCs (health checks included) would flood INFO; the servicers log their own summaries.
        level = logging.DEBUG if code == grpc.StatusCode.OK else logging.INFO
        log.log(level, "rpc=%s code=%s ms=%.0f", self.method.lstrip("/"), code.name, seconds * 1000,
                extra={"request_id": self.rid})


class ObservingInterceptor(grpc.ServerInterceptor):
    """Request ids and per-RPC metrics for every method of every service. Put it first: it then also
    sees the status of RPCs that later interceptors (authentication) refuse."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        method = handler_call_details.method
        rid = request_id(handler_call_details.invocation_metadata)
        wrap = self._streaming if handler.response_streaming else self._unary
        return handlers.rebuild(handler, wrap(handlers.behaviour(handler), method, rid), handler.request_deserializer)

    def _unary(self, behavior: Callable[[Any, grpc.ServicerContext], Any], method: str,
               rid: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(self.metrics, method, rid, context)
            token = REQUEST_ID.set(rid)
            try:
                response = behavior(request, context)
            except BaseException:
                call.finish(_code(context, grpc.StatusCode.UNKNOWN))
                raise
            finally:
                REQUEST_ID.reset(token)
            call.finish(_code(context, grpc.StatusCode.OK))
            return response
        return run

    def _streaming(self, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str,
                   rid: str) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(self.metrics, method, rid, context)
            responses: Iterator[Any] | None = None
            while True:
                # Set around each step, not across yields: between two responses this thread is gRPC's.
                token = REQUEST_ID.set(rid)
                try:
                    if responses is None:
                        responses = iter(behavior(request, context))
                    response = next(responses)
                except StopIteration:
                    call.finish(_code(context, grpc.StatusCode.OK))
                    return
                except BaseException:
                    call.finish(_code(context, grpc.StatusCode.UNKNOWN))
                    raise
                finally:
                    REQUEST_ID.reset(token)
                yield response
        return run
