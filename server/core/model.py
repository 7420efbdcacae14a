"""The loaded base model as the serving core sees it: a frozen causal LM, its tokenizer and identity.

Loading it (a Hugging Face id or folder, or the embedded default) is wiring: see `server/app/loading.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from softprompt.prompts.base import BaseModelSpec


@dataclass
class BaseModel:
    """A loaded, frozen causal LM with its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: BaseModelSpec
    device: torch.device
    dtype: torch.dtype

    @property
    def max_sequence_length(self) -> int:
        """The longest sequence (virtual + input + generated tokens) the model's positions cover."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on accelerators, float32 on CPU (CPU bf16 matmuls are slow and less exact)."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16
