"""The request settings on the wire, derived from their dataclasses' fields: one conversion for both sides.

`TrainingOptions` <-> `pb.TrainingOptions` and `DecodingOptions` <-> `pb.DecodingParameters` (whose
`apply_chat_template` is the dataclass's `chat`). Each message has a counterpart for every dataclass field
and the other way round (checked at import, see `mapping.MessageMapping`). On the way in, a field the sender
left unset (an `optional` field absent, any other field zero or empty) takes the dataclass default, so an old
client that knows fewer options still gets good settings; on the way out every field is set, so the server
uses exactly the sender's values (`DecodingOptions.seed` None leaves the optional `seed` unset: not seeded).
"""

from __future__ import annotations

from softprompt.prompts.options import DecodingOptions, TrainingOptions
from softprompt.protos import softprompt_pb2 as pb
from softprompt.protos.mapping import MessageMapping

__all__ = ["options_to_pb", "options_from_pb", "decoding_to_pb", "decoding_from_pb"]

_TRAINING = MessageMapping(TrainingOptions, pb.TrainingOptions)
_DECODING = MessageMapping(DecodingOptions, pb.DecodingParameters, renames={"chat": "apply_chat_template"})


def options_to_pb(options: TrainingOptions) -> pb.TrainingOptions:
    """Every field set, optional ones included even at 0, so the server uses exactly these values."""
    return _TRAINING.to_pb(options)


def options_from_pb(message: pb.TrainingOptions) -> TrainingOptions:
    """The dataclass; unset fields take its defaults. `ValueError` (from the dataclass) names a bad field."""
    return _TRAINING.from_pb(message)


def decoding_to_pb(options: DecodingOptions) -> pb.DecodingParameters:
    """The wire form of `options`; a None seed stays unset (not seeded), a 0 seed is sent."""
    return _DECODING.to_pb(options)


def decoding_from_pb(message: pb.DecodingParameters) -> DecodingOptions:
    """The dataclass; unset fields take its defaults (0s: the server's defaults; seed absent: None)."""
    return _DECODING.from_pb(message)
