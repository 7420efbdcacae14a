"""What the blocking and the asyncio clients share: every public method (each one function of `calls`, made a
method of both by `methods`), the channel's credentials and options, the bearer token's call metadata, the
default deadline and task routing. `Client` and `AsyncClient` add only how a channel opens and closes and
how a prepared call runs: blocking, or awaited."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import grpc

from softprompt.client import calls
from softprompt.client.calls import Streaming, Unary
from softprompt.client.credentials import TlsOptions, bearer_metadata, channel_credentials
from softprompt.client.methods import listing, streaming, unary
from softprompt.prompts.refs import task_name
from softprompt.protos import softprompt_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"

ChannelOptions = Sequence[tuple[str, Any]]
# The metadata key Ray Serve's gRPC proxy routes on (model multiplexing); see README, Running on Ray Serve.
MULTIPLEXED_MODEL_ID = "multiplexed_model_id"
Channel = TypeVar("Channel")


class BaseClient(Generic[Channel]):
    """The client's API, whichever way it runs; see `Client` (blocking) and `AsyncClient` (asyncio).

    Args:
        target: the server's "host:port".
        timeout: default deadline of every call, in seconds (None: no deadline). Each method's
            `timeout` overrides it.
        options: gRPC channel options, e.g. [("grpc.max_receive_message_length", 64 << 20)].
        credentials: ready-made channel credentials (instead of `tls`).
        token: bearer token sent with every call, for servers started with --auth-tokens.
        tls: TLS settings (`TlsOptions`), or True for TLS with the system's root certificates;
            None connects without TLS.
        route_by_task: send each Generate, GenerateStream and Classify request's task as Ray Serve's
            `multiplexed_model_id`, so a Ray Serve deployment routes a task's requests to the replica that
            already holds its prompt (README, Running on Ray Serve); a plain server ignores it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        options: ChannelOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        tls: TlsOptions | bool | None = None,
        route_by_task: bool = False,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.route_by_task = route_by_task
        self._metadata = bearer_metadata(token)
        credentials, tls_options = channel_credentials(tls, credentials)
        self._channel = self._connect(target, credentials, [*(options or ()), *tls_options])
        self._stubs = {
            "Inference": pb_grpc.InferenceStub(self._channel),
            "Registry": pb_grpc.RegistryStub(self._channel),
            "Training": pb_grpc.TrainingStub(self._channel),
        }

    def _connect(
        self, target: str, credentials: grpc.ChannelCredentials | None, options: list[tuple[str, Any]]
    ) -> Channel:
        """Opens the channel: plaintext when `credentials` is None."""
        raise NotImplementedError

    def _invocation(self, call: Unary[Any] | Streaming[Any]) -> tuple[Any, dict[str, Any]]:
        """The stub method that sends `call`, and its keyword arguments: the deadline and the call metadata."""
        if isinstance(call, Streaming) and call.patient:
            timeout = call.timeout
        else:  # the call's own timeout if given, else the client's default (None: no deadline)
            timeout = self.timeout if call.timeout is None else call.timeout
        method = getattr(self._stubs[call.rpc.service], call.rpc.method)
        return method, {"timeout": timeout, "metadata": self._task_metadata(call.task)}

    def _task_metadata(self, task: str) -> tuple[tuple[str, str], ...]:
        """The call metadata of a request for `task`: with `route_by_task`, the task's name as Ray Serve's
        multiplexed model id, so its requests go to the replica whose caches hold its prompt."""
        if not self.route_by_task or not task:
            return self._metadata
        return (*self._metadata, (MULTIPLEXED_MODEL_ID, task_name(task)))

    # Every method, once: `calls` holds each one's signature, documentation, request and response.

    # ------------------------------------------------------------------ Inference
    generate = unary(calls.generate)
    stream = streaming(calls.stream)
    tokenize = unary(calls.tokenize)
    classify = unary(calls.classify)
    model_info = unary(calls.model_info)

    # ------------------------------------------------------------------ Registry
    register = unary(calls.register)
    get_prompt = unary(calls.get_prompt)
    iter_prompts = streaming(calls.iter_prompts)
    list_prompts = listing(calls.list_prompts)
    list_prompts_page = unary(calls.list_prompts_page)
    delete_prompt = unary(calls.delete_prompt)
    set_alias = unary(calls.set_alias)
    export_prompt = unary(calls.export_prompt)

    # ------------------------------------------------------------------ Training
    train = unary(calls.train)
    get_training_job = unary(calls.get_training_job)
    watch_training_job = streaming(calls.watch_training_job)
    wait_for_training_job = unary(calls.wait_for_training_job)
    cancel_training_job = unary(calls.cancel_training_job)
    list_training_jobs = unary(calls.list_training_jobs)
