"""How a generation ended and where a training job stands: the enums both sides of the wire share.

Torch-free and protobuf-free: the serving core, the training jobs, the client and the CLI use these;
`softprompt.protos.enums` maps them to and from the wire enums, derived by name, in one place.
Both are `str` enums, so `FinishReason.LENGTH == "length"` and they print and serialise as their value.
"""

from __future__ import annotations

from enum import Enum


class FinishReason(str, Enum):
    """Why a row stopped generating."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched
    EOS = "eos"  # the model produced an end-of-sequence id

    def __str__(self) -> str:
        return self.value


class TrainingState(str, Enum):
    """The life of a training job: QUEUED -> RUNNING -> one of the three finished states."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    @property
    def finished(self) -> bool:
        """Whether the job can no longer change."""
        return self in (TrainingState.SUCCEEDED, TrainingState.FAILED, TrainingState.CANCELLED)
