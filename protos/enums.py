"""Python enums <-> wire enums, derived by name: `FinishReason.LENGTH` <-> `FINISH_REASON_LENGTH`.

The one place either side of the wire converts finish reasons and training states. A new member on
both sides needs no edit here; a member missing on one side fails at import, not on a request.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from softprompt.prompts.outcomes import FinishReason, TrainingState
from softprompt.protos import softprompt_pb2 as pb

E = TypeVar("E", bound=Enum)


def _table(enum: type[E], wire: EnumTypeWrapper, prefix: str) -> dict[E, int]:
    return {member: wire.Value(prefix + member.name) for member in enum}


_FINISH_TO_PB = _table(FinishReason, pb.FinishReason, "FINISH_REASON_")
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_STATE_TO_PB = _table(TrainingState, pb.TrainingState, "TRAINING_STATE_")
_STATE_FROM_PB = {v: k for k, v in _STATE_TO_PB.items()}


def finish_reason_to_pb(reason: FinishReason | str) -> int:
    """The wire value of a finish reason."""
    return _FINISH_TO_PB[FinishReason(reason)]


def finish_reason_from_pb(value: int) -> FinishReason | None:
    """The finish reason of a wire value; None for FINISH_REASON_UNSPECIFIED (or a value this client lacks)."""
    return _FINISH_FROM_PB.get(value)


def training_state_to_pb(state: TrainingState | str) -> int:
    """The wire value of a training state."""
    return _STATE_TO_PB[TrainingState(state)]


def training_state_from_pb(value: int) -> TrainingState | None:
    """The training state of a wire value; None for TRAINING_STATE_UNSPECIFIED (or one this client lacks)."""
    return _STATE_FROM_PB.get(value)
