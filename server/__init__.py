"""The softprompt server: one frozen base model, many soft prompts, gRPC in front. Read top to bottom:

- `grpc_api/`      the gRPC transport: servicers (protobuf <-> dataclasses), interceptors, the status table.
                   No torch. A second transport (HTTP) is a sibling that calls the same services.
- `service/`       the transport-neutral layer: prompt operations (register an upload, delete, warm,
                   resolve), inference calls and model info, in dataclasses. No protobuf.
- `core/`          the serving core: admission, scheduler, engine, KV pool, sampling, text, caches.
                   Tensors, no protobuf, no transport.
- `jobs/`          training jobs that share the worker with serving.
- `access/`        bearer tokens, roles and task patterns (shared by every transport).
- `observability/` metrics, Prometheus exposition, request-id logging.
- `app/`           the wiring and entry points: model loading, building and running the server,
                   `softprompt serve`, `softprompt train --store`.
- `config.py`      the settings: one frozen dataclass built once from flags, help beside each field; any
                   layer may read it.

Dependency rule: app -> everything; grpc_api -> service, access, observability, core's dataclasses and
errors; service -> core, jobs, prompts; jobs -> core, prompts; core -> prompts; any layer -> config.
Nothing imports app except the CLI hand-off.
"""
