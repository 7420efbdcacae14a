"""The gRPC transport: servicers that convert protobuf to the service layer's dataclasses and back, the one
exception -> status table, server exposure (TLS, loopback rule) and the interceptors.

No torch, no tensors: everything below goes through the service layer's torch-free face
(`softprompt.server.service.api` and `.types`); pyproject.toml's import contracts check it.
"""
