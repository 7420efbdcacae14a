"""The OpenAI-compatible endpoints: each turns a request body into service calls and the answer into a response
model (`responses`), sent as JSON or as server-sent events.

Requests go through the same services (and so the same admission, scheduler and batches) as gRPC. The
`model` is resolved once to the exact version, and that version is what every generation of the request
runs. A generation is admitted before the response starts, so a bad request gets its error status, never
a 200 stream with an error inside; an error after the first streamed chunk is sent as a last
`data: {"error": ...}` event, as vLLM does. A client that disconnects cancels its requests: the scheduler
frees their rows at its next step. Answers are awaited on the event loop (`generations`, `streams`): no
thread waits on a generation, however many are open.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from softprompt.server.access.tokens import TokenTable
from softprompt.server.core.types import ClassifyRequest as ServiceClassify
from softprompt.server.core.types import GenerationRequest, StreamChunk
from softprompt.server.http_api import models, responses
from softprompt.server.http_api.auth import Authenticate, Caller
from softprompt.server.http_api.generations import Generations, finish, total_usage, usage_of
from softprompt.server.http_api.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ClassifyResponse,
    Completion,
    CompletionChoice,
    ErrorResponse,
    Model,
    ModelList,
)
from softprompt.server.http_api.schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, unsupported
from softprompt.server.http_api.streams import unless_disconnected
from softprompt.server.service.api import Services

# Every error has OpenAI's shape; ranges rather than codes, which also keeps FastAPI from promising a 422 this
# API never sends (its validation errors are 400).
_ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "400 a bad body or parameter, 401 no valid token, 403 a model "
                                                   "the token may not use, 404 no such model, 429 the queue is full "
                                                   "(retry after Retry-After seconds)"},
    "5XX": {"model": ErrorResponse, "description": "503 the server is shutting down, 504 the deadline passed, "
                                                   "500 a bug (the server log has the details)"},
}


def api_router(services: Services, tokens: TokenTable | None) -> APIRouter:
    """The routes over one server's services, authenticating with `tokens` (None: no authentication)."""
    router = APIRouter(prefix="/v1", responses=_ERRORS)
    authenticated = Depends(Authenticate(tokens))
    generations = Generations(services.inference)
    started = int(time.time())

    @router.get("/models", response_model=ModelList)
    async def list_models(caller: Caller = authenticated) -> ModelList:
        """Every model id the caller may use."""
        return ModelList(data=await run_in_threadpool(models.model_objects, services, caller, started))

    @router.get("/models/{model:path}", response_model=Model)
    async def get_model(model: str, caller: Caller = authenticated) -> Model:
        """One model object; 404 like a request naming it would get."""
        return await run_in_threadpool(models.model_object, services, caller, model, started)

    @router.post("/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request, caller: Caller = authenticated) -> Any:
        """One choice per prompt. With `stream: true`, server-sent events of this shape (`usage` on the last, with
        `stream_options.include_usage`), then `data: [DONE]`."""
        unsupported(body.model_extra)
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        options = body.decoding()
        handles = await generations.submit([GenerationRequest(ref, p, options) for p in body.prompts])
        version = handles[0].prompt_version or None
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[CompletionChoice], usage: responses.Usage | None = None) -> Completion:
            return Completion(id=rid, created=created, model=body.model, choices=choices, system_fingerprint=version,
                              usage=usage)

        def piece(index: int, c: StreamChunk) -> Completion:
            return chunk([CompletionChoice(index=index, text=c.text, finish_reason=finish(c.finish_reason))])

        if body.stream:
            return generations.sse(handles, "/v1/completions", body.include_usage, piece,
                                   lambda usage: chunk([], usage))
        results = await unless_disconnected(request, generations.results(handles, "/v1/completions"))
        return chunk([CompletionChoice(index=i, text=r.text, finish_reason=finish(r.finish_reason))
                      for i, r in enumerate(results)], total_usage([r.usage for r in results]))

    @router.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller = authenticated) -> Any:
        """The messages through the model's chat template. With `stream: true`, server-sent events of
        `chat.completion.chunk` objects (the first with the role, each next with a `delta`), then `data: [DONE]`."""
        unsupported(body.model_extra)
        for m in body.messages:
            unsupported(m.model_extra)
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        handles = await generations.submit([GenerationRequest(ref, "", body.decoding(), messages=body.turns)])
        version = handles[0].prompt_version or None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[ChatChunkChoice], usage: responses.Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=body.model, choices=choices,
                                       system_fingerprint=version, usage=usage)

        def piece(index: int, c: StreamChunk) -> ChatCompletionChunk:
            delta = ChatDelta(content=c.text or None)
            return chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=finish(c.finish_reason))])

        if body.stream:
            first = chunk([ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""))])
            return generations.sse(handles, "/v1/chat/completions", body.include_usage, piece,
                                   lambda usage: chunk([], usage), first=first)
        (result,) = await unless_disconnected(request, generations.results(handles, "/v1/chat/completions"))
        return ChatCompletion(id=rid, created=created, model=body.model, system_fingerprint=version,
                              choices=[ChatChoice(index=0, message=ChatMessage(content=result.text),
                                                  finish_reason=finish(result.finish_reason))],
                              usage=usage_of(result.usage))

    @router.post("/classify", response_model=ClassifyResponse)
    async def classify(body: ClassifyRequest, request: Request, caller: Caller = authenticated) -> ClassifyResponse:
        """Each input's most likely label among `labels`, with every label's probability."""
        unsupported(body.model_extra)
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        results = await unless_disconnected(request, generations.classify(
            [ServiceClassify(ref, text, tuple(body.labels), body.apply_chat_template) for text in body.inputs]))
        prompt_tokens = sum(r.input_tokens for r in results)
        return ClassifyResponse(
            id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
            system_fingerprint=results[0].prompt_version or None,
            data=[responses.Classification(
                index=i, label=r.label, probs=[s.probability for s in r.scores], num_classes=len(r.scores),
                scores=[responses.LabelScore(label=s.label, logprob=s.logprob, probability=s.probability,
                                             num_tokens=s.num_tokens) for s in r.scores])
                for i, r in enumerate(results)],
            usage=responses.ClassifyUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))

    return router
