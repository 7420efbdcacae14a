"""The PEFT prompt-tuning folder format: parsing uploads, validating tensors, a version's files as bytes.

This is the only module that knows the files of a stored prompt version (the store keeps them by name;
`write_peft_folder` exports them as a folder). A version holds:

- ``adapter_config.json``: a PEFT ``PROMPT_TUNING`` config, so ``PeftModel.from_pretrained(base, folder)``
  loads the folder as-is;
- ``adapter_model.safetensors``: one float32 tensor ``prompt_embeddings`` of shape
  ``[num_virtual_tokens, hidden_size]`` (metadata ``{"format": "pt"}``, as PEFT writes it);
- ``softprompt.json``: softprompt's own metadata (name, version, checksum, provenance);
- trained versions only: ``training.json`` (the run's report) and ``loss.png`` (its loss curve).

Uploaded bytes are untrusted: they are parsed only as safetensors, never unpickled, and every failure is
reported as an `InvalidPromptError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import BaseModelMismatchError, CorruptPromptError, InvalidPromptError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
METADATA = "softprompt.json"
TRAINING_REPORT = "training.json"
LOSS_PLOT = "loss.png"
# Files a version may carry besides the adapter and its metadata.
ATTACHMENTS = (TRAINING_REPORT, LOSS_PLOT)
TENSOR_NAME = "prompt_embeddings"

SOURCE_TYPES = ("PROMPT_TUNING", "P_TUNING", "RAW")

# Only these reach the model: they are what PEFT itself saves, and a cast to float32 is exact for all three.
_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}

# peft_type values PEFT uses for adapters that are not input-embedding soft prompts, with the reason.
_NOT_A_SOFT_PROMPT = {
    "PREFIX_TUNING": (
        "a prefix-tuning adapter stores per-layer attention keys and values for the KV cache, not input "
        "embeddings, so it cannot be served as a soft prompt"
    ),
    "CARTRIDGE": (
        "a cartridge adapter stores per-layer attention keys and values for the KV cache, not input "
        "embeddings, so it cannot be served as a soft prompt"
    ),
    "MULTITASK_PROMPT_TUNING": (
        "a multitask prompt-tuning adapter computes its prompt from shared and per-task factors at run time"
    ),
    "ADAPTION_PROMPT": "an adaption-prompt (LLaMA-Adapter) adapter injects gated prompts inside attention layers",
}

_FIX_UPLOAD = "upload the adapter_config.json and adapter_model.safetensors that PEFT's save_pretrained wrote"


@dataclass(frozen=True, eq=False)
class PromptTensor:
    """A validated soft prompt, ready to store or serve.

    `embeddings` is the matrix prepended to the input embeddings: ``[num_virtual_tokens, hidden]``,
    float32, on the CPU, contiguous and finite. `source_type` records what it was uploaded as
    ("PROMPT_TUNING", "P_TUNING" or "RAW"); `init` is PEFT's ``prompt_tuning_init`` when known.
    """

    embeddings: torch.Tensor
    source_type: str
    init: str | None = None

    def __post_init__(self) -> None:
        if self.source_type not in SOURCE_TYPES:
            raise ValueError(f"source_type must be one of {', '.join(SOURCE_TYPES)}, got {self.source_type!r}")

    @property
    def num_virtual_tokens(self) -> int:
        """Rows of the prompt matrix."""
        return int(self.embeddings.shape[0])

    @property
    def hidden_size(self) -> int:
        """Columns of the prompt matrix (the base model's hidden size)."""
        return int(self.embeddings.shape[1])


# ---------------------------------------------------------------- validation


def _describe_base(base: BaseModelSpec) -> str:
    return f"{base.model_id} (hidden size {base.hidden_size}, {base.num_layers} layers, fingerprint {base.fingerprint})"


def _check_rows_and_width(rows: int, width: int, base: BaseModelSpec, *, max_virtual_tokens: int) -> None:
    if rows < 1:
        raise InvalidPromptError(
            "the prompt tensor has no virtual tokens (0 rows): train or export a prompt with at least 1 token"
        )
    if rows > max_virtual_tokens:
        raise InvalidPromptError(
            f"the prompt has {rows} virtual tokens but this server accepts at most {max_virtual_tokens}: "
            f"use a prompt with fewer virtual tokens or raise the server's max_virtual_tokens limit"
        )
    if width != base.hidden_size:
        raise InvalidPromptError(
            f"tensor width {width} does not match the base model's hidden size {base.hidden_size} "
            f"({base.model_id}): train the prompt on this base model"
        )


def validate_embeddings(t: torch.Tensor, base: BaseModelSpec, *, max_virtual_tokens: int) -> torch.Tensor:
    """Checks that `t` can serve as a soft prompt for `base` and returns it as float32, CPU, contiguous.

    The result never shares memory with `t`. Raises `InvalidPromptError` for a tensor that is not 2-D,
    not float32/float16/bfloat16, has no rows or more than `max_virtual_tokens`, has a width other than
    the base model's hidden size, or holds NaN/Inf values.
    """
    if max_virtual_tokens < 1:
        raise ValueError(f"max_virtual_tokens must be at least 1, got {max_virtual_tokens}")
    if not isinstance(t, torch.Tensor):
        raise InvalidPromptError(
            f"the prompt is a {type(t).__name__}, not a tensor: provide a [num_virtual_tokens, hidden_size] matrix"
        )
    shape = list(t.shape)
    if t.dim() != 2:
        raise InvalidPromptError(
            f"the prompt tensor has {t.dim()} dimension(s), shape {shape}: a soft prompt is a 2-D "
            f"[num_virtual_tokens, hidden_size] matrix (hidden size {base.hidden_size} for {base.model_id})"
        )
    if t.dtype not in _DTYPE_NAMES:
        raise InvalidPromptError(
            f"the prompt tensor has dtype {str(t.dtype).removeprefix('torch.')}: soft prompts must be "
            f"float32, float16 or bfloat16; convert it (e.g. tensor.float()) and upload again"
        )
    _check_rows_and_width(shape[0], shape[1], base, max_virtual_tokens=max_virtual_tokens)
    out = t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(out).sum())
        n_inf = int(torch.isinf(out).sum())
        first_row = int((~finite).any(dim=1).nonzero()[0, 0])
        what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        raise InvalidPromptError(
            f"the prompt tensor holds {what} value(s) (first in virtual token {first_row}): "
            f"the prompt diverged or was exported wrongly; retrain or re-export it with finite values"
        )
    return out


