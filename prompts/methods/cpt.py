"""CPT (context-aware prompt tuning, Blau et al. 2025): the prompt PEFT prepends, checked.

A CPT adapter's virtual tokens start as the embeddings of in-context examples (``cpt_token_ids``) and learn
bounded deltas; PEFT's ``save_pretrained`` writes their sum, ``prompt_embeddings`` ``[num_virtual_tokens,
hidden]``, which is exactly what its forward prepends at inference (CPT's own loss and masks matter only in
training). Registration keeps that matrix as a PROMPT_TUNING prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import InvalidPromptError
from softprompt.prompts.format.tensor import PromptTensor, validate_embeddings


def parse_adapter(config: Mapping[str, Any], tensor: torch.Tensor, base: BaseModelSpec, *,
                  max_virtual_tokens: int) -> PromptTensor:
    """A CPT adapter's saved prompt, checked against its config and `base`; `InvalidPromptError` if not."""
    token_ids = config.get("cpt_token_ids")
    if token_ids is not None:
        if not isinstance(token_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in token_ids):
            raise InvalidPromptError(f"adapter_config.json field cpt_token_ids must be a list of token ids, got "
                                     f"{token_ids!r:.80}")
        if tensor.dim() == 2 and len(token_ids) != tensor.shape[0]:
            raise InvalidPromptError(
                f"adapter_config.json lists {len(token_ids)} cpt_token_ids but the tensor has {tensor.shape[0]} "
                f"rows: a CPT prompt has one virtual token per context token; upload the pair save_pretrained wrote"
            )
    embeddings = validate_embeddings(tensor, base, max_virtual_tokens=max_virtual_tokens)
    return PromptTensor(embeddings=embeddings, source_type="CPT")
