"""`TrainingOptions` <-> `pb.TrainingOptions`, derived from the dataclass's fields: one conversion for both sides.

The message has a field of the same name for every dataclass field (checked at import). On the way in,
a field the sender left unset (an `optional` field absent, any other field zero or empty) takes the
dataclass default, so an old client that knows fewer options still trains with good settings.
"""

from __future__ import annotations

import dataclasses

from softprompt.prompts.options import TrainingOptions
from softprompt.protos import softprompt_pb2 as pb

_FIELDS = tuple(f.name for f in dataclasses.fields(TrainingOptions))
_missing = set(_FIELDS) - set(pb.TrainingOptions.DESCRIPTOR.fields_by_name)
if _missing:  # pragma: no cover - a schema edit that forgot a field
    raise ImportError(f"pb.TrainingOptions lacks fields of TrainingOptions: {sorted(_missing)}")
_OPTIONAL = frozenset(n for n in _FIELDS if pb.TrainingOptions.DESCRIPTOR.fields_by_name[n].has_presence)
_DEFAULTS = TrainingOptions()


def options_to_pb(options: TrainingOptions) -> pb.TrainingOptions:
    """Every field set, optional ones included even at 0, so the server uses exactly these values."""
    return pb.TrainingOptions(**{name: getattr(options, name) for name in _FIELDS})


def options_from_pb(message: pb.TrainingOptions) -> TrainingOptions:
    """The dataclass; unset fields take its defaults. `ValueError` (from the dataclass) names a bad field."""
    values = {}
    for name in _FIELDS:
        if name in _OPTIONAL:
            set_ = message.HasField(name)
        else:
            set_ = bool(getattr(message, name))
        values[name] = getattr(message, name) if set_ else getattr(_DEFAULTS, name)
    return TrainingOptions(**values)
