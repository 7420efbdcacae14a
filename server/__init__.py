"""The softprompt server: one frozen base model, many soft prompts, gRPC and OpenAI's HTTP API in front. Read top
to bottom:

- `grpc_api/`      the gRPC transport: servicers (protobuf <-> dataclasses), interceptors. No torch.
- `http_api/`      the OpenAI-compatible HTTP transport (FastAPI): the same services, batches and statuses. No torch.
- `service/`       the transport-neutral layer: a torch-free face the transports import (`api` Protocols,
                   `types`, `statuses`: the one exception -> status table) and the concrete services behind it
                   (prompt operations, inference calls, training). No protobuf.
- `core/`          the serving core: admission, scheduler, the KV manager, engine, KV pool, sampling, text,
                   caches. Tensors, no protobuf, no transport.
- `jobs/`          training jobs that share the worker with serving.
- `access/`        bearer tokens, roles and task patterns (shared by every transport).
- `observability/` metrics, Prometheus exposition, request-id logging.
- `app/`           the wiring and entry points: model loading, building and running the server,
                   `softprompt serve`, `softprompt train --store`, Ray Serve.
- `config.py`      the settings: one frozen dataclass built once from flags, help beside each field; any
                   layer may read it.

Dependency rule (checked by `lint-imports`, contracts in pyproject.toml): app -> everything; the transports ->
service's torch-free face, access, observability, core's torch-free types, handle and errors; service -> core,
jobs, prompts; jobs -> core, prompts; core -> prompts; any layer -> config. Nothing in the server imports app.
"""
