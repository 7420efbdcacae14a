"""Attention masks in real positions: causal, and windowed on sliding-window layers.

Every forward runs over the KV pool (prefill, chunks, decode steps, Classify scoring, a prompt
prefix's first computation), where a row's columns are its positions, in order, with no gaps: the
mask is a comparison of positions (`over_positions`), and a sliding window is measured in real
positions whatever padding the batch has.

The rule is transformers' own, in positions: a query at position q sees the real keys at positions
k <= q, and on a sliding layer only those with k > q - window (itself and the window - 1 tokens
before it). A padding query also sees a column (column 0), so no row of a
mask is empty: some attention kernels return NaN for an all-masked row, and a NaN in a padding
column poisons real rows (0 * NaN).

`MaskLayout.of` reads the model's window structure once:

- full attention everywhere: one 4D mask;
- every layer sliding (Mistral, Phi-3, Starcoder2, or `layer_types` all sliding): one 4D mask;
- both kinds (`config.layer_types`: Gemma 2/3, Qwen2/3 with `max_window_layers`, Cohere2, ...):
  a dict by layer type, which those models use as it is.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from softprompt.server.core.families import SUPPORTED_ATTENTION

FULL = "full_attention"
SLIDING = "sliding_attention"

Mask = torch.Tensor | dict[str, torch.Tensor]


@dataclass(frozen=True)
class MaskLayout:
    """How a model's layers attend, and the masks its forwards need."""

    window: int | None  # tokens a sliding layer sees, itself included; None without sliding layers
    per_layer_type: bool  # full and sliding layers both occur: masks go as a dict by layer type
    dtype: torch.dtype | None  # None: boolean masks (sdpa); else additive masks in this dtype (eager)
    layer_windows: tuple[int, ...] = ()  # per layer, the window it slides (0: full attention); () none slides

    @classmethod
    def of(cls, model: PreTrainedModel) -> MaskLayout:
        """Reads the window structure from the model's config, as its modeling code decides it.

        Families whose config takes `layer_types` slide on exactly the layers marked so; the others
        apply `sliding_window`, when set, to every layer, whatever `layer_types` a checkpoint carries
        (Mistral's modeling code ignores one).
        """
        config = model.config
        impl = getattr(config, "_attn_implementation", None) or "sdpa"
        dtype = None if impl == "sdpa" else model.dtype
        window = getattr(config, "sliding_window", None)
        declared = "layer_types" in inspect.signature(type(config).__init__).parameters
        layer_types = getattr(config, "layer_types", None) if declared else None
        if layer_types is not None:
            kinds = set(layer_types)
            if not kinds <= {FULL, SLIDING}:
                raise ValueError(f"layer types {sorted(kinds - {FULL, SLIDING})} are not attention this engine "
                                 "masks (only full_attention and sliding_attention)")
            if SLIDING not in kinds:
                return cls(None, False, dtype)
            per_layer_type = FULL in kinds
            windows = tuple(window if kind == SLIDING else 0 for kind in layer_types)
        elif not window:
            return cls(None, False, dtype)
        else:
            per_layer_type = False
            windows = (window,) * config.num_hidden_layers
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding_window {window!r} must be a positive number of tokens")
        if getattr(config, "use_bidirectional_attention", False) or not getattr(config, "is_causal", True):
            raise ValueError("this model's attention is not causal; the engine serves causal language models only")
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"sliding-window masks are built for {' and '.join(SUPPORTED_ATTENTION)} attention, "
                             f"not {impl!r}")
        return cls(window, per_layer_type, dtype, windows)

    def window_of(self, layer: int) -> int:
        """The window layer `layer` slides, in tokens; 0 for full attention."""
        return self.layer_windows[layer] if self.layer_windows else 0

    def over_positions(self, positions: torch.Tensor, width: int) -> Mask:
        """The `attention_mask` of a forward over KV-pool rows (`paged_cache`), whose column j is position j.

        `positions` [rows, queries] is each query's position (a padding query's is 0: it sees column 0).
        Tensor operations only (no host sync), so a CUDA graph captures it and rebuilds it at every replay.
        """
        columns = torch.arange(width, device=positions.device)
        query = positions[:, :, None]
        full = columns <= query  # [rows, queries, width]
        if self.window is None:
            return self._cast(full[:, None])
        sliding = full & (columns > query - self.window)
        if not self.per_layer_type:
            return self._cast(sliding[:, None])
        return {FULL: self._cast(full[:, None]), SLIDING: self._cast(sliding[:, None])}

    def _cast(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean for sdpa; for eager, 0 where allowed and the dtype's minimum elsewhere (as transformers)."""
        if self.dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)
