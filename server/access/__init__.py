"""Who may call what: the bearer-token file (hashed tokens, roles and task patterns) and `softprompt token`.

Transport-neutral and torch-free: both transports enforce these tables, gRPC with its interceptor
(`grpc_api.interceptors.auth`), HTTP with a FastAPI dependency (`http_api.auth`).
"""
