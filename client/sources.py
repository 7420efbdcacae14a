"""Reading a prompt to register from disk or memory, with the standard library only.

A prompt comes as (a) a PEFT `save_pretrained` directory, (b) a single-tensor .safetensors file or
(c) an in-memory tensor-like object (torch tensor, numpy array). The safetensors header is parsed
by hand and tensors are handled by duck typing, so registering never imports torch or numpy here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

__all__ = [
    "PeftFiles",
    "RawMatrix",
    "PromptSource",
    "load_source",
    "read_peft_dir",
    "read_safetensors_matrix",
    "tensor_to_matrix",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_MODEL = "adapter_model.safetensors"
# Written next to a PEFT adapter by softprompt tooling to record the base model it was made for.
SOFTPROMPT_META = "softprompt.json"

# safetensors dtype tag -> (proto RawTensor.dtype, bytes per element)
_SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
}
# A header larger than this is certainly not a single-matrix prompt; refuse before reading it.
_MAX_HEADER_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class PeftFiles:
    """The files of a PEFT adapter directory, ready to upload."""

    adapter_config_json: str
    adapter_model_safetensors: bytes
    base_model_fingerprint: str = ""


@dataclass(frozen=True)
class RawMatrix:
    """A [num_virtual_tokens, hidden_size] matrix as row-major little-endian bytes."""

    shape: tuple[int, int]
    dtype: str  # "float32", "float16" or "bfloat16"
    data: bytes


PromptSource = Union[str, "os.PathLike[str]", Any]


def load_source(source: PromptSource) -> PeftFiles | RawMatrix:
    """Reads a prompt from a PEFT directory, a .safetensors file or a tensor-like object.

    Raises:
        FileNotFoundError: the path does not exist or the directory lacks the adapter files.
        ValueError: the file or object is not a single 2-D float matrix.
        TypeError: the object is neither a path nor tensor-like.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return read_peft_dir(path)
        if path.is_file():
            return read_safetensors_matrix(path)
        raise FileNotFoundError(f"no such file or directory: {path}")
    return tensor_to_matrix(source)


def read_peft_dir(path: Path) -> PeftFiles:
    """Reads adapter_config.json, adapter_model.safetensors and the optional softprompt.json."""
    config_path, model_path = path / ADAPTER_CONFIG, path / ADAPTER_MODEL
    for required in (config_path, model_path):
        if not required.is_file():
            raise FileNotFoundError(
                f"{path} is not a PEFT adapter directory: {required.name} is missing "
                f"(expected the output of save_pretrained with safetensors serialization)"
            )
    config_json = config_path.read_text(encoding="utf-8")
    _parse_json_object(config_json, config_path)  # fail here, not after a large upload
    return PeftFiles(
        adapter_config_json=config_json,
        adapter_model_safetensors=model_path.read_bytes(),
        base_model_fingerprint=_recorded_fingerprint(path / SOFTPROMPT_META),
    )


def _recorded_fingerprint(meta_path: Path) -> str:
    if not meta_path.is_file():
        return ""
    meta = _parse_json_object(meta_path.read_text(encoding="utf-8"), meta_path)
    fingerprint = meta.get("base_model_fingerprint", "")
    if not isinstance(fingerprint, str):
        raise ValueError(f"{meta_path}: base_model_fingerprint must be a string")
    return fingerprint


def _parse_json_object(text: str, origin: Path) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{origin} must hold a JSON object")
    return value


def read_safetensors_matrix(path: Path) -> RawMatrix:
    """Reads the one 2-D float tensor of a .safetensors file (8-byte length + JSON header + data)."""
    with open(path, "rb") as f:
        header, data_start = _read_safetensors_header(f, path)
        name, entry = _single_tensor(header, path)
        dtype, itemsize = _tensor_dtype(entry, name, path)
        shape = _matrix_shape(entry.get("shape"), name, path)
        start, end = _data_offsets(entry, name, path)
        if end - start != shape[0] * shape[1] * itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, shape says otherwise")
        f.seek(data_start + start)
        data = f.read(end - start)
    if len(data) != end - start:
        raise ValueError(f"{path}: file is truncated")
    return RawMatrix(shape=shape, dtype=dtype, data=data)


def _read_safetensors_header(f: Any, path: Path) -> tuple[dict[str, Any], int]:
    """Returns the JSON header and the file offset where the data section starts."""
    prefix = f.read(8)
    if len(prefix) != 8:
        raise ValueError(f"{path} is not a safetensors file (too short)")
    length = int.from_bytes(prefix, "little")
    if length > _MAX_HEADER_BYTES:
        raise ValueError(f"{path} is not a safetensors file (header length {length})")
    raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8")) if len(raw) == length else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (bad header)")
    return header, 8 + length


def _single_tensor(header: dict[str, Any], path: Path) -> tuple[str, dict[str, Any]]:
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if len(tensors) != 1:
        names = ", ".join(sorted(tensors)) or "none"
        raise ValueError(f"{path} holds {len(tensors)} tensors ({names}); expected exactly one")
    name, entry = next(iter(tensors.items()))
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: bad header entry for tensor {name!r}")
    return name, entry


def _tensor_dtype(entry: dict[str, Any], name: str, path: Path) -> tuple[str, int]:
    tag = entry.get("dtype")
    if tag not in _SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor {name!r} has dtype {tag}; expected F32, F16 or BF16")
    return _SAFETENSORS_DTYPES[tag]


def _matrix_shape(shape: Any, name: str, path: Path) -> tuple[int, int]:
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise ValueError(
            f"{path}: tensor {name!r} has shape {shape}; expected [num_virtual_tokens, hidden_size]"
        )
    return shape[0], shape[1]


def _data_offsets(entry: dict[str, Any], name: str, path: Path) -> tuple[int, int]:
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {offsets}")
    return offsets[0], offsets[1]


def tensor_to_matrix(tensor: Any) -> RawMatrix:
    """Converts a 2-D torch tensor or numpy array to float32 bytes, by duck typing.

    Raises:
        TypeError: the object is not tensor-like.
        ValueError: it is not 2-D.
    """
    if hasattr(tensor, "detach"):
        # torch: leave the autograd graph, copy to host, and upcast (numpy has no bfloat16).
        tensor = tensor.detach().cpu().float().numpy()
    if not (hasattr(tensor, "shape") and hasattr(tensor, "astype")):
        raise TypeError(
            f"cannot register a {type(tensor).__name__}: expected a path (PEFT directory or "
            ".safetensors file), a torch tensor or a numpy array"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"expected a [num_virtual_tokens, hidden_size] matrix, got shape {shape}")
    # astype copies to a C-contiguous array, so tobytes() is row-major whatever the input's strides.
    data = tensor.astype("<f4").tobytes()
    return RawMatrix(shape=(shape[0], shape[1]), dtype="float32", data=data)