class StoredPrompt(Protocol):
    """What `check_base_model` reads of a stored version (a `registry.PromptVersion`)."""

    @property
    def ref(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def base_model_fingerprint(self) -> str: ...
    @property
    def base_model_id(self) -> str: ...


def check_base_model(prompt: str | StoredPrompt, base: BaseModelSpec, *, force: bool = False) -> None:
    """Refuses a prompt made for another base model than `base`, unless `force`; raises `BaseModelMismatchError`.

    The one compatibility rule, for both moments a prompt meets the base model. `prompt` is either the
    fingerprint an upload claims (empty means "unknown" and is accepted; the message offers `force`), or a
    stored version about to be served: its width must be the model's hidden size and the fingerprint it
    recorded (empty: unknown) must be the model's.
    """
    if isinstance(prompt, str):
        if prompt and not force and prompt != base.fingerprint:
            raise BaseModelMismatchError(
                f"the prompt was made for the base model with fingerprint {prompt}, but this server "
                f"serves {base.model_id} with fingerprint {base.fingerprint}: register a prompt trained on this "
                f"base model, or pass force=True (CLI: --force) to register it anyway"
            )
        return
    # A wrong width cannot be served whatever `force` says.
    if prompt.hidden_size != base.hidden_size:
        raise BaseModelMismatchError(
            f"{prompt.ref} has width {prompt.hidden_size} but this server's base model {base.model_id} has "
            f"hidden size {base.hidden_size}: serve it with the base model it was trained for"
        )
    if prompt.base_model_fingerprint and not force and prompt.base_model_fingerprint != base.fingerprint:
        # Registration records the serving model's fingerprint, so only a store shared with another
        # base model lands here.
        raise BaseModelMismatchError(
            f"{prompt.ref} was made for base model {prompt.base_model_id or '?'} (fingerprint "
            f"{prompt.base_model_fingerprint}), but this server runs {base.model_id} (fingerprint "
            f"{base.fingerprint}): re-register it here with force, or serve it with its own base model"
        )


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


# ---------------------------------------------------------------- parsing uploads


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
            f"adapter_config.json has no peft_type: only PEFT PROMPT_TUNING and P_TUNING adapters can be "
            f"registered; {_FIX_UPLOAD}"
        )
    if not isinstance(peft_type, str):
        # Checked before the table lookup below, which a list or object (unhashable) would crash.
        raise InvalidPromptError(
            f"peft_type {peft_type!r:.80} is not a soft prompt: adapter_config.json must name \"PROMPT_TUNING\" or "
            f"\"P_TUNING\" as a string; {_FIX_UPLOAD}"
        )
    if peft_type in ("PROMPT_TUNING", "P_TUNING"):
        return peft_type
    if peft_type in _NOT_A_SOFT_PROMPT:
        raise InvalidPromptError(
            f"peft_type {peft_type!r} is not supported: {_NOT_A_SOFT_PROMPT[peft_type]}; "
            f"train a PROMPT_TUNING (PromptTuningConfig) or P_TUNING (PromptEncoderConfig) adapter instead"
        )
    raise InvalidPromptError(
        f"peft_type {peft_type!r} is not a soft prompt (it changes the model's weights or layers, not its input "
        f"embeddings): only PROMPT_TUNING (PromptTuningConfig) and P_TUNING (PromptEncoderConfig) adapters "
        f"can be registered"
    )


