"""The OpenAI-compatible HTTP transport, a thin sibling of `grpc_api`: no torch, no protobuf.

FastAPI routes (`routes`) validate JSON bodies (`schemas`), authenticate like gRPC (`auth`), name a
task in the `model` field (`models`), call the same transport-neutral services and answer JSON or
server-sent events (`streams`); errors take OpenAI's shape with the status of the one table
(`errors`, `service.statuses`). `middleware` adds request ids, metrics and the body limit; `server`
runs it all with uvicorn in the serving process, beside gRPC.
"""
