"""A model's KV cache as the domain sees it: the shape each layer writes, and a prompt's keys and values as a cache.

transformers 5.17 takes the cache as `past_key_values`; 5.24 renamed it `cache` (`cache_kwarg`). A KV-level
prompt (prefix tuning, cartridges: `KvLayout`) is handed to the model as transformers' own `DynamicCache`
holding the prompt's keys and values, as PEFT's `PeftModel.get_prompt` does: the model then builds its
masks (sliding windows included) and positions over them itself. Training and evaluation score through
this; serving writes the same keys and values into its KV pool instead (server/core/virtual.py).
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from softprompt.prompts.base import KvLayout


@lru_cache(maxsize=None)
def cache_kwarg(model_cls: type) -> str:
    """The keyword the model's forward takes its cache by: "cache" (transformers >= 5.24) or "past_key_values"."""
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ShapeRecorder:
    """A cache that keeps nothing: it records the (kv_heads, head_dim) each layer writes."""

    def __init__(self) -> None:
        self.shapes: dict[int, tuple[int, int]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.shapes[layer_idx] = (int(key_states.shape[1]), int(key_states.shape[3]))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


def layer_kv_shapes(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read from a one-token forward (as the model itself
    shapes them, whatever its config calls the numbers), in layer order."""
    device = next(model.parameters()).device
    recorder = ShapeRecorder()
    one = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        model(input_ids=one, position_ids=one, use_cache=True,
              attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device),
              **{cache_kwarg(type(model)): recorder})
    return [recorder.shapes[i] for i in sorted(recorder.shapes)]


def split_layers(kv: torch.Tensor, layout: KvLayout) -> torch.Tensor:
    """PEFT's ``[num_virtual_tokens, num_layers * 2 * token_dim]`` matrix as a view
    ``[num_virtual_tokens, num_layers, 2 (key, value), kv_heads, head_dim]`` (no copy)."""
    return kv.view(kv.shape[0], layout.num_layers, 2, layout.kv_heads, layout.head_dim)


def prefix_cache(model: torch.nn.Module, kv: torch.Tensor, layout: KvLayout, batch: int) -> object:
    """A transformers `DynamicCache` holding a KV-level prompt's keys and values for `batch` rows, as PEFT's
    `get_prompt` builds it: the layers (sliding ones included) of the model's own config, each given the
    prompt's keys and values ``[batch, kv_heads, num_virtual_tokens, head_dim]`` as the model's dtype. Keys are
    cache entries as they are: no rotary embedding is applied to them. Gradients flow into `kv`."""
    from transformers import DynamicCache

    config = model.config
    cache = DynamicCache(config=config)
    per_layer = split_layers(kv, layout).to(model.dtype).permute(1, 2, 3, 0, 4)  # [layers, 2, heads, n, dim]
    positions = torch.arange(kv.shape[0], device=kv.device)
    for layer in range(layout.num_layers):
        keys = per_layer[layer, 0][None].expand(batch, -1, -1, -1)
        values = per_layer[layer, 1][None].expand(batch, -1, -1, -1)
        cache.update(keys, values, layer, cache_kwargs={"cache_position": positions})
    return cache
