"""Reading generations from asyncio without holding threads, and noticing a client that leaves.

A handle's chunks are awaited (`Handle.stream`, through the service's `astream` for metrics): the
scheduler's worker wakes the event loop when a chunk arrives, so an open stream costs a task on the
loop, not a thread, however many are open. `merged` interleaves the chunks of several generations (a
completion with a list of prompts) as they arrive, each tagged with its index; whoever stops reading
early (the client went away, an error) cancels every handle, so the scheduler frees their rows at its
next step. `unless_disconnected` runs a whole (non-streamed) answer and cancels it if the client leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

from starlette.requests import Request

from softprompt.server.core.handle import Handle
from softprompt.server.core.types import StreamChunk
from softprompt.server.http_api.errors import ApiError

T = TypeVar("T")
_ENDED = None  # what a reader queues when its generation ended


async def merged(handles: Sequence[Handle], read: Callable[[Handle], AsyncIterator[StreamChunk]]
                 ) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(index, chunk) of every handle's chunks, in arrival order; raises the first error any of them raises.

    `read` turns a handle into its chunks (the service's `astream`, which records metrics); each handle is
    read by a task of this event loop.
    """
    queue: asyncio.Queue[tuple[int, StreamChunk | Exception | None]] = asyncio.Queue()

    async def pump(index: int, handle: Handle) -> None:
        try:
            async for chunk in read(handle):
                queue.put_nowait((index, chunk))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who raises it
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, _ENDED))

    readers = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            index, item = await queue.get()
            if item is _ENDED:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for handle in handles:
            handle.cancel()  # a no-op for a finished request; frees the row of one still running
        for reader in readers:
            reader.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; if the client disconnects first, `work` is cancelled and 499 raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client left, or this request itself is being cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task  # lets `work` clean up (cancel its handles) before the answer goes
    if task.cancelled():
        raise ApiError(499, "the client disconnected before the answer was ready", code="cancelled")
    return task.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body is read: all that can still arrive is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
