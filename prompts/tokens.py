"""How text becomes token ids, the same way for generation, classification and training.

A target (a training target, a Classify label) is the model's whole answer, so it ends with the
token that ends an answer: the first end-of-sequence id, or with the chat template the template's
end of turn (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), which is what a chat model produces
after an answer. Training and Classify both take it from `target_end_id`, so a prompt is scored
as it was trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from softprompt.prompts.errors import ChatTemplateError

# Assistant content for rendering a turn: plain letters no template trims, escapes or splits.
_PROBE = "softpromptendofturnprobe"


def _require_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"the base model's tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template: "
            "send the input without apply_chat_template, formatted as the model expects"
        )


def encode_input(tokenizer: Any, text: str, *, chat: bool = False) -> list[int]:
    """Token ids of an input: wrapped as a user turn by the chat template if asked, else the tokenizer's defaults."""
    if chat:
        return encode_messages(tokenizer, [("user", text)])
    return list(tokenizer(text).input_ids)


def encode_messages(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Token ids of a conversation of (role, content) turns through the chat template, ready for the
    assistant's answer (the template's generation prompt appended)."""
    _require_chat_template(tokenizer)
    text = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_target(tokenizer: Any, text: str, end_id: int) -> list[int]:
    """Token ids of an output the model should produce, ended by `end_id` (see `target_end_id`)."""
    return [*tokenizer(text, add_special_tokens=False).input_ids, end_id]


def eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """Every id that ends a generation, in order: the generation config's (one id or a list), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    if not ids:
        raise ValueError("the base model has no end-of-sequence token; softprompt needs one to end outputs")
    return tuple(dict.fromkeys(int(i) for i in ids))


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the special tokens, which decoding with `skip_special_tokens=True` leaves out."""
    added = getattr(tokenizer, "added_tokens_decoder", {})  # a bare decoder (anything with `decode`) has none
    ids = {int(i) for i, token in added.items() if token.special}
    return ids | {int(i) for i in getattr(tokenizer, "all_special_ids", ())}


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts after an assistant message's content, or None if it puts none.

    The rule: render a user turn and an assistant turn whose content is a probe word, and take the
    first special token after the probe. That is the token a chat model emits to end its answer;
    text the template adds between the content and it (Llama 2's space) or after it (ChatML's
    newline) is formatting around the turn, not part of the answer. A template that ends turns with
    plain text only gives None: the model then ends its answer with end-of-sequence.
    """
    _require_chat_template(tokenizer)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja raises its own errors, and templates raise on conversations they reject
        raise ChatTemplateError(
            f"the base model's chat template cannot render an assistant turn ({exc}), so its end of turn is "
            "unknown: send the request (or train) without apply_chat_template"
        ) from exc
    at = text.rfind(_PROBE)
    if at < 0:
        raise ChatTemplateError(
            "the base model's chat template drops an assistant turn's content, so its end of turn is unknown: "
            "send the request (or train) without apply_chat_template"
        )
    special = special_token_ids(tokenizer)
    after = tokenizer(text[at + len(_PROBE):], add_special_tokens=False).input_ids
    return next((int(i) for i in after if int(i) in special), None)


def target_end_id(model: Any, tokenizer: Any, *, chat: bool) -> int:
    """The id that ends a target: the chat template's end of turn in chat mode (when it has one), else the first
    end-of-sequence id."""
    turn = end_of_turn_id(tokenizer) if chat else None
    return eos_token_ids(model, tokenizer)[0] if turn is None else turn
