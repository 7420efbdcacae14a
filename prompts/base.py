"""What a prompt must know about the base model it serves: width, depth and a weight fingerprint."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BaseModelSpec:
    """The facts about a base model that decide whether a prompt fits it."""

    model_id: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    fingerprint: str


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


def spec_of(model: torch.nn.Module, model_id: str) -> BaseModelSpec:
    """Describes a loaded Hugging Face causal LM."""
    config = model.config
    return BaseModelSpec(
        model_id=model_id,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        num_attention_heads=int(getattr(config, "num_attention_heads", 0) or 0),
        vocab_size=int(config.vocab_size),
        fingerprint=fingerprint_model(model),
    )
