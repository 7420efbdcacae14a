"""The transport-neutral service layer: what a request means, between a transport and the serving core.

A transport (`grpc_api`, `http_api`) converts its messages to the dataclasses of `types`, makes one call on
`Services` (the Protocols of `api`) and converts the answer back; checks, registry and cache bookkeeping,
warming and metrics live in the concrete services (`inference`, `prompts`, `training`), which `server/app`
builds, so every transport behaves alike. `statuses` is the one exception -> (gRPC, HTTP) status table.

This package's face (`api`, `types`, `statuses`) is torch-free and is all a transport imports; the concrete
services import the core, the jobs and the prompts, never protobuf, grpc or a transport.
"""

from softprompt.server.service.api import Services

__all__ = ["Services"]
