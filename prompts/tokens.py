"""How text becomes token ids, the same way for generation, classification and training."""

from __future__ import annotations

from typing import Any

from softprompt.prompts.errors import ChatTemplateError


def encode_input(tokenizer: Any, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of an input: wrapped as a user turn by the chat template if asked, else the tokenizer's defaults."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"the base model's tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template: "
                "send the input without apply_chat_template, formatted as the model expects"
            )
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(text).input_ids)


def encode_target(tokenizer: Any, text: str, eos_id: int) -> list[int]:
    """Token ids of an output the model should produce, ended by end-of-sequence (as a finished generation is)."""
    return [*tokenizer(text, add_special_tokens=False).input_ids, eos_id]


def eos_token_id(model: Any, tokenizer: Any) -> int:
    """The id that ends a generation: the model's first eos id, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the base model has no end-of-sequence token; softprompt needs one to end outputs")
    return int(eos)
