"""The generations of one HTTP request: admitted together, then read back whole or as server-sent events,
awaited on the event loop (`streams`) so that no thread waits on them; their usage and finish reasons in
OpenAI's terms. Classify requests are admitted and awaited the same way.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from softprompt.prompts.outcomes import FinishReason
from softprompt.server.core.errors import InvalidRequestError
from softprompt.server.core.handle import Handle
from softprompt.server.core.types import (
    ClassifyRequest,
    ClassifyResult,
    GenerationRequest,
    GenerationResult,
    StreamChunk,
    Usage,
)
from softprompt.server.http_api import responses
from softprompt.server.http_api.errors import for_exception, in_callers_terms
from softprompt.server.http_api.streams import merged
from softprompt.server.service.api import Inference

TRANSPORT = "http"
DONE = "[DONE]"
# OpenAI has two finish reasons for text: a stop sequence and end-of-sequence are both "stop".
_FINISH: dict[FinishReason, responses.Finish] = {FinishReason.EOS: "stop", FinishReason.STOP: "stop",
                                                 FinishReason.LENGTH: "length"}


def finish(reason: FinishReason | None) -> responses.Finish | None:
    """OpenAI's finish reason (None: not finished yet)."""
    return None if reason is None else _FINISH[reason]


def usage_of(u: Usage) -> responses.Usage:
    """One generation's token counts."""
    return responses.Usage(prompt_tokens=u.input_tokens, completion_tokens=u.generated_tokens,
                           total_tokens=u.input_tokens + u.generated_tokens, virtual_tokens=u.virtual_tokens)


def total_usage(usages: list[Usage]) -> responses.Usage:
    """The token counts of a request's generations together (their prompt is the same: its virtual tokens once)."""
    return usage_of(Usage(sum(u.input_tokens for u in usages), max((u.virtual_tokens for u in usages), default=0),
                          sum(u.generated_tokens for u in usages)))


class Generations:
    """Admits a request's generations (or Classify requests) together and reads them back, whole or as
    server-sent events, cancelling them all when the reading stops early."""

    def __init__(self, inference: Inference) -> None:
        self.inference = inference

    async def submit(self, requests: list[GenerationRequest], fields: Mapping[str, str]) -> list[Handle]:
        """Admits and queues every request (so they share batches); if one is refused, cancels the others.

        `fields` maps the service's field names to the body's (`max_new_tokens` -> `max_tokens`): a refused field
        is named as the caller sent it.
        """
        handles: list[Handle] = []
        try:
            for r in requests:  # admission tokenizes: on a worker thread, not the event loop
                handles.append(await run_in_threadpool(self.inference.generate, r))
        except BaseException as exc:
            for h in handles:
                h.cancel()
            if isinstance(exc, InvalidRequestError):
                raise in_callers_terms(exc, fields) from None
            raise
        return handles

    def _reader(self, endpoint: str) -> Callable[[Handle], AsyncIterator[StreamChunk]]:
        started = time.monotonic()
        return lambda h: self.inference.astream(h, endpoint, started, TRANSPORT)

    async def results(self, handles: list[Handle], endpoint: str) -> list[GenerationResult]:
        """Every generation whole, in order; raises the first error of any."""
        chunks: list[list[StreamChunk]] = [[] for _ in handles]
        async for index, chunk in merged(handles, self._reader(endpoint)):
            chunks[index].append(chunk)
        return [GenerationResult.from_chunks(c) for c in chunks]

    def sse(self, handles: list[Handle], endpoint: str, include_usage: bool,
            piece: Callable[[int, StreamChunk], BaseModel], last: Callable[[responses.Usage], BaseModel],
            first: BaseModel | None = None) -> EventSourceResponse:
        """The chunks as server-sent events (`piece` makes one from a generation's chunk; `first` goes before,
        `last` with the usage after when `include_usage`), `data: [DONE]` last."""
        reader = self._reader(endpoint)

        def event(payload: BaseModel) -> dict[str, str]:
            # `usage` is there (null until the last chunk) only when the request asked for it, as OpenAI does.
            return {"data": payload.model_dump_json(exclude=None if include_usage else {"usage"})}

        async def events() -> AsyncIterator[dict[str, str]]:
            usages: list[Usage] = []
            try:
                if first is not None:
                    yield event(first)
                async for index, chunk in merged(handles, reader):
                    if chunk.usage is not None:
                        usages.append(chunk.usage)
                    yield event(piece(index, chunk))
                if include_usage:
                    yield event(last(total_usage(usages)))
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                yield {"data": for_exception(exc).body.decode()}
                return
            finally:  # also when the client leaves before `merged` started, which cancels them otherwise
                for handle in handles:
                    handle.cancel()
            yield {"data": DONE}

        return EventSourceResponse(events(), ping=15)

    async def classify(self, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
        """Admits and queues every Classify request, then awaits their results; cancelled, it cancels them all."""
        pending = []
        try:
            for r in requests:
                pending.append(await run_in_threadpool(self.inference.classify, r))
            return [await p.aresult() for p in pending]
        except BaseException:
            for p in pending:
                p.cancel()
            raise
