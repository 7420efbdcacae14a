"""Which base models the engine serves exactly: checked once, before the server opens its port.

The engine's contract is the base model's own no-cache forward, token for token, whatever shares a
row's batch. A model it cannot honour is refused at startup with every reason and what would work,
never served with wrong tokens or failed per request. What is refused, and why:

- ALiBi models (Bloom, MPT, Falcon with `alibi`): transformers builds their biases from a 2D
  padding mask (Bloom: its running count) and their forwards take no position ids, while the
  engine's steps pass a prebuilt 4D mask over its KV pool rows and per-row positions; Bloom
  fails every decode step. Serving them would need the decode step to build the biases itself.
- attention implementations other than sdpa and eager: the engine hands attention boolean (sdpa)
  or additive float (eager) 4D masks, which flash-attention and flex-attention kernels do not take.
- rotary scaling recomputed from the batch's positions (transformers' `dynamic_rope_update`):
  `dynamic` rescales once the batch's largest position passes `max_position_embeddings` (below it,
  exactly the `default` frequencies) and does so with a host-side check inside every forward, which
  CUDA graph capture cannot run; `longrope` switches every row to its long factors once any row of
  the batch passes `original_max_position_embeddings`. Every other type (default, linear, llama3,
  yarn, ...) fixes its frequencies from the config at load and is position-independent.
- encoder-decoder, non-causal and multimodal models, forwards without the inputs the engine passes
  (`inputs_embeds`, `attention_mask`, `position_ids`, `logits_to_keep`, a cache), no input
  embedding, a tokenizer with ids past the embedding, no end-of-sequence id, and layer kinds the
  engine's masks do not cover (`masks.MaskLayout`).
- model types outside `families.TESTED_MODEL_TYPES`, unless `allow_untested`: such a model is then
  accepted only if the exactness probe (`probe.py`) finds the engine reproduces it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import PretrainedConfig

from softprompt.prompts.tokens import eos_token_ids
from softprompt.server.core import probe
from softprompt.server.core.errors import UnsupportedModelError
from softprompt.server.core.families import SUPPORTED_ATTENTION, TESTED_MODEL_TYPES
from softprompt.server.core.masks import MaskLayout
from softprompt.server.core.model import BaseModel

ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})
# What the engine passes every forward (kv.forward); the cache goes by either name across transformers 5.
_FORWARD_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "logits_to_keep")
_CACHE_INPUTS = ("cache", "past_key_values")
_MULTIMODAL_PARTS = ("vision_config", "audio_config", "text_config")


def check_servable(base: BaseModel, *, allow_untested: bool = False) -> None:
    """Raises UnsupportedModelError unless the engine serves `base` exactly.

    A model type outside the tested families is refused, or with `allow_untested` accepted only if
    the exactness probe passes. The probe is not run for tested families: the test suite verifies
    them, and on a CPU the probe's seven forwards cost about a second for the default model.
    """
    reasons = unsupported(base)
    family = _untested_family(base.model.config)
    if family and not allow_untested:
        reasons.append(family + ("" if reasons else
                                 "; --allow-untested-model serves it anyway if the startup exactness probe passes"))
    if reasons:
        raise UnsupportedModelError(_refusal(base, reasons))
    if family:
        _run_probe(base)


def unsupported(base: BaseModel) -> list[str]:
    """Every reason, known without running the model, that the engine cannot serve `base` exactly."""
    checks: tuple[Callable[[BaseModel], str | None], ...] = (
        _architecture, _alibi, _attention, _dynamic_rope, _long_rope, _forward_inputs, _embeddings, _end_of_sequence,
        _mask_layout,
    )
    return [reason for check in checks if (reason := check(base)) is not None]


def _run_probe(base: BaseModel) -> None:
    try:
        found = probe.mismatch(base)
    except Exception as exc:  # noqa: BLE001 - any failure of the serving path on this model is a refusal
        raise UnsupportedModelError(_refusal(base, [
            f"the startup exactness probe failed inside the model: {type(exc).__name__}: {exc}"])) from exc
    if found is not None:
        raise UnsupportedModelError(_refusal(base, [
            f"the startup exactness probe found the engine's output differs from the model's own: {found}"]))


def _refusal(base: BaseModel, reasons: list[str]) -> str:
    model_type = getattr(base.model.config, "model_type", "?")
    lines = "\n".join(f"  - {reason}" for reason in reasons)
    return f"cannot serve {base.spec.model_id} (model type {model_type!r}) exactly:\n{lines}"


def _untested_family(config: PretrainedConfig) -> str | None:
    model_type = getattr(config, "model_type", None)
    if model_type in TESTED_MODEL_TYPES:
        return None
    return (f"model type {model_type!r} is not among the families the test suite verifies "
            f"({', '.join(sorted(TESTED_MODEL_TYPES))})")


def _architecture(base: BaseModel) -> str | None:
    config = base.model.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; softprompt serves decoder-only causal language models"
    if getattr(config, "use_bidirectional_attention", False) or getattr(config, "is_causal", True) is False:
        return "its attention is bidirectional; softprompt serves causal language models only"
    parts = [name for name in _MULTIMODAL_PARTS if getattr(config, name, None) is not None]
    if parts:
        return (f"it is a multimodal wrapper ({', '.join(parts)}); serve the text-only causal LM "
                "(a ...ForCausalLM checkpoint of its language model)")
    return None


def _alibi(base: BaseModel) -> str | None:
    config = base.model.config
    attn_config = getattr(config, "attn_config", None)  # MPT's, a dict or a config object
    in_attn_config = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", False)
    if not (config.model_type in ALIBI_MODEL_TYPES or getattr(config, "alibi", False) or in_attn_config):
        return None
    return ("it uses ALiBi position biases, which transformers builds from a 2D padding mask, while the engine's "
            "steps pass a prebuilt 4D mask over their KV pool rows and per-row position ids (Bloom fails every "
            "step); serve a model with rotary or learned positions")


def _attention(base: BaseModel) -> str | None:
    impl = getattr(base.model.config, "_attn_implementation", None) or "sdpa"
    if impl in SUPPORTED_ATTENTION:
        return None
    return (f"attention implementation {impl!r}: the engine passes boolean (sdpa) or additive float (eager) 4D "
            f"masks, which {impl} kernels do not take; load the model with one of {', '.join(SUPPORTED_ATTENTION)} "
            "(softprompt serve --attn-implementation sdpa)")


def _rope_parameters(config: PretrainedConfig) -> list[dict]:
    """The rotary settings in effect: one dict, or one per layer type (Gemma 3); `rope_scaling` before 5.x."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return []
    nested = [p for p in params.values() if isinstance(p, dict)]
    return nested or [params]


