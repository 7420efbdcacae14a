"""The serving core: admission, the scheduler's worker loop, the engine, its KV pool and caches.

Owns tensors and the one worker thread that runs the model. May import `softprompt.prompts` (format,
inject, tokens, refs, outcomes) and torch/transformers; never protobuf, grpc or any transport module.
"""
