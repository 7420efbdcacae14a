"""What the blocking and the asyncio clients share: the default target, channel credentials and options,
the bearer token's call metadata and the default deadline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import grpc

from softprompt.client.credentials import TlsOptions, bearer_metadata, channel_credentials


DEFAULT_TARGET = "localhost:50051"

ChannelOptions = Sequence[tuple[str, Any]]
Response = TypeVar("Response")


class BaseClient:
    """What both clients share: the target, the default deadline, the token's call metadata and the
    channel's credentials and options."""

    def __init__(self, target: str, timeout: float | None, token: str | None, tls: TlsOptions | bool | None,
                 credentials: grpc.ChannelCredentials | None, options: ChannelOptions | None) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = bearer_metadata(token)
        self._credentials, tls_options = channel_credentials(tls, credentials)
        self._options = [*(options or ()), *tls_options]

    def _deadline(self, timeout: float | None) -> float | None:
        """The per-call timeout if given, else the client's default (None: no deadline)."""
        return self.timeout if timeout is None else timeout
