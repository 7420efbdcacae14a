"""The blocking client for the softprompt gRPC server.

Its methods are the ones `BaseClient` shares with `softprompt.client.aio.AsyncClient` (each defined once, in
`softprompt.client.calls`); this class opens a blocking channel and runs each prepared call to its result,
raising every gRPC failure as a typed `SoftpromptError`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from contextlib import closing
from types import TracebackType
from typing import Any, TypeVar

import grpc

from softprompt.client.base import DEFAULT_TARGET, BaseClient
from softprompt.client.calls import Paged, Streaming, Unary, Until
from softprompt.client.errors import from_rpc_error

__all__ = ["Client", "DEFAULT_TARGET"]

R = TypeVar("R")


class Client(BaseClient[grpc.Channel]):
    """A blocking client for the Inference, Registry and Training services.

    Example:
        >>> with Client("localhost:50051", timeout=30) as client:
        ...     print(client.generate("sentiment@prod", "I loved it", max_new_tokens=20).text)

    Arguments: see `BaseClient` (target, then keywords timeout, options, credentials, token, tls,
    route_by_task).
    """

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None,
                 options: list[tuple[str, Any]]) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _result(self, call: Unary[R] | Until[R]) -> R:
        if isinstance(call, Until):
            with closing(self._stream(call.watch)) as items:
                for item in items:
                    if call.done(item):
                        return item
            call = call.fallback
        method, kwargs = self._invocation(call)
        try:
            return call.response(method(call.request, **kwargs))
        except grpc.RpcError as e:
            raise from_rpc_error(e, call.rpc.name) from None

    def _items(self, call: Streaming[R] | Paged[R]) -> Iterator[R]:
        return self._pages(call) if isinstance(call, Paged) else self._stream(call)

    def _all(self, call: Paged[R]) -> list[R]:
        return list(self._pages(call))

    def _pages(self, call: Paged[R]) -> Iterator[R]:
        token = ""
        while True:
            items, token = self._result(call.page(token))
            yield from items
            if not token:
                return

    def _stream(self, call: Streaming[R]) -> Generator[R, None, None]:
        method, kwargs = self._invocation(call)
        responses = method(call.request, **kwargs)
        try:
            for message in responses:
                yield call.response(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e, call.rpc.name) from None
        finally:
            responses.cancel()  # frees the server's slot when the caller stops early; no-op when done
