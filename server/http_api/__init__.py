"""The OpenAI-compatible HTTP transport, a thin sibling of `grpc_api`: no torch, no protobuf.

FastAPI routes (`routes`) validate JSON bodies (`schemas`), authenticate like gRPC (`auth`, a dependency),
resolve the `model` field to the exact prompt version once (`models`), call the same transport-neutral
services (`softprompt.server.service.api`) and answer response models (`responses`) as JSON or server-sent
events, awaiting generations on the event loop without a thread each (`streams`); errors take OpenAI's
shape with the status of the one table (`errors`, `service.statuses`). `middleware` adds request ids,
metrics and the body limit; `server` runs it all with uvicorn in the serving process, beside gRPC.
"""
