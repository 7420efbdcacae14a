"""Reading a generation's chunks from asyncio: the scheduler's handles block, so a thread reads each.

`merged` interleaves the chunks of several generations (a completion with a list of prompts) as
they arrive, each tagged with its index. Whoever stops reading early (the client went away, an
error) cancels every handle, so the scheduler frees their rows at its next step.

A reader holds its thread for the whole generation, so readers get an executor of their own, sized
for every request the server may hold at once (the running batch and the queue): on anyio's shared
pool of 40 threads, the 41st stream would wait for another to end before its first token, and
admission, which also runs there, would wait with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor

from softprompt.server.core.handle import Handle
from softprompt.server.core.types import StreamChunk

_END = object()


async def merged(handles: list[Handle], read: Callable[[Handle], Iterator[StreamChunk]], readers: Executor
                 ) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(index, chunk) of every handle's chunks, in arrival order; raises the first error any of them raises.

    `read` turns a handle into its chunk iterator (the service's `stream`, which records metrics); each
    handle is read on a thread of `readers`.
    """
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def pump(index: int, handle: Handle) -> None:
        try:
            for chunk in read(handle):
                loop.call_soon_threadsafe(queue.put_nowait, (index, chunk))
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            loop.call_soon_threadsafe(queue.put_nowait, (index, exc))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, (index, _END))

    workers = [loop.run_in_executor(readers, pump, i, h) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            index, item = await queue.get()
            if item is _END:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                assert isinstance(item, StreamChunk)
                yield index, item
    finally:
        for handle in handles:
            handle.cancel()  # a no-op for a finished request; frees the row of one still running
        for worker in workers:  # each ends once the scheduler drops its row; nobody needs to wait here
            worker.add_done_callback(lambda f: f.cancelled() or f.exception())
