"""Who may call what: the bearer-token file (hashed tokens, roles, task patterns) and `softprompt token`.

Transport-neutral and torch-free: the gRPC interceptor (and any later transport) enforces these tables.
"""
