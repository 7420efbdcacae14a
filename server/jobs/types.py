"""What a training job takes and what it reports, torch-free: `TrainJobRequest` in, `JobSnapshot` out.

The service layer hands both to the transports as they are (`service.types` re-exports them), so they live
apart from `training.py`, which holds the trainer and the scheduler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from softprompt.prompts.options import TrainingOptions
from softprompt.prompts.outcomes import TrainingState
from softprompt.prompts.registry.version import PromptVersion
from softprompt.prompts.results import EvalResult, Progress


@dataclass(frozen=True)
class TrainJobRequest:
    """A training job to queue: examples as JSONL bytes (`eval_jsonl` empty: hold out part of `train_jsonl`)."""

    task: str
    train_jsonl: bytes
    eval_jsonl: bytes
    options: TrainingOptions
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    promote_alias: str = ""


@dataclass(frozen=True)
class JobSnapshot:
    """A job as callers see it at one moment; `revision` grows with every change."""

    job_id: str
    task: str
    state: TrainingState
    phase: str
    created_at: str
    train_examples: int
    eval_examples: int
    revision: int = 0
    progress: Progress | None = None
    before: EvalResult | None = None
    after: EvalResult | None = None
    version: PromptVersion | None = None
    promoted: bool = False
    promotion: str = ""
    error: str = ""
    finished_at: str = ""

    @property
    def done(self) -> bool:
        """True once the job succeeded, failed or was cancelled."""
        return self.state.finished
