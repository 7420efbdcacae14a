"""Admission limits, overload, cancellation and deadlines: deterministic, with the worker held back."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from helpers import wait_until

from softprompt.client import Client
from softprompt.client import errors as client_errors
from softprompt.prompts import errors as prompt_errors
from softprompt.server.core import errors
from softprompt.server.grpc_api import status
from softprompt.server.service import statuses
from softprompt.server.app.server import build_app, create_server
from softprompt.server.config import ServerConfig
from softprompt.prompts.options import DecodingOptions
from softprompt.server.core.types import GenerationRequest


@pytest.fixture
def app(tiny_base, tmp_path):
    config = ServerConfig(port=0, store=tmp_path / "store", max_batch_size=2, max_queued_requests=2,
                          max_upload_mb=0.01)
    return build_app(config, base=tiny_base)


def _admit(app, text: str = "hello", deadline: float | None = None, max_new_tokens: int = 3):
    request = GenerationRequest("", text, DecodingOptions(max_new_tokens=max_new_tokens), deadline)
    return app.admission.admit(request)


def test_full_queue_is_refused_at_once(app):
    handles = [app.scheduler.submit(_admit(app)) for _ in range(2)]  # worker not started: they wait
    with pytest.raises(errors.OverloadedError, match="retry"):
        app.scheduler.submit(_admit(app))
    app.scheduler.start()
    assert [h.result().usage.generated_tokens for h in handles] == [3, 3]
    app.scheduler.close()


def test_cancelled_and_expired_requests_leave_without_running(app):
    cancelled = app.scheduler.submit(_admit(app))
    cancelled.cancel()
    expired = app.scheduler.submit(_admit(app, deadline=time.monotonic() - 1))
    app.scheduler.start()
    with pytest.raises(errors.CancelledError):
        cancelled.result()
    with pytest.raises(errors.DeadlineError, match="deadline"):
        expired.result()
    assert app.scheduler.stats.prefills == 0
    assert app.scheduler.submit(_admit(app)).result().usage.generated_tokens == 3
    app.scheduler.close()


def test_a_cancelled_queued_request_frees_its_queue_slot_at_once(app):
    first, second = (app.scheduler.submit(_admit(app)) for _ in range(2))  # worker not started: the queue is full
    first.cancel()
    with pytest.raises(errors.CancelledError):
        first.result()  # failed by the cancel itself: no worker has run
    assert app.scheduler.queue_depth() == 1
    third = app.scheduler.submit(_admit(app))  # the freed slot takes a new request
    app.scheduler.start()
    assert [h.result().usage.generated_tokens for h in (second, third)] == [3, 3]
    app.scheduler.close()


def test_closed_scheduler_refuses_and_fails_waiting_requests(app):
    waiting = app.scheduler.submit(_admit(app))
    app.scheduler.close()
    with pytest.raises(errors.ShuttingDownError):
        app.scheduler.submit(_admit(app))
    with pytest.raises(errors.ShuttingDownError):
        waiting.result()


def test_more_requests_than_the_batch_all_finish(tiny_base, tmp_path):
    # A queue deep enough for every request: what is tested is the batch bound, not admission.
    app = build_app(ServerConfig(port=0, store=tmp_path / "store", max_batch_size=2, max_queued_requests=8),
                    base=tiny_base)
    app.scheduler.start()
    handles = [app.scheduler.submit(_admit(app, text, max_new_tokens=4)) for text in ("a", "bb")]
    more = [app.scheduler.submit(_admit(app, "ccc", max_new_tokens=4)) for _ in range(2)]
    assert all(h.result().usage.generated_tokens == 4 for h in handles + more)
    assert app.scheduler.stats.max_batch <= 2
    app.scheduler.close()


def test_overload_and_upload_limit_over_grpc(app):
    server, port, _ = create_server(app)
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            queued = [client.stream("", "hello", max_new_tokens=2) for _ in range(2)]
            first_chunks = []
            # Streams start lazily: pull them in threads; with the worker held back both sit in the queue.
            threads = [threading.Thread(target=lambda s=s: first_chunks.append(list(s))) for s in queued]
            for t in threads:
                t.start()
            wait_until(lambda: app.scheduler.queue_depth() == 2)
            with pytest.raises(client_errors.ResourceExhaustedError, match="capacity"):
                client.generate("", "hello")
            app.scheduler.start()
            for t in threads:
                t.join(timeout=60)
            assert [sum(len(c.token_ids) for c in chunks) for chunks in first_chunks] == [2, 2]

            big = torch.zeros(80, app.base.spec.hidden_size)  # 80 x 64 x 4 bytes > the 10 KB limit
            with pytest.raises(client_errors.ResourceExhaustedError, match="max-upload-mb"):
                client.register("big", big)
    finally:
        server.stop(0)
        app.scheduler.close()


@pytest.mark.parametrize(("exc", "code", "http"), [
    (prompt_errors.PromptNotFoundError("x"), grpc.StatusCode.NOT_FOUND, 404),
    (prompt_errors.InvalidPromptError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (prompt_errors.InvalidNameError("x"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (prompt_errors.BaseModelMismatchError("x"), grpc.StatusCode.FAILED_PRECONDITION, 400),
    (prompt_errors.RegistryConflictError("x"), grpc.StatusCode.FAILED_PRECONDITION, 409),
    (prompt_errors.CorruptPromptError("x"), grpc.StatusCode.DATA_LOSS, 500),
    (errors.OverloadedError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (errors.UploadTooLargeError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    (errors.DeadlineError("x"), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (errors.ShuttingDownError("x"), grpc.StatusCode.UNAVAILABLE, 503),
    (errors.CancelledError("x"), grpc.StatusCode.CANCELLED, 499),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL, 500),
])
def test_status_table(exc, code, http):
    """One table, both transports."""
    assert status.status_for(exc) == code
    assert statuses.status_for(exc).http == http
