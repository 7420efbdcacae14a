"""The gRPC side of the one exception -> status table (`service.statuses`)."""

from __future__ import annotations

import grpc

from softprompt.server.service import statuses


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an exception; INTERNAL for anything unexpected."""
    return grpc.StatusCode[statuses.status_for(exc).grpc]
