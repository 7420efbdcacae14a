"""gRPC interceptors, outermost first: `observing` (request ids, metrics, logs), `auth` (tokens, roles, task
patterns), `decoding` (undecodable requests are INVALID_ARGUMENT); `handlers` rebuilds a method handler around
new behaviour for all three.
"""
