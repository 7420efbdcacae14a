"""MULTITASK_PROMPT_TUNING (Wang et al. 2023): one shared prompt and low-rank factors per task, materialized.

PEFT saves ``prompt_embeddings`` P ``[num_virtual_tokens, hidden]``, ``prefix_task_cols`` ``[num_tasks,
num_virtual_tokens, rank]`` and ``prefix_task_rows`` ``[num_tasks, rank, hidden]``, and at run time prepends task
k's prompt P * (cols[k] @ rows[k]) (elementwise). Registration names the task (`task_id`) and stores that
prompt as a plain PROMPT_TUNING matrix: served, exported and trained on like any other.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from softprompt.prompts.base import BaseModelSpec
from softprompt.prompts.errors import InvalidPromptError
from softprompt.prompts.format.tensor import FLOAT_DTYPES, PromptTensor, validate_embeddings

SHARED, COLS, ROWS = "prompt_embeddings", "prefix_task_cols", "prefix_task_rows"


def parse_adapter(config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], base: BaseModelSpec, *,
                  task_id: int | None, max_virtual_tokens: int) -> PromptTensor:
    """Task `task_id`'s prompt of a MULTITASK_PROMPT_TUNING adapter, checked against `base`.

    `task_id` may be omitted only for an adapter of one task. Raises `InvalidPromptError` naming the field
    or tensor at fault (task_id out of range included)."""
    missing = [name for name in (SHARED, COLS, ROWS) if name not in tensors]
    if missing or len(tensors) != 3:
        names = ", ".join(sorted(tensors)) or "none"
        raise InvalidPromptError(
            f"adapter_model.safetensors holds {names:.300}, but a MULTITASK_PROMPT_TUNING adapter holds exactly "
            f"{SHARED}, {COLS} and {ROWS}: upload the files PEFT's save_pretrained wrote"
        )
    shared, cols, rows = tensors[SHARED], tensors[COLS], tensors[ROWS]
    for name, t, dims in ((SHARED, shared, 2), (COLS, cols, 3), (ROWS, rows, 3)):
        if t.dim() != dims or t.dtype not in FLOAT_DTYPES.values():
            # The dtypes any prompt may arrive in: PEFT loads each into its float32 modules, as materialize does.
            raise InvalidPromptError(
                f"tensor {name} has shape {list(t.shape)} and dtype {str(t.dtype).removeprefix('torch.')}: "
                f"a multitask adapter's {name} is a {dims}-D float32, float16 or bfloat16 tensor; upload the "
                f"files save_pretrained wrote"
            )
    tasks, n, rank = (int(d) for d in cols.shape)
    if (tuple(rows.shape[:2]) != (tasks, rank) or rows.shape[2] != shared.shape[1] or n != shared.shape[0]):
        raise InvalidPromptError(
            f"the multitask factors do not fit the shared prompt: {SHARED} {list(shared.shape)}, {COLS} "
            f"{list(cols.shape)} (tasks, tokens, rank), {ROWS} {list(rows.shape)} (tasks, rank, hidden)"
        )
    declared = config.get("num_tasks")
    if declared is not None and declared != tasks:
        raise InvalidPromptError(
            f"adapter_config.json says num_tasks={declared!r} but the factors hold {tasks} tasks: the config and "
            f"weights come from different adapters"
        )
    if task_id is None:
        if tasks != 1:
            raise InvalidPromptError(
                f"the MULTITASK_PROMPT_TUNING adapter holds {tasks} tasks: name the one to register with task_id "
                f"(CLI: --task-id), 0 to {tasks - 1}, and register each task you serve as its own version or task"
            )
        task_id = 0
    if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < tasks:
        raise InvalidPromptError(
            f"task_id {task_id!r} is out of range: the MULTITASK_PROMPT_TUNING adapter holds tasks 0 to "
            f"{tasks - 1} (num_tasks {tasks})"
        )
    prompt = materialize(shared, cols, rows, task_id)
    embeddings = validate_embeddings(prompt, base, max_virtual_tokens=max_virtual_tokens)
    return PromptTensor(embeddings=embeddings, source_type="MULTITASK_PROMPT_TUNING",
                        init=_init_of(config), task_id=task_id)


def materialize(shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor, task_id: int) -> torch.Tensor:
    """Task `task_id`'s prompt, as PEFT's MultitaskPromptEmbedding computes it (in float32)."""
    with torch.no_grad():
        return shared.float() * (cols[task_id].float() @ rows[task_id].float())


def _init_of(config: Mapping[str, Any]) -> str | None:
    init = config.get("prompt_tuning_init")
    return init if isinstance(init, str) else None
