"""Builds the HTTP API's ASGI application for one server's services."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from softprompt.prompts.errors import PromptError
from softprompt.server.access.tokens import TokenTable
from softprompt.server.core.errors import ServingError
from softprompt.server.http_api import errors, openapi
from softprompt.server.http_api.errors import ApiError
from softprompt.server.http_api.schemas import UnsupportedParameter
from softprompt.server.http_api.middleware import BodyLimit, Observing
from softprompt.server.http_api.routes import api_router
from softprompt.server.observability.metrics import Metrics, NoMetrics
from softprompt.server.service.api import Services


def create_http_app(services: Services, *, tokens: TokenTable | None, max_body_bytes: int,
                    metrics: Metrics | None = None) -> FastAPI:
    """The OpenAI-compatible API over `services`: /v1/models, /v1/completions, /v1/chat/completions, /v1/classify."""
    app = FastAPI(title="softprompt", summary="OpenAI-compatible API: the task (a soft prompt) is the model",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.include_router(api_router(services, tokens))
    # Every status, the streams, this server's model id and limits, the bearer scheme where there are tokens.
    openapi.install(app, services, tokens=tokens is not None)
    app.add_exception_handler(RequestValidationError, errors.on_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, errors.on_http_exception)  # type: ignore[arg-type]
    # Expected failures answer by the status table; anything else is a bug: 500, and logged with its traceback.
    for expected in (ApiError, UnsupportedParameter, ServingError, PromptError, MemoryError, Exception):
        app.add_exception_handler(expected, errors.on_error)
    # Outermost first: every request is observed, the body limit applies before anything reads the body.
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(Observing, metrics=metrics or NoMetrics())
    return app
