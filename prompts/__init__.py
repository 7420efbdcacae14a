"""The domain: soft prompts themselves. Torch-free modules (`refs`, `outcomes`, `options`, `errors`) are shared
with the client; `results` and `registry.version` (what training and the registry report) are torch-free too,
for the server's transports; the rest (format, registry, inject, tokens, data, train, pipeline) need torch.

Never imports `softprompt.server` or `softprompt.client`.
"""
