"""`PromptTensor`, a validated soft prompt, and the checks every prompt passes against the base model.

A prompt is served in one of two ways (its `method`):

- "prompt": virtual-token embeddings ``[num_virtual_tokens, hidden]`` put in front of the input's embeddings
  (PEFT's PROMPT_TUNING and P_TUNING, and MULTITASK_PROMPT_TUNING and CPT materialized at registration);
- "prefix": keys and values for every layer's KV cache, ``[num_virtual_tokens, num_layers * 2 * token_dim]``
  as PEFT stores them (PREFIX_TUNING, CARTRIDGE), shaped by the base model's `KvLayout`.

Whatever a prompt arrives as (an upload, a training run, a stored version), it reaches the model only
through `validate_embeddings` or `validate_kv_prefix` (shape, dtype, limits, finite values; `revalidate`
picks by method) and `check_base_model` (made for this base model). Failures are an `InvalidPromptError`
or `BaseModelMismatchError` whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from softprompt.prompts.base import BaseModelSpec, KvLayout
from softprompt.prompts.errors import BaseModelMismatchError, InvalidPromptError
from softprompt.prompts.options import METHOD_PREFIX, METHOD_PROMPT

# What a prompt was uploaded or made as. The KV-level ones are served as "prefix", the others as "prompt".
SOURCE_TYPES = ("PROMPT_TUNING", "P_TUNING", "RAW", "MULTITASK_PROMPT_TUNING", "CPT", "PREFIX_TUNING", "CARTRIDGE")
KV_SOURCE_TYPES = ("PREFIX_TUNING", "CARTRIDGE")

# Only these reach the model: they are what PEFT itself saves, and a cast to float32 is exact for all three.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}


@dataclass(frozen=True, eq=False)
class PromptTensor:
    """A validated soft prompt, ready to store or serve.

    `embeddings` is the one matrix PEFT saves as ``prompt_embeddings``, float32, on the CPU, contiguous and
    finite: for an input-level prompt (`layout` None) the matrix prepended to the input embeddings,
    ``[num_virtual_tokens, hidden]``; for a KV-level prompt (`layout` set) its keys and values,
    ``[num_virtual_tokens, layout.width]``. `source_type` records what it was uploaded or made as (see
    `SOURCE_TYPES`); `init` is PEFT's ``prompt_tuning_init`` when known; `task_id` the task of a
    MULTITASK_PROMPT_TUNING adapter whose prompt this is.
    """

    embeddings: torch.Tensor
    source_type: str
    init: str | None = None
    layout: KvLayout | None = None
    task_id: int | None = None

    def __post_init__(self) -> None:
        if self.source_type not in SOURCE_TYPES:
            raise ValueError(f"source_type must be one of {', '.join(SOURCE_TYPES)}, got {self.source_type!r}")
        if (self.source_type in KV_SOURCE_TYPES) != (self.layout is not None):
            raise ValueError(f"a {self.source_type} prompt {'needs' if self.layout is None else 'takes no'} KvLayout")

    @property
    def method(self) -> str:
        """How it is served: "prompt" (input embeddings) or "prefix" (keys and values)."""
        return METHOD_PROMPT if self.layout is None else METHOD_PREFIX

    @property
    def num_virtual_tokens(self) -> int:
        """Rows of the prompt matrix: the positions it puts in front of the input."""
        return int(self.embeddings.shape[0])

    @property
    def hidden_size(self) -> int:
        """Columns of the prompt matrix: an input-level prompt's is the base model's hidden size; a KV-level
        prompt's is its layout's width."""
        return int(self.embeddings.shape[1])

    def method_metadata(self) -> dict[str, object]:
        """What a stored version records of its method (see `registry.version.PromptVersion`)."""
        out: dict[str, object] = {"method": self.method}
        if self.layout is not None:
            out.update(num_layers=self.layout.num_layers, kv_heads=self.layout.kv_heads,
                       head_dim=self.layout.head_dim)
        if self.task_id is not None:
            out["peft_task_id"] = self.task_id
        return out


def check_rows_and_width(rows: int, width: int, base: BaseModelSpec, *, max_virtual_tokens: int) -> None:
    """Refuses (`InvalidPromptError`) a prompt of `rows` x `width` that `base` cannot serve within the limit."""
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
    check_rows_and_width(shape[0], shape[1], base, max_virtual_tokens=max_virtual_tokens)
    out = t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    _check_finite(out, "prompt tensor")
    return out


def _check_finite(out: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(out)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(out).sum())
        n_inf = int(torch.isinf(out).sum())
        first_row = int((~finite).any(dim=1).nonzero()[0, 0])
        values = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        raise InvalidPromptError(
            f"the {what} holds {values} value(s) (first in virtual token {first_row}): "
            f"the prompt diverged or was exported wrongly; retrain or re-export it with finite values"
        )


def validate_kv_prefix(t: torch.Tensor, base: BaseModelSpec, *, max_virtual_tokens: int) -> torch.Tensor:
    """Checks that `t` can serve as a KV-level prompt (prefix tuning, cartridge) for `base`: PEFT's
    ``[num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]`` matrix in `base`'s `KvLayout`. Returns it as
    float32, CPU, contiguous, never sharing memory with `t`; raises `InvalidPromptError` naming what differs."""
    if max_virtual_tokens < 1:
        raise ValueError(f"max_virtual_tokens must be at least 1, got {max_virtual_tokens}")
    layout = base.kv_layout
    if layout is None:
        raise InvalidPromptError(
            f"{base.model_id} does not cache keys and values of one shape in every layer, so a prefix-tuning "
            f"or cartridge adapter (keys and values per layer) cannot be served on it: use PROMPT_TUNING instead"
        )
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidPromptError(
            f"the prefix tensor has shape {shape}: a prefix-tuning adapter is one 2-D [num_virtual_tokens, "
            f"num_layers * 2 * token_dim] matrix ({layout.describe()}: [n, {layout.width}] for {base.model_id})"
        )
    if t.dtype not in _DTYPE_NAMES:
        raise InvalidPromptError(
            f"the prefix tensor has dtype {str(t.dtype).removeprefix('torch.')}: it must be float32, float16 or "
            f"bfloat16; convert it (e.g. tensor.float()) and upload again"
        )
    rows, width = (int(d) for d in t.shape)
    if rows < 1:
        raise InvalidPromptError("the prefix tensor has no virtual tokens (0 rows): export one with at least 1 token")
    if rows > max_virtual_tokens:
        raise InvalidPromptError(
            f"the prompt has {rows} virtual tokens but this server accepts at most {max_virtual_tokens}: "
            f"use a prompt with fewer virtual tokens or raise the server's max_virtual_tokens limit"
        )
    if width != layout.width:
        raise InvalidPromptError(
            f"the prefix tensor is {width} wide but {base.model_id} caches {layout.describe()} per token, "
            f"so a prefix for it is {layout.num_layers} x 2 x {layout.token_dim} = {layout.width} wide: train the "
            f"prefix on this base model"
        )
    out = t.detach().to(device="cpu", dtype=torch.float32).clone(memory_format=torch.contiguous_format)
    _check_finite(out, "prefix tensor")
    return out


def revalidate(prompt: PromptTensor, base: BaseModelSpec) -> PromptTensor:
    """`prompt` checked again against `base` by its method (a tensor built in code, kept out of a store
    unchecked); its own number of rows is the limit."""
    rows = int(prompt.embeddings.shape[0]) if prompt.embeddings.dim() else 1
    if prompt.layout is None:
        embeddings = validate_embeddings(prompt.embeddings, base, max_virtual_tokens=max(1, rows))
    else:
        if base.kv_layout is not None and prompt.layout != base.kv_layout:
            raise InvalidPromptError(
                f"the prefix was made for {prompt.layout.describe()} but {base.model_id} caches "
                f"{base.kv_layout.describe()}: train the prefix on this base model"
            )
        embeddings = validate_kv_prefix(prompt.embeddings, base, max_virtual_tokens=max(1, rows))
    return PromptTensor(embeddings=embeddings, source_type=prompt.source_type, init=prompt.init,
                        layout=prompt.layout, task_id=prompt.task_id)


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
    @property
    def method(self) -> str: ...
    @property
    def kv_shape(self) -> tuple[int, int, int]: ...


def check_base_model(prompt: str | StoredPrompt, base: BaseModelSpec, *, force: bool = False) -> None:
    """Refuses a prompt made for another base model than `base`, unless `force`; raises `BaseModelMismatchError`.

    The one compatibility rule, for both moments a prompt meets the base model. `prompt` is either the
    fingerprint an upload claims (empty means "unknown" and is accepted; the message offers `force`), or a
    stored version about to be served: its width must be the model's hidden size (a KV-level prompt's
    layers, KV heads and head size the model's) and the fingerprint it recorded (empty: unknown) must be
    the model's.
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
    if prompt.method == METHOD_PREFIX:
        layout = base.kv_layout
        if layout is None or prompt.kv_shape != (layout.num_layers, layout.kv_heads, layout.head_dim):
            layers, heads, dim = prompt.kv_shape
            raise BaseModelMismatchError(
                f"{prompt.ref} holds keys and values for {layers} layers x {heads} KV heads x head size {dim}, but "
                f"{base.model_id} caches {layout.describe() if layout else 'keys and values of differing shapes'}: "
                f"serve it with the base model it was trained for"
            )
    if prompt.base_model_fingerprint and not force and prompt.base_model_fingerprint != base.fingerprint:
        # Registration records the serving model's fingerprint, so only a store shared with another
        # base model lands here.
        raise BaseModelMismatchError(
            f"{prompt.ref} was made for base model {prompt.base_model_id or '?'} (fingerprint "
            f"{prompt.base_model_fingerprint}), but this server runs {base.model_id} (fingerprint "
            f"{base.fingerprint}): re-register it here with force, or serve it with its own base model"
        )