def _rope_type(params: dict) -> str:
    return str(params.get("rope_type") or params.get("type") or "default")


def _dynamic_rope(base: BaseModel) -> str | None:
    types = {_rope_type(p) for p in _rope_parameters(base.model.config)}
    dynamic = sorted(t for t in types if "dynamic" in t)
    if not dynamic:
        return None
    return (f"rope_type {dynamic[0]!r} recomputes the rotary frequencies inside every forward from the largest "
            "position of the whole batch, a host-side check CUDA graphs cannot capture; up to "
            "max_position_embeddings (all softprompt serves) it gives exactly the 'default' frequencies, so set "
            "\"rope_type\": \"default\" in the model's config.json to serve it with the same outputs")


def _long_rope(base: BaseModel) -> str | None:
    config = base.model.config
    limit = base.max_sequence_length
    for params in _rope_parameters(config):
        if _rope_type(params) != "longrope":
            continue
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None)
        if original is None or int(original) < limit:
            return (f"rope_type 'longrope' switches every row of a batch to its long factors once any row passes "
                    f"original_max_position_embeddings ({original}), so up to max_position_embeddings ({limit}) a "
                    "row's tokens would depend on its neighbours; set max_position_embeddings to "
                    "original_max_position_embeddings in the model's config.json to serve it with its short "
                    "factors only")
    return None


def _forward_inputs(base: BaseModel) -> str | None:
    params = inspect.signature(type(base.model).forward).parameters
    missing = [name for name in _FORWARD_INPUTS if name not in params]
    if not any(name in params for name in _CACHE_INPUTS):
        missing.append("a KV cache (cache / past_key_values)")
    if not missing:
        return None
    return (f"its forward takes no {', '.join(missing)}; the engine passes soft prompts as inputs_embeds, padding "
            "as attention_mask, each row's own position_ids, and keeps keys and values in a cache")


def _embeddings(base: BaseModel) -> str | None:
    try:
        embedding = base.model.get_input_embeddings()
    except NotImplementedError:
        embedding = None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "it has no input embedding matrix (get_input_embeddings), which soft prompts are made in"
    if len(base.tokenizer) > weight.shape[0]:
        return (f"its tokenizer has {len(base.tokenizer)} tokens but its input embedding only {weight.shape[0]} rows: "
                "ids past them would fail every request that contains them")
    return None


def _end_of_sequence(base: BaseModel) -> str | None:
    try:
        eos_token_ids(base.model, base.tokenizer)
    except ValueError:
        return ("it has no end-of-sequence id (generation_config.eos_token_id or the tokenizer's eos_token); set one "
                "so that outputs can end")
    return None


def _mask_layout(base: BaseModel) -> str | None:
    try:
        MaskLayout.of(base.model)
    except ValueError as exc:
        return str(exc)
    return None
