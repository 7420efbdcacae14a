"""The few touches of transformers' KV cache the engine needs, across transformers 5 releases.

transformers 5.17 takes and returns the cache as `past_key_values`; 5.24 renamed both to `cache`.
Everything here works on `DynamicCache` layers of shape [batch, kv_heads, seq, head_dim].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import DynamicCache, PreTrainedModel


@lru_cache(maxsize=None)
def _cache_kwarg(forward_cls: type) -> str:
    params = inspect.signature(forward_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class ForwardOutput:
    """Logits (the last position's in float32, or the last few positions' in the model's dtype) and the grown cache."""

    logits: torch.Tensor
    cache: DynamicCache


def forward(
    model: PreTrainedModel,
    cache: DynamicCache,
    *,
    attention_mask: torch.Tensor | dict[str, torch.Tensor],
    position_ids: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    score_last: int | None = None,
) -> ForwardOutput:
    """Runs the model over new positions, appending their keys/values to `cache`.

    `attention_mask` is a 2D padding mask, a 4D mask, or 4D masks by layer type (`masks.MaskLayout`).
    Logits are the last position's [batch, vocab], or with `score_last` the last that many positions'
    [batch, score_last, vocab]. The model applies its LM head (and its final soft-capping or logit
    scale) to those positions only, through its own `logits_to_keep`.
    """
    if score_last is not None and score_last < 1:
        raise ValueError(f"score_last must be a positive number of positions, got {score_last}")
    out = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1 if score_last is None else score_last,
        **{_cache_kwarg(type(model)): cache},
    )
    grown = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    # Scored positions' logits stay in the model's dtype: the caller takes a float32 log-softmax of what it gathers.
    return ForwardOutput(logits=out.logits if score_last is not None else out.logits[:, -1, :].float(), cache=grown)


def layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) tensors."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def from_layers(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these per-layer tensors."""
    return DynamicCache(ddp_cache_data=pairs)


def layer_shapes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read from a one-token forward (as the model itself
    shapes them, whatever its config calls the numbers)."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        out = forward(model, DynamicCache(), input_ids=torch.zeros(1, 1, dtype=torch.long, device=device),
                      attention_mask=torch.ones(1, 1, dtype=torch.long, device=device),
                      position_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    return [(int(k.shape[1]), int(k.shape[3])) for k, _ in layers(out.cache)]
