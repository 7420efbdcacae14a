"""What a prompt must know about the base model it serves: width, depth, KV shape and a weight fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KvLayout:
    """The keys and values a KV-level prompt (prefix tuning, cartridges) holds per virtual token.

    PEFT stores such a prompt as one ``[num_virtual_tokens, num_layers * 2 * token_dim]`` matrix: per
    token, layer 0's key, layer 0's value, layer 1's key, ... each ``token_dim = kv_heads * head_dim``
    wide (`width`), in the layout of the model's own KV cache (grouped-query attention: KV heads).
    """

    num_layers: int
    kv_heads: int
    head_dim: int

    @property
    def token_dim(self) -> int:
        """One layer's key (or value) of one token: kv_heads x head_dim."""
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """Columns of the stored matrix: num_layers x 2 x token_dim."""
        return self.num_layers * 2 * self.token_dim

    def describe(self) -> str:
        """"30 layers x 3 KV heads x 64": for messages."""
        return f"{self.num_layers} layers x {self.kv_heads} KV heads x head size {self.head_dim}"


@dataclass(frozen=True)
class BaseModelSpec:
    """The facts about a base model that decide whether a prompt fits it.

    `kv_heads` and `head_dim` are the shape of every layer's cached keys and values, as the model
    itself writes them (0 when unknown or when layers differ: KV-level prompts are then refused).
    """

    model_id: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    fingerprint: str
    kv_heads: int = 0
    head_dim: int = 0

    @property
    def kv_layout(self) -> KvLayout | None:
        """The layout a KV-level prompt for this model has; None when the model's KV shape is unknown or
        differs between layers."""
        if self.kv_heads < 1 or self.head_dim < 1:
            return None
        return KvLayout(self.num_layers, self.kv_heads, self.head_dim)


def fingerprint_model(model: torch.nn.Module) -> str:
    """Returns a short hash that identifies a base model's weights, independent of its dtype or device.

    A soft prompt lives in the input-embedding space, so the embedding matrix (plus the shape of the
    network) identifies what it was made for. Hashing it in bfloat16 makes a float32 copy on CPU and a
    bfloat16 copy on GPU of the same checkpoint agree.
    """
    config = model.config
    h = hashlib.sha256()
    shape = (
        getattr(config, "model_type", ""),
        config.hidden_size,
        config.num_hidden_layers,
        getattr(config, "num_attention_heads", 0),
        getattr(config, "num_key_value_heads", 0),
        config.vocab_size,
    )
    h.update(repr(shape).encode())
    weight = model.get_input_embeddings().weight.detach()
    h.update(weight.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def kv_layout_of(model: torch.nn.Module) -> KvLayout | None:
    """The model's `KvLayout`, read from the shapes its layers write to the cache in a one-token forward; None
    when they differ between layers, some layer keeps no cache of its own, or the forward fails (a model the
    engine cannot run, which support.py refuses anyway)."""
    from softprompt.prompts.kvcache import layer_kv_shapes

    try:
        layers = layer_kv_shapes(model)
    except Exception:  # noqa: BLE001 - see above
        return None
    shapes = set(layers)
    if len(shapes) != 1 or len(layers) != int(model.config.num_hidden_layers):
        return None
    kv_heads, head_dim = shapes.pop()
    return KvLayout(len(layers), kv_heads, head_dim)


def spec_of(model: torch.nn.Module, model_id: str) -> BaseModelSpec:
    """Describes a loaded Hugging Face causal LM."""
    config = model.config
    layout = kv_layout_of(model)
    return BaseModelSpec(
        model_id=model_id,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_attention_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        vocab_size=int(config.vocab_size),
        fingerprint=fingerprint_model(model),
        kv_heads=0 if layout is None else layout.kv_heads,
        head_dim=0 if layout is None else layout.head_dim,
    )
