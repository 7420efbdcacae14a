"""The serving core: admission, the scheduler's worker loop, the KV manager, the engine, its KV pool and caches.

Owns tensors and the one worker thread that runs the model. May import `softprompt.prompts` (format,
inject, tokens, refs, outcomes) and torch/transformers; never protobuf, grpc, a transport, the service
layer or the jobs. `types`, `handle` and `errors` are torch-free: they are what the transports may import.
"""
