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

import functools
import json
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from softprompt.server.access.tokens import TokenTable
from softprompt.server.core.types import ClassifyRequest as ServiceClassify
from softprompt.server.core.types import GenerationRequest, StreamChunk
from softprompt.server.http_api import models, openapi, responses
from softprompt.server.http_api.auth import Authenticate, Caller
from softprompt.server.http_api.errors import ApiError
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
    Model,
    ModelList,
)
from softprompt.server.http_api.schemas import ChatCompletionRequest, ClassifyRequest, CompletionRequest, unsupported
from softprompt.server.http_api.streams import unless_disconnected
from softprompt.server.service.api import Services


def api_router(services: Services, tokens: TokenTable | None) -> APIRouter:
    """The routes over one server's services, authenticating with `tokens` (None: no authentication)."""
    router = APIRouter(prefix="/v1")
    authenticated = Depends(Authenticate(tokens))
    generations = Generations(services.inference)
    started = int(time.time())

    @functools.cache
    def max_new_tokens() -> int:
        """The server's --max-new-tokens (fixed for its life: read once)."""
        return services.inference.model_info().limits.max_new_tokens

    @router.get("/models", response_model=ModelList, responses=openapi.errors(openapi.LISTING))
    async def list_models(caller: Caller = authenticated,
                          limit: int | None = Query(None, ge=1, le=models.MAX_LIMIT,
                                                    description=f"ids per page, 1-{models.MAX_LIMIT} (a "
                                                                      "version's ids stay together); without, "
                                                                      "every id at once"),
                          after: str | None = Query(None, description="the last_id of the previous page")) -> Any:
        """Every model id the caller may use, or with `limit` one page of them (`has_more`, `last_id`)."""
        body = await run_in_threadpool(lambda: models.list_models(services, caller, started, limit=limit, after=after))
        # Serialized as it is: 200,000 ids through a response model each would take seconds.
        return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")

    @router.get("/models/{model:path}", response_model=Model, responses=openapi.errors(openapi.LOOKUP))
    async def get_model(model: str, caller: Caller = authenticated) -> Model:
        """One model object; 404 like a request naming it would get."""
        return await run_in_threadpool(models.model_object, services, caller, model, started)

    @router.post("/completions", response_model=Completion,
                 responses=openapi.errors(openapi.GENERATION, stream=True))
    async def completions(body: CompletionRequest, request: Request, caller: Caller = authenticated) -> Any:
        """One choice per prompt. With `stream: true`, server-sent events of this shape (`usage` on the last, with
        `stream_options.include_usage`), then `data: [DONE]`."""
        unsupported(body.model_extra)
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        options = body.decoding()
        handles = await generations.submit([GenerationRequest(ref, p, options, priority=body.priority,
                                                              principal=caller.principal) for p in body.prompts],
                                           {"max_new_tokens": "max_tokens", "input": "prompt"})
        version = handles[0].prompt_version or services.inference.model_id
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

    @router.post("/chat/completions", response_model=ChatCompletion,
                 responses=openapi.errors(openapi.GENERATION, stream=True))
    async def chat_completions(body: ChatCompletionRequest, request: Request, caller: Caller = authenticated) -> Any:
        """The messages through the model's chat template. With `stream: true`, server-sent events of
        `chat.completion.chunk` objects (the first with the role, each next with a `delta`), then `data: [DONE]`."""
        unsupported(body.model_extra)
        for m in body.messages:
            unsupported(m.model_extra)
        if body.max_completion_tokens is not None and body.max_tokens is not None:
            # The newer name decides; the older one given beside it must still be one the server takes, as the
            # schema says of both.
            limit = await run_in_threadpool(max_new_tokens)
            if body.max_tokens > limit:
                raise ApiError(400, f"max_tokens {body.max_tokens} exceeds this server's limit {limit}; ask for "
                                    "fewer", param="max_tokens", code="invalid_argument")
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        handles = await generations.submit([GenerationRequest(ref, "", body.decoding(), messages=body.turns,
                                                              priority=body.priority, principal=caller.principal)],
                                           {"max_new_tokens": body.max_tokens_param, "input": "messages"})
        version = handles[0].prompt_version or services.inference.model_id
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

    @router.post("/classify", response_model=ClassifyResponse, responses=openapi.errors(openapi.GENERATION))
    async def classify(body: ClassifyRequest, request: Request, caller: Caller = authenticated) -> ClassifyResponse:
        """Each input's most likely label among `labels`, with every label's probability."""
        unsupported(body.model_extra)
        ref = await run_in_threadpool(models.resolve, services, caller, body.model)
        results = await unless_disconnected(request, generations.classify(
            [ServiceClassify(ref, text, tuple(body.labels), body.apply_chat_template, principal=caller.principal)
             for text in body.inputs]))
        prompt_tokens = sum(r.input_tokens for r in results)
        return ClassifyResponse(
            id=f"classify-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
            system_fingerprint=results[0].prompt_version or services.inference.model_id,
            data=[responses.Classification(
                index=i, label=r.label, probs=[s.probability for s in r.scores], num_classes=len(r.scores),
                scores=[responses.LabelScore(label=s.label, logprob=s.logprob, probability=s.probability,
                                             num_tokens=s.num_tokens) for s in r.scores])
                for i, r in enumerate(results)],
            usage=responses.ClassifyUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens))

    return router
