"""The model families (`config.model_type`) the engine is verified to serve exactly.

tests/test_families.py builds a tiny random model of each from its config and checks, with sdpa and
eager attention, that mixed batches with rows joining and leaving give the tokens of the model's own
forward without a KV cache; it asserts that this set and its configs agree, so no family is listed
untested. Startup checks (`support.py`) refuse families outside it.
"""

from __future__ import annotations

# model_type -> what the matrix exercises beyond plain causal attention.
NOTES: dict[str, str] = {
    "llama": "rotary, grouped-query attention",
    "gpt2": "learned absolute positions",
    "opt": "learned positions with an offset",
    "gpt_neox": "partial rotary, parallel residual",
    "falcon": "rotary, new decoder architecture (ALiBi variants are refused by support.py)",
    "gptj": "partial rotary, parallel residual",
    "codegen": "partial rotary",
    "gpt_bigcode": "multi-query attention, learned positions",
    "gemma": "scaled embeddings",
    "phi": "partial rotary",
    "stablelm": "partial rotary",
    "olmo": "non-parametric layer norm",
    "olmo2": "query/key norms",
    "granite": "scaled residuals, logits and attention",
    "granitemoe": "mixture of experts",
    "cohere": "parallel residual, logit scale",
    "smollm3": "layers without rotary positions",
    "qwen3_moe": "mixture of experts",
    "mistral": "sliding window on every layer",
    "mixtral": "sliding window on every layer, mixture of experts",
    "phi3": "sliding window on every layer",
    "starcoder2": "sliding window on every layer",
    "qwen2": "sliding window above max_window_layers, full below",
    "qwen3": "sliding window above max_window_layers, full below",
    "qwen2_moe": "sliding window on some layers, mixture of experts",
    "gemma2": "sliding and full layers alternating, soft-capping (eager attention only)",
    "gemma3_text": "sliding and full layers, a rotary base per layer type",
    "cohere2": "sliding and full layers",
    "olmo3": "sliding and full layers",
    "exaone4": "sliding and full layers",
}

TESTED_MODEL_TYPES: frozenset[str] = frozenset(NOTES)

# The attention implementations the matrix runs, and the only ones the engine's masks are built for:
# sdpa takes boolean masks, eager additive float ones.
SUPPORTED_ATTENTION: tuple[str, ...] = ("sdpa", "eager")
