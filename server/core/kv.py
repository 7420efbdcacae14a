"""The model forward every serving path runs, across transformers 5 releases, and the KV shapes it writes.

transformers 5.17 takes the cache as `past_key_values`; 5.24 renamed it `cache`. The cache handed in
is duck-typed (`paged_cache.PagedCache` for every serving forward): a forward given position ids and
prebuilt masks calls nothing of it but `update` (and, on some releases, `get_seq_length`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from softprompt.prompts.kvcache import cache_kwarg, layer_kv_shapes
from softprompt.server.core import packed_linear


@dataclass
class ForwardOutput:
    """Logits: the last position's in float32, or the last few positions' in the model's dtype."""

    logits: torch.Tensor


def forward(
    model: PreTrainedModel,
    cache: object,
    *,
    attention_mask: torch.Tensor | dict[str, torch.Tensor],
    position_ids: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    score_last: int | None = None,
    keep: torch.Tensor | None = None,
    packed: bool = False,
) -> ForwardOutput:
    """Runs the model over new positions; their keys and values go to `cache.update`.

    `attention_mask` is a 4D mask, or 4D masks by layer type (`masks.MaskLayout`). Logits are the last
    position's [batch, vocab], or with `score_last` the last that many positions' [batch, score_last,
    vocab]; with `keep` (indices along the queries of a one-row forward) those positions' [len(keep), vocab] in
    float32. The model applies its LM head (and its final soft-capping or logit scale) to those
    positions only, through its own `logits_to_keep`. `packed` runs linear layers that `packed_linear`
    packed on their packed weights.
    """
    if score_last is not None and score_last < 1:
        raise ValueError(f"score_last must be a positive number of positions, got {score_last}")
    if keep is not None and score_last is not None:
        raise ValueError("keep and score_last are two ways to choose positions: give one")
    to_keep: int | torch.Tensor = keep if keep is not None else 1 if score_last is None else score_last
    with packed_linear.serving(packed):
        out = model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=to_keep,
            **{cache_kwarg(type(model)): cache},
        )
    # Scored positions' logits stay in the model's dtype: the caller takes a float32 log-softmax of what it gathers.
    if keep is not None:
        return ForwardOutput(logits=out.logits[0].float())
    return ForwardOutput(logits=out.logits if score_last is not None else out.logits[:, -1, :].float())


def layer_shapes(model: PreTrainedModel) -> list[tuple[int, int]]:
    """(kv_heads, head_dim) of every layer's cache, read from a one-token forward (as the model itself
    shapes them, whatever its config calls the numbers)."""
    return layer_kv_shapes(model)
