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
    """Logits (the last position's in float32, or every position's in the model's dtype) and the grown cache."""

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
    every_position: bool = False,
) -> ForwardOutput:
    """Runs the model over new positions, appending their keys/values to `cache`.

    `attention_mask` is a 2D padding mask, a 4D mask, or 4D masks by layer type (`masks.MaskLayout`).
    Logits are the last position's [batch, vocab], or with `every_position` [batch, positions, vocab].
    """
    out = model(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=0 if every_position else 1,
        **{_cache_kwarg(type(model)): cache},
    )
    grown = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    # Every position's logits stay in the model's dtype: a float32 copy of them all can be large.
    return ForwardOutput(logits=out.logits if every_position else out.logits[:, -1, :].float(), cache=grown)


def layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) tensors."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def from_layers(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A DynamicCache holding exactly these per-layer tensors."""
    return DynamicCache(ddp_cache_data=pairs)


def zero_masked(cache: DynamicCache, attention_mask: torch.Tensor) -> None:
    """Zeroes keys/values at padded positions.

    A padded query position attends to nothing, and some attention kernels return NaN there; a
    masked-out NaN value still poisons later steps (0 * NaN = NaN), so padding must hold zeros.
    """
    keep = attention_mask[:, None, :, None].to(torch.bool)
    for layer in cache.layers:
        layer.keys = layer.keys.masked_fill(~keep, 0)
        layer.values = layer.values.masked_fill(~keep, 0)
