"""The asyncio client for the softprompt gRPC server: `Client`'s twin over grpc.aio, same methods, awaited.

Its methods are the ones `BaseClient` shares with `softprompt.client.client.Client` (each defined once, in
`softprompt.client.calls`); this class opens a grpc.aio channel and awaits each prepared call.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from softprompt.client.base import BaseClient
from softprompt.client.calls import Paged, Streaming, Unary, Until
from softprompt.client.errors import from_rpc_error

__all__ = ["AsyncClient"]

R = TypeVar("R")


class AsyncClient(BaseClient[grpc.aio.Channel]):
    """The asyncio twin of `Client` (over grpc.aio): same methods, awaited; streams are async iterators.

    Create it inside a running event loop. Arguments as for `Client`.

    Example:
        >>> async with AsyncClient("localhost:50051") as client:
        ...     async for chunk in client.stream("sentiment", "I loved it"):
        ...         print(chunk.text, end="")
    """

    def _connect(self, target: str, credentials: grpc.ChannelCredentials | None,
                 options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def close(self) -> None:
        """Closes the channel; in-flight calls are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _result(self, call: Unary[R] | Until[R]) -> R:
        if isinstance(call, Until):
            async with aclosing(self._stream(call.watch)) as items:
                async for item in items:
                    if call.done(item):
                        return item
            call = call.fallback
        method, kwargs = self._invocation(call)
        try:
            return call.response(await method(call.request, **kwargs))
        except grpc.RpcError as e:
            raise from_rpc_error(e, call.rpc.name) from None

    def _items(self, call: Streaming[R] | Paged[R]) -> AsyncIterator[R]:
        return self._pages(call) if isinstance(call, Paged) else self._stream(call)

    async def _all(self, call: Paged[R]) -> list[R]:
        return [item async for item in self._pages(call)]

    async def _pages(self, call: Paged[R]) -> AsyncIterator[R]:
        token = ""
        while True:
            items, token = await self._result(call.page(token))
            for item in items:
                yield item
            if not token:
                return

    async def _stream(self, call: Streaming[R]) -> AsyncGenerator[R, None]:
        method, kwargs = self._invocation(call)
        responses = method(call.request, **kwargs)
        try:
            async for message in responses:
                yield call.response(message)
        except grpc.RpcError as e:
            raise from_rpc_error(e, call.rpc.name) from None
        finally:
            responses.cancel()  # frees the server's slot when the caller stops early; no-op when done
