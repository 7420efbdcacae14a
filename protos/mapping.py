"""Dataclass <-> protobuf message copies derived from the dataclass's fields: one rule for every copy.

`MessageMapping(SomeDataclass, pb.SomeMessage)` pairs each dataclass field with the message field of the same
name (or its rename), and checks when it is built (at import) that each side has a counterpart for every field
of the other, so a schema edit that adds, drops or misspells a field fails at import, not on a request.

Reading a message (`from_pb`), a field the sender left unset (an `optional` or message field absent, any
other field zero or empty) takes the dataclass's default; with no default, None where the field's type
admits it, else the wire's zero value. An old sender that knows fewer fields thus gets good values, and
an absent optional reads as None. Repeated fields become the tuple or list the dataclass field is typed
as, maps a dict. Enum and message values need a converter of their own (`decode`, and `encode` to write
them), because they are other types on each side; on a repeated field or a map it converts each value.

Writing (`to_pb`) sets every field that is not None, `optional` ones included even at 0, so the
receiver uses exactly these values; None leaves an `optional` field unset.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

D = TypeVar("D", bound="DataclassInstance")
M = TypeVar("M", bound=Message)
Converter = Callable[[Any], Any]

__all__ = ["MessageMapping", "Converter"]


@dataclasses.dataclass(frozen=True)
class _Field:
    """One dataclass field and its wire counterpart, with what reading and writing it needs."""

    name: str
    wire: str
    presence: bool  # unset is told by HasField, not by a zero value
    nullable: bool  # the dataclass field's type admits None
    default: Callable[[], Any] | None  # None: the field has no default
    shape: Callable[[Any, Converter], Any]  # applies a converter to the value, each element or each map value
    container: Callable[[Any], Any]  # what a repeated field or map reads as (tuple, list, dict), else unchanged
    decode: Converter
    encode: Converter | None  # None: an enum or message value with no converter given, so not writable

    def read(self, raw: Any) -> Any:
        return self.container(self.shape(raw, self.decode))

    def write(self, value: Any, owner: str) -> Any:
        if self.encode is None:
            raise TypeError(f"{owner}.{self.name} needs an encode converter to be written")
        return self.shape(value, self.encode)


class MessageMapping(Generic[D, M]):
    """Copies between the dataclass `cls` and the protobuf message `message`, field by field.

    Args:
        cls: a dataclass whose fields all have a counterpart in `message`, and the other way round.
        message: the generated message class.
        renames: dataclass field -> message field, where the names differ.
        decode: dataclass field -> converter of its wire value (required for enum and message fields).
        encode: dataclass field -> converter to its wire value (enum and message fields, for `to_pb`).

    Raises:
        TypeError: a field lacks its counterpart, or an enum or message field its `decode` converter.
    """

    def __init__(
        self,
        cls: type[D],
        message: type[M],
        *,
        renames: Mapping[str, str] | None = None,
        decode: Mapping[str, Converter] | None = None,
        encode: Mapping[str, Converter] | None = None,
    ) -> None:
        renames, decode, encode = dict(renames or {}), dict(decode or {}), dict(encode or {})
        names = {f.name for f in dataclasses.fields(cls)}
        stray = (set(renames) | set(decode) | set(encode)) - names
        if stray:
            raise TypeError(f"{cls.__name__} has no fields {sorted(stray)}")
        # The C (upb) runtime's descriptors are typed apart from the Python ones, with the same attributes.
        wire = typing.cast("Mapping[str, FieldDescriptor]", message.DESCRIPTOR.fields_by_name)
        wanted = {renames.get(name, name) for name in names}
        if wanted != set(wire):
            raise TypeError(
                f"{cls.__name__} <-> {message.DESCRIPTOR.full_name}: fields only in the dataclass "
                f"{sorted(wanted - set(wire))}, only on the wire {sorted(set(wire) - wanted)}"
            )
        hints = typing.get_type_hints(cls)
        self._cls = cls
        self._make: Callable[..., D] = cls
        self._message: Callable[..., M] = message
        self._fields = tuple(
            _field(f, hints[f.name], wire[renames.get(f.name, f.name)], decode.get(f.name), encode.get(f.name))
            for f in dataclasses.fields(cls)
        )

    def from_pb(self, message: M) -> D:
        """The dataclass of `message`; unset fields take the dataclass's defaults (see the module's docstring).

        Raises whatever the dataclass raises for a bad value (e.g. `ValueError` from its checks).
        """
        values = {}
        for f in self._fields:
            unset = not message.HasField(f.wire) if f.presence else not getattr(message, f.wire)
            if unset and f.default is not None:
                values[f.name] = f.default()
            elif unset and f.nullable:
                values[f.name] = None
            else:
                values[f.name] = f.read(getattr(message, f.wire))
        return self._make(**values)

    def to_pb(self, value: D) -> M:
        """The message of `value`: every field that is not None is set, `optional` ones even at 0.

        Raises:
            TypeError: an enum or message field has no `encode` converter.
        """
        fields = {}
        for f in self._fields:
            item = getattr(value, f.name)
            if item is None:  # an optional field left unset
                continue
            fields[f.wire] = f.write(item, self._cls.__name__)
        return self._message(**fields)


def _field(
    field: dataclasses.Field[Any], hint: Any, wire: FieldDescriptor, decode: Converter | None,
    encode: Converter | None,
) -> _Field:
    value = _map_value(wire) or wire
    composite = value.type in (FieldDescriptor.TYPE_ENUM, FieldDescriptor.TYPE_MESSAGE)
    if composite and decode is None:
        raise TypeError(f"{field.name} is an enum or message on the wire: it needs a decode converter")
    # Values that need no converter are copied whole: the container's own copy is all a read needs.
    plain = not composite and decode is None and encode is None
    shape: Callable[[Any, Converter], Any] = _whole
    container: Callable[[Any], Any] = _unchanged
    if _is_map(wire):
        shape, container = (_whole, dict) if plain else (_each_map_value, _unchanged)
    elif wire.is_repeated:
        shape = _whole if plain else _each_element
        container = list if typing.get_origin(_without_none(hint)) is list else tuple
    return _Field(
        name=field.name,
        wire=wire.name,
        presence=wire.has_presence and not wire.is_repeated,
        nullable=_admits_none(hint),
        default=_default(field),
        shape=shape,
        container=container,
        decode=decode or _unchanged,
        encode=encode or (None if composite else _unchanged),
    )


def _whole(value: Any, convert: Converter) -> Any:
    return convert(value)


def _each_element(values: Any, convert: Converter) -> list[Any]:
    return [convert(v) for v in values]


def _each_map_value(values: Any, convert: Converter) -> dict[Any, Any]:
    return {k: convert(v) for k, v in values.items()}


def _unchanged(value: Any) -> Any:
    return value


def _default(field: dataclasses.Field[Any]) -> Callable[[], Any] | None:
    if field.default is not dataclasses.MISSING:
        default = field.default
        return lambda: default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory
    return None


def _is_map(wire: FieldDescriptor) -> bool:
    return wire.message_type is not None and wire.message_type.GetOptions().map_entry


def _map_value(wire: FieldDescriptor) -> FieldDescriptor | None:
    """The value field of a map's entries; None when `wire` is not a map."""
    return wire.message_type.fields_by_name["value"] if wire.message_type is not None and _is_map(wire) else None


def _admits_none(hint: Any) -> bool:
    return hint is type(None) or (_is_union(hint) and type(None) in typing.get_args(hint))


def _without_none(hint: Any) -> Any:
    if not _is_union(hint):
        return hint
    rest = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return rest[0] if len(rest) == 1 else hint


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)
