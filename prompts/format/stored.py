"""The stored form of a prompt version: its files (see `layout`) as bytes, read back, and exported as a folder.

Building: `adapter_files`, `metadata_bytes` and `report_bytes` give the bytes the store keeps by name.
Reading: `parse_metadata` and `parse_embeddings` check what comes back, and report damage as a
`CorruptPromptError` that says how to recover. Exporting: `write_peft_folder` writes the files as a folder
PEFT loads as-is.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import CorruptPromptError
from softprompt.prompts.format.layout import ATTACHMENTS, PEFT_CONFIG, PEFT_WEIGHTS, TENSOR_NAME
from softprompt.prompts.format.tensor import PromptTensor

# How to recover from any damage to a stored version.
_FIX_STORED = "delete this version and register the prompt again"


@functools.lru_cache(maxsize=1)
def _peft_version() -> str | None:
    # Cached: reading a distribution's metadata parses files (about 1.5 ms), and every registration asks.
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("peft")
    except PackageNotFoundError:
        # PEFT fills in its own version for a null peft_version when it loads the config.
        return None


def peft_config_for(prompt: PromptTensor, base: BaseModelSpec) -> dict[str, Any]:
    """The ``adapter_config.json`` for a stored version: a PEFT config for `base` that loads it as it serves.

    Input-level prompts are stored as PROMPT_TUNING: a P-tuning adapter's saved tensor is already its
    encoder's output, and a multitask (one task's) or CPT prompt is materialized at registration, so the
    plain embedding table reproduces each exactly. ``prompt_tuning_init`` is "RANDOM" because the stored
    weights replace the initial values on load, and "TEXT" would need a tokenizer at load time. KV-level
    prompts keep their type (PREFIX_TUNING or CARTRIDGE), their keys and values already materialized
    (``prefix_projection`` off: the stored matrix is the prefix itself). The keys match what PEFT's own
    ``save_pretrained`` writes.
    """
    if prompt.layout is not None:
        return _kv_config(prompt, base)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base.model_id,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": base.num_attention_heads,
        "num_layers": base.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "peft_type": "PROMPT_TUNING",
        "peft_version": _peft_version(),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": prompt.hidden_size,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def _kv_config(prompt: PromptTensor, base: BaseModelSpec) -> dict[str, Any]:
    """PREFIX_TUNING or CARTRIDGE: keys and values of `prompt.layout`, as PEFT sizes them for grouped-query
    attention (``num_attention_heads`` = KV heads, ``token_dim`` = KV heads x head size)."""
    layout = prompt.layout
    assert layout is not None
    config: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": base.model_id,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": layout.kv_heads,
        "num_layers": layout.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "peft_type": prompt.source_type,
        "peft_version": _peft_version(),
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": layout.token_dim,
    }
    if prompt.source_type == "CARTRIDGE":
        # Only training reads it (the first tokens stay frozen, an attention sink); PEFT's default.
        config["num_frozen_tokens"] = 1
    else:
        config.update(encoder_hidden_size=layout.token_dim, init_weights=None, prefix_projection=False)
    return config


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def adapter_files(prompt: PromptTensor, base: BaseModelSpec) -> dict[str, bytes]:
    """A version's PEFT adapter by file name: ``adapter_model.safetensors`` and ``adapter_config.json``."""
    from safetensors.torch import save as save_safetensors

    embeddings = prompt.embeddings.detach().to(device="cpu", dtype=torch.float32).contiguous()
    weights = save_safetensors({TENSOR_NAME: embeddings}, metadata={"format": "pt"})
    return {PEFT_WEIGHTS: weights, PEFT_CONFIG: _json_bytes(peft_config_for(prompt, base))}


def metadata_bytes(metadata: Mapping[str, Any]) -> bytes:
    """A version's metadata as stored in ``softprompt.json``."""
    return _json_bytes(metadata)


def report_bytes(report: Mapping[str, Any]) -> bytes:
    """A training report as stored in ``training.json``."""
    return _json_bytes(report)


def check_attachments(files: Mapping[str, bytes]) -> None:
    """Refuses (ValueError) extra files a version may not carry; see `ATTACHMENTS`."""
    for name in files:
        if name not in ATTACHMENTS:
            raise ValueError(f"a version may carry only {', '.join(ATTACHMENTS)}, not {name!r}")


def write_peft_folder(directory: str | Path, files: Mapping[str, bytes]) -> Path:
    """Writes a version's files (name -> bytes) into `directory`, created if missing; returns the folder.

    Files of the same names are replaced. With a version's files, ``PeftModel.from_pretrained(base,
    directory)`` loads the folder as-is.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        (directory / name).write_bytes(data)
    return directory


def parse_metadata(raw: bytes, *, where: str) -> dict[str, Any]:
    """Parses the bytes of ``softprompt.json`` (read from `where`); `CorruptPromptError` if unreadable."""
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptPromptError(f"{where} is damaged ({e}): {_FIX_STORED}") from None
    if not isinstance(metadata, dict):
        raise CorruptPromptError(f"{where} is not a JSON object: {_FIX_STORED}")
    return metadata


def missing_weights_error(where: str) -> CorruptPromptError:
    """The error for a version whose weights file (at `where`) is gone."""
    return CorruptPromptError(f"{where} is missing: {_FIX_STORED}")


def parse_embeddings(data: bytes, expected_sha256: str, *, where: str) -> torch.Tensor:
    """A stored version's prompt matrix from its weights (read from `where`), checked against `expected_sha256`.

    Returns a float32, contiguous 2-D tensor (``[num_virtual_tokens, hidden]``, or a KV-level prompt's
    ``[num_virtual_tokens, num_layers * 2 * token_dim]``). Raises `CorruptPromptError`
    if the bytes differ from their checksum or do not hold one finite 2-D float32 tensor.
    """
    from safetensors.torch import load as load_safetensors

    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise CorruptPromptError(
            f"{where} has sha256 {actual} but the registry recorded {expected_sha256}: the file was modified "
            f"or damaged on disk; {_FIX_STORED}"
        )
    try:
        tensors = load_safetensors(data)
    except Exception as e:  # checksum matched, so the file was written broken; any parser error is corruption
        raise CorruptPromptError(f"{where} cannot be parsed ({type(e).__name__}: {e}): {_FIX_STORED}") from None
    tensor = tensors.get(TENSOR_NAME)
    if len(tensors) != 1 or tensor is None or tensor.dim() != 2 or tensor.dtype != torch.float32:
        raise CorruptPromptError(f"{where} does not hold exactly one 2-D float32 tensor {TENSOR_NAME!r}: {_FIX_STORED}")
    if not bool(torch.isfinite(tensor).all()):
        raise CorruptPromptError(f"{where} holds NaN or Inf values: {_FIX_STORED}")
    return tensor.contiguous()

