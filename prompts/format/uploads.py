"""Parsing uploads: an uploaded PEFT adapter or raw matrix, checked and turned into a `PromptTensor`.

Every PEFT prompt-learning adapter is taken (`methods.peft_types`): PROMPT_TUNING and P_TUNING as saved,
MULTITASK_PROMPT_TUNING (one task, named by `task_id`) and CPT materialized into the prompt PEFT would
prepend, PREFIX_TUNING and CARTRIDGE as keys and values checked against the base model's KV layout;
anything else is refused with the reason.

Uploaded bytes are untrusted: they are parsed only as safetensors, never unpickled, and every failure is
reported as an `InvalidPromptError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import BaseModelMismatchError, InvalidPromptError
from softprompt.prompts.format.layout import PEFT_WEIGHTS, TENSOR_NAME
from softprompt.prompts.format.tensor import FLOAT_DTYPES, PromptTensor, check_rows_and_width, validate_embeddings
from softprompt.prompts.methods import cpt, multitask, prefix_tuning
from softprompt.prompts.methods.peft_types import FIX_TYPES, SERVED, describe_unserved

_FIX_UPLOAD = "upload the adapter_config.json and adapter_model.safetensors that PEFT's save_pretrained wrote"


def _describe_base(base: BaseModelSpec) -> str:
    return f"{base.model_id} (hidden size {base.hidden_size}, {base.num_layers} layers, fingerprint {base.fingerprint})"


def _check_num_layers(config_num_layers: Any, base: BaseModelSpec, *, force: bool) -> None:
    # A layer count is only recorded by PEFT, it does not shape the tensor; it is a cheap signal that the
    # adapter was trained on another model even when the hidden sizes happen to agree.
    if config_num_layers is None or force:
        return
    if config_num_layers != base.num_layers:
        raise BaseModelMismatchError(
            f"the prompt was made for another base model: its adapter_config.json says num_layers="
            f"{config_num_layers}, but this server serves {_describe_base(base)}: register a prompt trained "
            f"on this base model, or pass force=True (CLI: --force) to register it anyway"
        )


def _parse_config(config_json: str | bytes) -> dict[str, Any]:
    if isinstance(config_json, (bytes, bytearray, memoryview)):
        try:
            config_json = bytes(config_json).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidPromptError(f"adapter_config.json is not UTF-8 text ({e}): {_FIX_UPLOAD}") from None
    if not isinstance(config_json, str):
        raise InvalidPromptError(f"adapter_config.json must be text, got {type(config_json).__name__}: {_FIX_UPLOAD}")
    if not config_json.strip():
        raise InvalidPromptError(f"adapter_config.json is empty: {_FIX_UPLOAD}")
    try:
        config = json.loads(config_json)
    except (ValueError, RecursionError) as e:  # ValueError: also integers past Python's 4300-digit limit
        raise InvalidPromptError(f"adapter_config.json is not valid JSON ({e}): {_FIX_UPLOAD}") from None
    if not isinstance(config, dict):
        raise InvalidPromptError(
            f"adapter_config.json must be a JSON object, got a JSON {type(config).__name__}: {_FIX_UPLOAD}"
        )
    return config


def _check_peft_type(config: Mapping[str, Any]) -> str:
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InvalidPromptError(
            f"adapter_config.json has no peft_type: only PEFT prompt-learning adapters ({FIX_TYPES}) can be "
            f"registered; {_FIX_UPLOAD}"
        )
    if not isinstance(peft_type, str):
        # Checked before the table lookup below, which a list or object (unhashable) would crash.
        raise InvalidPromptError(
            f"peft_type {peft_type!r:.80} is not a soft prompt: adapter_config.json must name \"PROMPT_TUNING\", "
            f"\"P_TUNING\" or another prompt-learning type ({FIX_TYPES}) as a string; {_FIX_UPLOAD}"
        )
    if peft_type in SERVED:
        return peft_type
    raise InvalidPromptError(describe_unserved(peft_type))


def _check_int_field(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPromptError(
            f"adapter_config.json field {key} must be an integer, got {value!r}: {_FIX_UPLOAD}"
        )
    return value


def _load_tensors(weights: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    if not isinstance(weights, (bytes, bytearray, memoryview)):
        raise InvalidPromptError(f"{what} must be bytes, got {type(weights).__name__}")
    data = bytes(weights)
    if not data:
        raise InvalidPromptError(f"{what} is empty: {_FIX_UPLOAD}")
    try:
        return load_safetensors(data)
    except Exception as e:  # the parser's errors are not a stable API; any failure means bad bytes
        # Recognising what people upload by mistake lets the message name the fix; the bytes are still
        # only ever parsed as safetensors, never opened as what they look like.
        if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":
            raise InvalidPromptError(
                f"{what} is not safetensors but looks like a pickle / torch.save file (e.g. adapter_model.bin), "
                f"which is never loaded because unpickling can run code: save the adapter with "
                f"safe_serialization=True (PEFT's default) and upload adapter_model.safetensors"
            ) from None
        raise InvalidPromptError(
            f"{what} is not a valid safetensors file ({type(e).__name__}: {e}); it may be truncated or "
            f"not a safetensors file: {_FIX_UPLOAD}"
        ) from None


def _load_single_tensor(weights: bytes, what: str) -> tuple[str, torch.Tensor]:
    tensors = _load_tensors(weights, what)
    if len(tensors) != 1:
        names = ", ".join(sorted(tensors)) or "none"
        raise InvalidPromptError(
            f"{what} holds {len(tensors)} tensors ({names}) but a soft prompt is exactly one tensor "
            f"named {TENSOR_NAME!r}: upload the adapter_model.safetensors of a PROMPT_TUNING or P_TUNING adapter"
        )
    return next(iter(tensors.items()))


def parse_peft_adapter(
    config_json: str | bytes,
    weights: bytes,
    base: BaseModelSpec,
    *,
    max_virtual_tokens: int,
    force: bool = False,
    task_id: int | None = None,
) -> PromptTensor:
    """Parses and validates an uploaded PEFT prompt-learning adapter for `base`.

    `config_json` is the text of ``adapter_config.json``; `weights` the bytes of
    ``adapter_model.safetensors`` (never unpickled). `task_id` names the task of a MULTITASK_PROMPT_TUNING
    adapter (needed when it holds several) and is refused for any other type. Raises `InvalidPromptError`
    for malformed or unservable adapters (a prefix for another model's layers, KV heads or head size
    included) and `BaseModelMismatchError` when an input-level adapter's config records another layer
    count, unless `force`.
    """
    config = _parse_config(config_json)
    peft_type = _check_peft_type(config)
    task_type = config.get("task_type")
    if task_type is not None and task_type != "CAUSAL_LM":
        raise InvalidPromptError(
            f"the adapter's task_type is {task_type!r}, but this server serves a causal language model: "
            f"train the prompt with task_type='CAUSAL_LM' on this base model"
        )
    submodules = _check_int_field(config, "num_transformer_submodules")
    if submodules is not None and submodules != 1:
        raise InvalidPromptError(
            f"the adapter has num_transformer_submodules={submodules} (one prompt per encoder and decoder "
            f"of an encoder-decoder model); a causal LM takes a single prompt: train a CAUSAL_LM adapter"
        )
    if task_id is not None and peft_type != "MULTITASK_PROMPT_TUNING":
        raise InvalidPromptError(
            f"task_id {task_id!r} applies to MULTITASK_PROMPT_TUNING adapters only, and this one is {peft_type}: "
            f"register it without a task id"
        )
    if SERVED[peft_type][0] == "prefix":
        return prefix_tuning.parse_adapter(config, _load_tensors(weights, PEFT_WEIGHTS), base,
                                           max_virtual_tokens=max_virtual_tokens)
    config_layers = _check_int_field(config, "num_layers")
    if peft_type == "MULTITASK_PROMPT_TUNING":
        prompt = multitask.parse_adapter(config, _load_tensors(weights, PEFT_WEIGHTS), base, task_id=task_id,
                                         max_virtual_tokens=max_virtual_tokens)
        _check_num_layers(config_layers, base, force=force)
        return prompt
    config_rows = _check_int_field(config, "num_virtual_tokens")
    config_width = _check_int_field(config, "token_dim")

    # Any single tensor is accepted: the name is PEFT's convention, the shape is what matters.
    _, tensor = _load_single_tensor(weights, PEFT_WEIGHTS)
    if tensor.dim() == 2:
        rows, width = tensor.shape
        # A config that disagrees with its own weights means the two files come from different adapters.
        if config_rows is not None and config_rows != rows:
            raise InvalidPromptError(
                f"adapter_config.json says num_virtual_tokens={config_rows} but the tensor has {rows} rows: "
                f"the config and weights come from different adapters; upload the pair save_pretrained wrote"
            )
        if config_width is not None and config_width != width:
            raise InvalidPromptError(
                f"adapter_config.json says token_dim={config_width} but the tensor is {width} wide: "
                f"the config and weights come from different adapters; upload the pair save_pretrained wrote"
            )
    if peft_type == "CPT":
        prompt = cpt.parse_adapter(config, tensor, base, max_virtual_tokens=max_virtual_tokens)
        _check_num_layers(config_layers, base, force=force)
        return prompt
    embeddings = validate_embeddings(tensor, base, max_virtual_tokens=max_virtual_tokens)
    _check_num_layers(config_layers, base, force=force)
    init = config.get("prompt_tuning_init") if peft_type == "PROMPT_TUNING" else None
    return PromptTensor(embeddings=embeddings, source_type=peft_type, init=init if isinstance(init, str) else None)


def parse_raw_tensor(
    shape: Sequence[int],
    dtype: str,
    data: bytes,
    base: BaseModelSpec,
    *,
    max_virtual_tokens: int,
) -> PromptTensor:
    """Parses a raw row-major, little-endian ``[num_virtual_tokens, hidden_size]`` matrix.

    `dtype` is "float32", "float16" or "bfloat16"; `data` must hold exactly
    ``prod(shape) * itemsize`` bytes. Raises `InvalidPromptError`.
    """
    shape = list(shape)
    if len(shape) != 2:
        raise InvalidPromptError(
            f"the raw tensor has shape {shape} ({len(shape)} dimension(s)): a soft prompt is a 2-D "
            f"[num_virtual_tokens, hidden_size] matrix (hidden size {base.hidden_size} for {base.model_id})"
        )
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InvalidPromptError(f"the raw tensor shape {shape} must be non-negative integers")
    torch_dtype = FLOAT_DTYPES.get(dtype)
    if torch_dtype is None:
        raise InvalidPromptError(
            f"raw tensor dtype {dtype!r} is not supported: send \"float32\", \"float16\" or \"bfloat16\""
        )
    rows, width = shape
    # Shape checks come before touching the bytes, so a huge claimed shape is refused without allocating.
    check_rows_and_width(rows, width, base, max_virtual_tokens=max_virtual_tokens)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidPromptError(f"raw tensor data must be bytes, got {type(data).__name__}")
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    expected = rows * width * itemsize
    if len(data) != expected:
        raise InvalidPromptError(
            f"the raw tensor data has {len(data)} bytes but shape {shape} of {dtype} needs exactly {expected} "
            f"({rows} x {width} x {itemsize} bytes): send the row-major, little-endian bytes of the whole matrix"
        )
    buf = bytearray(data)  # a private, writable copy: frombuffer shares memory with its buffer
    if sys.byteorder != "little":
        buf = _byteswap(buf, itemsize)
    tensor = torch.frombuffer(buf, dtype=torch_dtype).reshape(rows, width)
    embeddings = validate_embeddings(tensor, base, max_virtual_tokens=max_virtual_tokens)
    return PromptTensor(embeddings=embeddings, source_type="RAW")


def _byteswap(buf: bytearray, itemsize: int) -> bytearray:
    import numpy as np

    swapped = np.frombuffer(bytes(buf), dtype=np.uint8).reshape(-1, itemsize)[:, ::-1]
    return bytearray(swapped.tobytes())
