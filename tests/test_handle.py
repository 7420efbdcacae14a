"""A generation's handle: the worker thread puts chunks, a blocking reader and an asyncio reader get them in order."""

from __future__ import annotations

import asyncio
import threading

import pytest

from softprompt.prompts.outcomes import FinishReason
from softprompt.server.core.errors import DeadlineError
from softprompt.server.core.handle import Failed, Handle
from softprompt.server.core.types import StreamChunk, Usage

USAGE = Usage(3, 0, 3)


def _chunks() -> list[StreamChunk]:
    return [StreamChunk("a", (1,), "t@1"), StreamChunk("b", (2,), "t@1"),
            StreamChunk("c", (3,), "t@1", FinishReason.LENGTH, USAGE)]


def _feed(handle: Handle, events: list, started: threading.Event | None = None) -> threading.Thread:
    """A worker thread putting `events` once `started` is set (or at once)."""
    def run() -> None:
        if started is not None:
            started.wait(30)
        for event in events:
            handle.put(event)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_blocking_reader_gets_every_chunk_then_stops_at_the_finish():
    handle = Handle(7, "t@1")
    _feed(handle, _chunks()).join()
    handle.put(StreamChunk("never read", (9,), "t@1"))  # after the finish: not part of this generation
    result = handle.result()
    assert (result.text, result.token_ids, result.finish_reason) == ("abc", (1, 2, 3), FinishReason.LENGTH)


def test_an_asyncio_reader_is_woken_by_the_worker_thread_without_a_thread_of_its_own():
    handle = Handle(7, "t@1")
    started = threading.Event()

    async def read() -> list[str]:
        texts = []
        threads = threading.active_count()
        started.set()  # the worker puts only once the reader is waiting
        async for chunk in handle.stream():
            texts.append(chunk.text)
            assert threading.active_count() <= threads  # nothing started a reader thread
        return texts

    worker = _feed(handle, _chunks(), started)
    assert asyncio.run(read()) == ["a", "b", "c"]
    worker.join()


def test_both_readers_raise_the_requests_error():
    error = DeadlineError("deadline exceeded")
    blocking, awaited = Handle(1, ""), Handle(2, "")
    for handle in (blocking, awaited):
        handle.put(StreamChunk("a", (1,), ""))
        handle.put(Failed(error))
    with pytest.raises(DeadlineError):
        blocking.result()
    with pytest.raises(DeadlineError):
        asyncio.run(awaited.aresult())


def test_a_closed_event_loop_does_not_break_the_worker():
    handle = Handle(1, "")
    loop = asyncio.new_event_loop()
    reader = loop.create_task(handle.aresult())
    loop.run_until_complete(asyncio.sleep(0))  # the reader now waits on its future
    reader.cancel()
    loop.run_until_complete(asyncio.gather(reader, return_exceptions=True))
    loop.close()
    _feed(handle, _chunks()).join()  # a put would wake the closed loop: it must not raise in the worker
    assert handle.result().text == "abc"


def test_cancel_withdraws_the_request():
    withdrawn: list[Handle] = []
    handle = Handle(1, "", withdrawn.append)
    handle.cancel()
    assert handle.cancelled.is_set() and withdrawn == [handle]
