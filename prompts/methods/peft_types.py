"""Every PEFT ``peft_type`` an uploaded adapter may name, and what this server does with it.

PEFT's prompt-learning methods differ in what they store, not in what a served request needs: all of them
end up as positions in front of the input, either virtual-token embeddings or keys and values in every
layer's KV cache. `SERVED` maps each type this server takes to that form; `REFUSED` says why the rest
cannot be served and what to use instead. Torch-free.
"""

from __future__ import annotations

# peft_type -> how it is served ("prompt": input embeddings, "prefix": per-layer keys and values) and what
# registration does with it.
SERVED: dict[str, tuple[str, str]] = {
    "PROMPT_TUNING": ("prompt", "its prompt_embeddings matrix, as saved"),
    "P_TUNING": ("prompt", "the saved prompt encoder's output, prepended as prompt tuning"),
    "MULTITASK_PROMPT_TUNING": ("prompt", "one task's prompt, shared prompt x (task columns @ task rows)"),
    "CPT": ("prompt", "the saved context-aware prompt (token embeddings plus their learned deltas)"),
    "PREFIX_TUNING": ("prefix", "its keys and values per layer, written into each row's KV blocks"),
    "CARTRIDGE": ("prefix", "its keys and values per layer, written into each row's KV blocks"),
}

# Prompt-style methods PEFT has that change the model's layers rather than what precedes the input.
REFUSED: dict[str, str] = {
    "ADAPTION_PROMPT": (
        "an adaption-prompt (LLaMA-Adapter) adapter adds learned prompt keys and values inside the top attention "
        "layers through a zero-initialized gate and its own attention term, which changes those layers' "
        "computation rather than what precedes the input, so it cannot be served from a KV cache; train a "
        "PREFIX_TUNING adapter (PrefixTuningConfig, keys and values in every layer) or a PROMPT_TUNING one instead"
    ),
}

FIX_TYPES = ", ".join(SERVED)


def describe_unserved(peft_type: str) -> str:
    """Why an adapter of `peft_type` (not in SERVED) cannot be registered, and what to use instead."""
    if peft_type in REFUSED:
        return f"peft_type {peft_type!r} is not supported: {REFUSED[peft_type]}"
    return (
        f"peft_type {peft_type!r} is not a soft prompt (it changes the model's weights or layers, not what "
        f"precedes the input): only PEFT's prompt-learning adapters ({FIX_TYPES}) can be registered"
    )
