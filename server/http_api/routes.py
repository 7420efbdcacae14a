"""The OpenAI-compatible endpoints: each turns a request body into service calls and the answer into JSON or SSE.

Requests go through the same services (and so the same admission, scheduler and batches) as gRPC.
A generation is admitted before the response starts, so a bad request gets its error status, never a
200 stream with an error inside; an error after the first streamed chunk is sent as a last
`data: {"error": ...}` event, as vLLM does. A client that disconnects cancels its requests: the
scheduler frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any

from fastapi import APIRouter, Header, Request
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from softprompt.prompts.outcomes import FinishReason
from softprompt.server.access.tokens import TokenTable
from softprompt.server.core.handle import Handle
from softprompt.server.core.types import ClassifyRequest as ServiceClassify
from softprompt.server.core.types import GenerationRequest, GenerationResult, StreamChunk, Usage
from softprompt.server.http_api import models
from softprompt.server.http_api.auth import Caller, authenticate
from softprompt.server.http_api.errors import ApiError, for_exception
from softprompt.server.http_api.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    unsupported,
)
from softprompt.server.http_api.streams import merged
from softprompt.server.service import Services

TRANSPORT = "http"
DONE = "[DONE]"
# OpenAI has two finish reasons for text: a stop sequence and end-of-sequence are both "stop".
_FINISH = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}
_DISCONNECT_POLL_S = 0.1


def _usage(usage: Usage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    return {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.generated_tokens,
            "total_tokens": usage.input_tokens + usage.generated_tokens,
            # Not OpenAI's: the soft prompt's virtual tokens, which run before the prompt's tokens.
            "virtual_tokens": usage.virtual_tokens}


def _sum_usage(usages: list[Usage]) -> dict[str, Any]:
    return _usage(Usage(sum(u.input_tokens for u in usages), max((u.virtual_tokens for u in usages), default=0),
                        sum(u.generated_tokens for u in usages))) or {}


class Api:
    """The routes, bound to one server's services and token table."""

    def __init__(self, services: Services, tokens: TokenTable | None, readers: Executor) -> None:
        self.services = services
        self.tokens = tokens
        self.readers = readers  # one thread per generation being streamed (see `streams`)
        self.started = int(time.time())
        self.router = APIRouter()
        r = self.router
        r.add_api_route("/v1/models", self.list_models, methods=["GET"])
        r.add_api_route("/v1/models/{model:path}", self.get_model, methods=["GET"])
        r.add_api_route("/v1/completions", self.completions, methods=["POST"], response_model=None)
        r.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"], response_model=None)
        r.add_api_route("/v1/classify", self.classify, methods=["POST"], response_model=None)

    def _caller(self, authorization: str | None) -> Caller:
        return authenticate(self.tokens, authorization)

    # ------------------------------------------------------------------ models

    async def list_models(self, authorization: str | None = Header(None)) -> dict[str, Any]:
        """Every model id the caller may use."""
        caller = self._caller(authorization)
        data = await run_in_threadpool(models.model_objects, self.services, caller, self.started)
        return {"object": "list", "data": data}

    async def get_model(self, model: str, authorization: str | None = Header(None)) -> dict[str, Any]:
        """One model object; 404 like a request naming it would get."""
        caller = self._caller(authorization)
        await run_in_threadpool(models.task_of, self.services, caller, model)
        found = [m for m in await run_in_threadpool(models.model_objects, self.services, caller, self.started)
                 if m["id"] == model]
        return found[0]

    # ------------------------------------------------------------------ generation

    async def completions(self, body: CompletionRequest, request: Request,
                          authorization: str | None = Header(None)) -> Any:
        """`/v1/completions`: one choice per prompt."""
        unsupported(body.model_extra)
        task = await self._task(body.model, authorization)
        options = body.decoding()
        requests = [GenerationRequest(task, p, options) for p in body.prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        head = {"id": rid, "object": "text_completion", "created": created, "model": body.model, "choices": [],
                "system_fingerprint": None}

        def choice(index: int, text: str, finish: FinishReason | None) -> dict[str, Any]:
            return {"index": index, "text": text, "logprobs": None,
                    "finish_reason": None if finish is None else _FINISH[finish]}

        handles = await self._submit(requests)
        if body.stream:
            return self._sse(request, handles, "/v1/completions", body.include_usage, head,
                             lambda i, c: [choice(i, c.text, c.finish_reason)], first=None)
        results = await self._results(request, handles, "/v1/completions")
        return {**head, "choices": [choice(i, r.text, r.finish_reason) for i, r in enumerate(results)],
                "system_fingerprint": results[0].prompt_version or None,
                "usage": _sum_usage([r.usage for r in results])}

    async def chat_completions(self, body: ChatCompletionRequest, request: Request,
                               authorization: str | None = Header(None)) -> Any:
        """`/v1/chat/completions`: the messages through the model's chat template."""
        unsupported(body.model_extra)
        for m in body.messages:
            unsupported({k: v for k, v in (m.model_extra or {}).items()})
        task = await self._task(body.model, authorization)
        handles = await self._submit([GenerationRequest(task, "", body.decoding(), messages=body.turns)])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [], "system_fingerprint": None}

        def delta(index: int, chunk: StreamChunk) -> list[dict[str, Any]]:
            finish = None if chunk.finish_reason is None else _FINISH[chunk.finish_reason]
            return [{"index": index, "delta": {"content": chunk.text} if chunk.text else {}, "logprobs": None,
                     "finish_reason": finish}]

        if body.stream:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            return self._sse(request, handles, "/v1/chat/completions", body.include_usage, head, delta, first=first)
        (result,) = await self._results(request, handles, "/v1/chat/completions")
        return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                "system_fingerprint": result.prompt_version or None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": _FINISH[result.finish_reason]}],
                "usage": _usage(result.usage)}

    async def _task(self, model: str, authorization: str | None) -> str:
        caller = self._caller(authorization)
        return await run_in_threadpool(models.task_of, self.services, caller, model)

    async def _submit(self, requests: list[GenerationRequest]) -> list[Handle]:
        """Admits and queues every request (so they share batches); if one is refused, cancels the others."""
        handles: list[Handle] = []
        try:
            for r in requests:
                handles.append(await run_in_threadpool(self.services.inference.generate, r))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def _reader(self, endpoint: str) -> Callable[[Handle], Any]:
        started = time.monotonic()
        return lambda h: self.services.inference.stream(h, endpoint, started, transport=TRANSPORT)

    async def _results(self, request: Request, handles: list[Handle], endpoint: str) -> list[GenerationResult]:
        """Every generation whole; a client that disconnects meanwhile cancels them."""
        chunks: list[list[StreamChunk]] = [[] for _ in handles]
        reading = asyncio.ensure_future(self._collect(merged(handles, self._reader(endpoint), self.readers), chunks))
        while not (await asyncio.wait([reading], timeout=_DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                reading.cancel()  # merged's cleanup cancels the handles
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
                raise ApiError(499, "the client disconnected before the answer was ready", code="cancelled")
        reading.result()  # the first error of any generation
        return [GenerationResult.from_chunks(c) for c in chunks]

    @staticmethod
    async def _collect(source: AsyncIterator[tuple[int, StreamChunk]], into: list[list[StreamChunk]]) -> None:
        async for index, chunk in source:
            into[index].append(chunk)

    def _sse(self, request: Request, handles: list[Handle], endpoint: str, include_usage: bool,
             head: dict[str, Any], choices: Callable[[int, StreamChunk], list[dict[str, Any]]],
             first: dict[str, Any] | None) -> EventSourceResponse:
        """The chunks as server-sent events, `data: [DONE]` last."""
        reader = self._reader(endpoint)

        async def events() -> AsyncIterator[dict[str, str]]:
            usages: list[Usage] = []
            try:
                if first is not None:
                    yield _event({**head, "choices": [first], **({"usage": None} if include_usage else {})})
                async for index, chunk in merged(handles, reader, self.readers):
                    if chunk.usage is not None:
                        usages.append(chunk.usage)
                    out = {**head, "choices": choices(index, chunk),
                           "system_fingerprint": chunk.prompt_version or None}
                    if include_usage:
                        out["usage"] = None
                    yield _event(out)
                if include_usage:
                    yield _event({**head, "usage": _sum_usage(usages)})
            except Exception as exc:  # noqa: BLE001 - the status line is sent: the error goes in the stream
                response = for_exception(exc)
                yield {"data": response.body.decode()}
                return
            yield {"data": DONE}

        return EventSourceResponse(events(), ping=15)

    # ------------------------------------------------------------------ classification

    async def classify(self, body: ClassifyRequest, request: Request,
                       authorization: str | None = Header(None)) -> Any:
        """`/v1/classify`: each input's most likely label among `labels`, with every label's probability."""
        unsupported(body.model_extra)
        task = await self._task(body.model, authorization)
        inference = self.services.inference
        pending = []
        try:
            for text in body.inputs:
                pending.append(await run_in_threadpool(
                    inference.classify, ServiceClassify(task, text, tuple(body.labels), body.apply_chat_template)))
            results = [await run_in_threadpool(p.result) for p in pending]
        except BaseException:
            for p in pending:
                p.cancel()
            raise
        prompt_tokens = sum(r.input_tokens for r in results)
        return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": body.model, "system_fingerprint": results[0].prompt_version or None,
                "data": [{"index": i, "label": r.label, "probs": [s.probability for s in r.scores],
                          "num_classes": len(r.scores),
                          "scores": [{"label": s.label, "logprob": s.logprob, "probability": s.probability,
                                      "num_tokens": s.num_tokens} for s in r.scores]}
                         for i, r in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload, separators=(",", ":"))}
