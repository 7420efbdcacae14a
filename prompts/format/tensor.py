"""`PromptTensor`, a validated soft prompt, and the checks every prompt passes against the base model.

Whatever a prompt arrives as (an upload, a training run, a stored version), it reaches the model only
through `validate_embeddings` (shape, dtype, limits, finite values) and `check_base_model` (made for this
base model). Failures are an `InvalidPromptError` or `BaseModelMismatchError` whose message says what is
wrong and how to fix it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import BaseModelMismatchError, InvalidPromptError

SOURCE_TYPES = ("PROMPT_TUNING", "P_TUNING", "RAW")

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