def _check_int_field(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPromptError(
            f"adapter_config.json field {key} must be an integer, got {value!r}: {_FIX_UPLOAD}"
        )
    return value


def _load_single_tensor(weights: bytes, what: str) -> tuple[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    if not isinstance(weights, (bytes, bytearray, memoryview)):
        raise InvalidPromptError(f"{what} must be bytes, got {type(weights).__name__}")
    data = bytes(weights)
    if not data:
        raise InvalidPromptError(f"{what} is empty: {_FIX_UPLOAD}")
    try:
        tensors = load_safetensors(data)
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
) -> PromptTensor:
    """Parses and validates an uploaded PEFT PROMPT_TUNING or P_TUNING adapter for `base`.

    `config_json` is the text of ``adapter_config.json``; `weights` the bytes of
    ``adapter_model.safetensors`` (never unpickled). Raises `InvalidPromptError` for malformed or
    unservable adapters and `BaseModelMismatchError` when the config records another layer count,
    unless `force`.
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
    config_rows = _check_int_field(config, "num_virtual_tokens")
    config_width = _check_int_field(config, "token_dim")
    config_layers = _check_int_field(config, "num_layers")

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
    torch_dtype = _FLOAT_DTYPES.get(dtype)
    if torch_dtype is None:
        raise InvalidPromptError(
            f"raw tensor dtype {dtype!r} is not supported: send \"float32\", \"float16\" or \"bfloat16\""
        )
    rows, width = shape
    # Shape checks come before touching the bytes, so a huge claimed shape is refused without allocating.
    _check_rows_and_width(rows, width, base, max_virtual_tokens=max_virtual_tokens)
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


# ---------------------------------------------------------------- writing and reading versions


def _peft_version() -> str | None:
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
    """The ``adapter_config.json`` for a stored version: a PEFT PROMPT_TUNING config for `base`.

    Every source type is stored as PROMPT_TUNING: a P-tuning adapter's saved tensor is already its
    encoder's output, so the plain embedding table reproduces it exactly. ``prompt_tuning_init`` is
    "RANDOM" because the stored weights replace the initial values on load, and "TEXT" would need a
    tokenizer at load time. The keys match what PEFT's own ``save_pretrained`` writes.
    """
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


def write_version_files(directory: str | Path, prompt: PromptTensor, base: BaseModelSpec, metadata: dict) -> str:
    """Writes a complete version folder for `prompt` into `directory` and returns the weights' sha256.

    `metadata` goes into ``softprompt.json`` with the checksum added under "sha256".
    """
    files = adapter_files(prompt, base)
    sha256 = hashlib.sha256(files[PEFT_WEIGHTS]).hexdigest()
    files[METADATA] = metadata_bytes({**metadata, "sha256": sha256})
    write_peft_folder(directory, files)
    return sha256


_FIX_STORED = "delete this version and register the prompt again"


def parse_metadata(raw: bytes, *, where: str) -> dict[str, Any]:
    """Parses the bytes of ``softprompt.json`` (read from `where`); `CorruptPromptError` if unreadable."""
    try:
        metadata = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptPromptError(f"{where} is damaged ({e}): {_FIX_STORED}") from None
    if not isinstance(metadata, dict):
        raise CorruptPromptError(f"{where} is not a JSON object: {_FIX_STORED}")
    return metadata


def read_metadata(directory: str | Path) -> dict[str, Any]:
    """Reads a version folder's ``softprompt.json``; FileNotFoundError if absent, `CorruptPromptError` if damaged."""
    path = Path(directory) / METADATA
    return parse_metadata(path.read_bytes(), where=str(path))


def missing_weights_error(where: str) -> CorruptPromptError:
    """The error for a version whose weights file (at `where`) is gone."""
    return CorruptPromptError(f"{where} is missing: {_FIX_STORED}")


def parse_embeddings(data: bytes, expected_sha256: str, *, where: str) -> torch.Tensor:
    """A stored version's prompt matrix from its weights (read from `where`), checked against `expected_sha256`.

    Returns a float32, contiguous ``[num_virtual_tokens, hidden]`` tensor. Raises `CorruptPromptError`
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


def read_embeddings(directory: str | Path, expected_sha256: str) -> torch.Tensor:
    """`parse_embeddings` of a version folder's weights file; `CorruptPromptError` also if it is missing."""
    path = Path(directory) / PEFT_WEIGHTS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing_weights_error(str(path)) from None
    return parse_embeddings(data, expected_sha256, where=str(path))
