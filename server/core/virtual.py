"""A prompt as the engine serves it: the positions in front of a row's input, and how its first forward fills them.

A row's KV blocks hold `[prompt ; input ; generated]` in position order. What differs between methods is only
how the prompt's positions get there, so that is all this module knows; the engine asks it (`first_forward`,
`fresh_virtual`, `virtual_tokens`) and never branches on a method itself:

- virtual-token embeddings ``[n, hidden]`` (a `torch.Tensor`: PEFT's prompt tuning and P-tuning, and
  multitask prompt tuning and CPT, materialized at registration): the model computes their keys and values.
  The first n - 1 depend on nothing but the prompt, so they are computed once per version and kept
  (`prefixes`, keyed by version) and copied into each row's first slots; the last one runs fresh in the
  row's own forward, ahead of its tokens (so a row's first forward always has a position whose logits
  predict what follows). On a miss the whole prompt runs fresh and its first n - 1 positions are kept.
- `KvPrefix` (PEFT's prefix tuning and cartridges): the keys and values themselves, per layer. They are
  written into the row's first n slots as they are (no forward, no rotary embedding applied: PEFT hands
  them to the model as cache entries) and the row's first forward is its tokens alone, at positions n,
  n + 1, ..., attending to all n (sliding windows measured in those positions): what PEFT's `PeftModel`
  computes. With nothing of the prompt to run, such a row needs at least one token.

Either way the prefix's slots are copied into every row, not shared between rows: see `first_forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.server.core.pool import LayerShape
from softprompt.server.core.prompt_cache import DeviceLru, Key, PrefixKV


@dataclass(frozen=True, eq=False)
class KvPrefix:
    """A KV-level prompt on the device: each layer's keys and values ``[n, kv_heads, head_dim]`` in the KV pool's
    dtype and slot-major layout, so a row's first n slots take them as they are."""

    layers: PrefixKV

    @classmethod
    def of(cls, matrix: torch.Tensor, shapes: list[LayerShape]) -> KvPrefix:
        """Views of PEFT's ``[n, num_layers * 2 * kv_heads * head_dim]`` matrix (on the device, in the pool's
        dtype) per layer: per token, layer 0's key, layer 0's value, layer 1's key, ... No copy."""
        heads, dim = shapes[0].kv_heads, shapes[0].head_dim
        if any(s != shapes[0] for s in shapes) or matrix.shape[1] != len(shapes) * 2 * heads * dim:
            raise ValueError(f"a [{matrix.shape[0]}, {matrix.shape[1]}] prefix does not fit layers {shapes}")
        split = matrix.view(matrix.shape[0], len(shapes), 2, heads, dim)
        return cls([(split[:, layer, 0], split[:, layer, 1]) for layer in range(len(shapes))])

    @property
    def num_virtual_tokens(self) -> int:
        """Positions it fills in front of the input."""
        return int(self.layers[0][0].shape[0])


# What a row's prompt is to the engine: virtual-token embeddings [n, hidden], or keys and values per layer.
Prompt = torch.Tensor | KvPrefix


@dataclass(frozen=True)
class FirstForward:
    """How a row's first forward gets its prompt's positions.

    `prefix` is keys and values copied into the row's first slots before the forward; `head` virtual-token
    embeddings run fresh ahead of the row's tokens; `keep_tokens` > 0 means the KV of the first that many of
    `head`'s positions becomes the version's cached prefix after the forward.
    """

    prefix: PrefixKV | None = None
    head: torch.Tensor | None = None
    keep_tokens: int = 0


def virtual_tokens(prompt: Prompt | None) -> int:
    """Positions the prompt puts in front of the input: what admission, the KV accounting and usage count."""
    if prompt is None:
        return 0
    return prompt.num_virtual_tokens if isinstance(prompt, KvPrefix) else int(prompt.shape[0])


def predicts_first_token(prompt: Prompt | None) -> bool:
    """Whether the prompt's last position is computed by the model, so that its logits predict the first
    token after it: true of virtual-token embeddings, never of keys and values (a row behind a `KvPrefix`,
    or behind no prompt, needs a token of its own before anything can be predicted or scored)."""
    return prompt is not None and not isinstance(prompt, KvPrefix) and int(prompt.shape[0]) > 0


def fresh_virtual(prompt: Prompt | None, key: Key | None, prefixes: DeviceLru[PrefixKV]) -> int:
    """Of the prompt's positions, those a row's first forward computes (the planners' cost): none for keys and
    values, the last virtual token for a cached prefix, else the whole prompt. Counts nothing in the cache."""
    if prompt is None or isinstance(prompt, KvPrefix):
        return 0
    n = int(prompt.shape[0])
    cached = key is not None and n > 1 and prefixes.contains(key)
    return 1 if cached or n < 2 else n


def first_forward(prompt: Prompt | None, key: Key | None, prefixes: DeviceLru[PrefixKV]) -> FirstForward:
    """How a row's first forward gets `prompt`'s positions (looking its prefix up in `prefixes`).

    Copied, not shared: every row gets its own copy of the prefix in its own blocks. Sharing a version's
    full prefix blocks between its rows would need reference-counted blocks in the KV manager and would
    still copy the partly filled last block (a row's positions continue in it), to save n slots per row
    (20 virtual tokens of the default model: 0.9 MiB of float32 KV, one memory copy per prefill); the
    copy keeps a row's blocks its own, so freeing, preemption and the decode kernel need no exception.
    """
    if prompt is None:
        return FirstForward()
    if isinstance(prompt, KvPrefix):
        return FirstForward(prefix=prompt.layers)
    n = int(prompt.shape[0])
    if n < 2:
        return FirstForward(head=prompt)
    cached = None if key is None else prefixes.lookup(key)
    if cached is None:
        return FirstForward(head=prompt, keep_tokens=n - 1 if key is not None else 0)
    return FirstForward(prefix=cached, head=prompt[-1:])


def prefix_to_compute(prompt: Prompt | None, key: Key | None, prefixes: DeviceLru[PrefixKV]) -> int:
    """How many of `prompt`'s positions a first forward would keep as its cached prefix and are not cached yet
    (0: nothing to compute ahead: no prompt, keys and values already, one virtual token, no key, or cached). Asks
    the cache without counting a lookup, for work done ahead of requests (`Engine.warm`)."""
    if prompt is None or isinstance(prompt, KvPrefix) or key is None or int(prompt.shape[0]) < 2:
        return 0
    return 0 if prefixes.contains(key) else int(prompt.shape[0]) - 1
