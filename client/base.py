"""What the blocking and the asyncio clients share: the default target, channel credentials and options,
the bearer token's call metadata and the default deadline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import grpc

from softprompt.client.credentials import TlsOptions, bearer_metadata, channel_credentials
from softprompt.prompts.refs import task_name


DEFAULT_TARGET = "localhost:50051"

ChannelOptions = Sequence[tuple[str, Any]]
# The metadata key Ray Serve's gRPC proxy routes on (model multiplexing); see README, Running on Ray Serve.
MULTIPLEXED_MODEL_ID = "multiplexed_model_id"
Response = TypeVar("Response")


class BaseClient:
    """What both clients share: the target, the default deadline, the token's call metadata and the
    channel's credentials and options."""

    def __init__(self, target: str, timeout: float | None, token: str | None, tls: TlsOptions | bool | None,
                 credentials: grpc.ChannelCredentials | None, options: ChannelOptions | None,
                 route_by_task: bool = False) -> None:
        self.target = target
        self.timeout = timeout
        self.route_by_task = route_by_task
        self._metadata = bearer_metadata(token)
        self._credentials, tls_options = channel_credentials(tls, credentials)
        self._options = [*(options or ()), *tls_options]

    def _task_metadata(self, task: str) -> tuple[tuple[str, str], ...]:
        """The call metadata of a request for `task`: with `route_by_task`, the task's name as Ray Serve's
        multiplexed model id, so its requests go to the replica whose caches hold its prompt."""
        if not self.route_by_task or not task:
            return self._metadata
        return (*self._metadata, (MULTIPLEXED_MODEL_ID, task_name(task)))

    def _deadline(self, timeout: float | None) -> float | None:
        """The per-call timeout if given, else the client's default (None: no deadline)."""
        return self.timeout if timeout is None else timeout
