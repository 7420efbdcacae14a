"""The domain: soft prompts themselves. Torch-free modules (`refs`, `outcomes`, `options`, `errors`) are shared
with the client; the rest (format, registry, inject, tokens, data, train, pipeline) need torch.

Never imports `softprompt.server` or `softprompt.client`.
"""
