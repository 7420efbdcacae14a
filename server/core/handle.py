"""The caller's side of a queued generation: its chunks as the worker produces them, read blocking or from asyncio.

Torch-free, so a transport holds handles without importing the engine. The worker thread puts each
step's chunk (or the request's error) here; a gRPC servicer thread reads them blocking (`chunks`), an
asyncio transport awaits them (`stream`) without holding a thread: the worker wakes the awaiting
event loop with `call_soon_threadsafe`, only when a reader is actually waiting.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TypeAlias

from softprompt.server.core.types import GenerationResult, StreamChunk


@dataclass(frozen=True)
class Failed:
    """The request ended with this error (the worker's last event for it)."""

    error: BaseException


Event: TypeAlias = "StreamChunk | Failed"


class Handle:
    """A queued generation: read its chunks (blocking or async), or cancel it.

    One reader at a time: chunks are consumed as they are read.
    """

    def __init__(self, request_id: int, prompt_version: str,
                 withdraw: Callable[[Handle], None] | None = None) -> None:
        self.request_id = request_id
        self.prompt_version = prompt_version  # the version that runs ("name@3"; "" for the bare model)
        self.queued_at = time.monotonic()
        self.started_at: float | None = None  # when the worker first took it into a prefill
        self.cancelled = threading.Event()
        self._withdraw = withdraw
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._events: deque[Event] = deque()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def cancel(self) -> None:
        """Drops the request: at once if it is still queued, else at the worker's next step (the client went away)."""
        self.cancelled.set()
        if self._withdraw is not None:
            self._withdraw(self)

    def chunks(self) -> Iterator[StreamChunk]:
        """Yields chunks as tokens are produced, blocking between them; the last has finish_reason.
        Raises the request's error."""
        while True:
            with self._arrived:
                while not self._events:
                    self._arrived.wait()
                event = self._events.popleft()
            chunk = _chunk(event)
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def stream(self) -> AsyncIterator[StreamChunk]:
        """The same chunks for asyncio, awaited without a thread. Raises the request's error."""
        while True:
            chunk = _chunk(await self._next_async())
            yield chunk
            if chunk.finish_reason is not None:
                return

    def result(self) -> GenerationResult:
        """Waits for the whole generation."""
        return GenerationResult.from_chunks(self.chunks())

    async def aresult(self) -> GenerationResult:
        """Awaits the whole generation."""
        return GenerationResult.from_chunks([chunk async for chunk in self.stream()])

    @property
    def queue_wait(self) -> float | None:
        """Seconds it waited before the worker first took it (None: not taken yet)."""
        return None if self.started_at is None else self.started_at - self.queued_at

    def mark_started(self, now: float) -> None:
        """Called by the worker when the request first joins a prefill (a resumed row keeps its first time)."""
        if self.started_at is None:
            self.started_at = now

    def put(self, event: Event) -> None:
        """Called by the worker: hands the reader a chunk, or the request's error."""
        with self._lock:
            self._events.append(event)
            self._arrived.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_wake, future)
            except RuntimeError:  # the reader's loop closed: nobody is left to read
                pass

    async def _next_async(self) -> Event:
        while True:
            with self._lock:
                if self._events:
                    return self._events.popleft()
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._waiter = (loop, future)
            await future


def _chunk(event: Event) -> StreamChunk:
    """The event's chunk; raises the request's error if it failed."""
    if isinstance(event, Failed):
        raise event.error
    return event


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
