"""The annotations Koala's typed encoding accepts, read into one small set of shapes.

Both the codec (``koala._codec``: copy, encode, decode) and the test kit's hypothesis
strategies (``koala.testing.value_strategy``) dispatch on :func:`shape_of`, so the two
cannot disagree about what an argument may be: a type added here is added to both, and
one refused here is refused by both with the same sentence.

The parts of a shape are annotations again (``Items.item`` is the annotation of a list's
elements), read in their turn by whoever walks them; recursive dataclasses stay possible
because nothing here recurses.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import sys
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from ._errors import ArgumentTypeError

NoneType = type(None)

# Immutable values carried as text on the wire: how each is read back and written.
TEXT_TYPES: Final[dict[type, tuple[Callable[[str], Any], Callable[[Any], str]]]] = {
    dt.datetime: (dt.datetime.fromisoformat, dt.datetime.isoformat),
    dt.date: (dt.date.fromisoformat, dt.date.isoformat),
    dt.time: (dt.time.fromisoformat, dt.time.isoformat),
    uuid.UUID: (uuid.UUID, str),
    Decimal: (Decimal, str),
}

# Builtins carried as themselves (``Any`` means plain data: None, bool, int, float,
# str, bytes and lists and maps of them).
PLAIN_TYPES: Final = (Any, object, None, NoneType, bool, int, float, str, bytes)


@dataclass(frozen=True, slots=True)
class Plain:
    """``tp`` is one of PLAIN_TYPES (``None`` read as its type)."""

    tp: Any


@dataclass(frozen=True, slots=True)
class Text:
    """A datetime, date, time, UUID or Decimal: immutable, carried as text."""

    tp: type


@dataclass(frozen=True, slots=True)
class Duration:
    """A ``datetime.timedelta``."""


@dataclass(frozen=True, slots=True)
class Alias:
    """``Annotated[T, ...]`` or a ``NewType`` of T: values are those of ``inner``."""

    inner: Any


@dataclass(frozen=True, slots=True)
class OneOf:
    """``Union[...]`` / ``A | B`` (Optional included)."""

    members: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Choice:
    """``Literal[...]``."""

    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Items:
    """A list, set, frozenset or variable-length tuple of ``item`` (bare: of Any)."""

    kind: type
    item: Any


@dataclass(frozen=True, slots=True)
class Fixed:
    """A fixed-length tuple, ``tuple[A, B]`` (``tuple[()]``: the empty one)."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Map:
    """A dict of ``key`` to ``value`` (bare: of Any to Any)."""

    key: Any
    value: Any


@dataclass(frozen=True, slots=True)
class Enumeration:
    """An ``enum.Enum``: carried as its value."""

    tp: type[enum.Enum]


@dataclass(frozen=True, slots=True)
class Record:
    """A dataclass: carried as a map of its fields."""

    tp: type


@dataclass(frozen=True, slots=True)
class Model:
    """A pydantic model: validated by pydantic, carried as its JSON form."""

    tp: type


Shape = (
    Plain
    | Text
    | Duration
    | Alias
    | OneOf
    | Choice
    | Items
    | Fixed
    | Map
    | Enumeration
    | Record
    | Model
)


def describe(tp: Any) -> str:
    """An annotation as a person reads it (``list[int]``, ``Player``)."""
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def pydantic_base() -> type | None:
    """pydantic's BaseModel if the program imported pydantic (never imported here)."""
    mod = sys.modules.get("pydantic")
    return getattr(mod, "BaseModel", None) if mod is not None else None


def shape_of(tp: Any) -> Shape:
    """What kind of value ``tp`` describes; ArgumentTypeError if Koala cannot carry it."""
    if tp in PLAIN_TYPES:
        return Plain(NoneType if tp is None else tp)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return Alias(args[0])
    if isinstance(tp, typing.NewType):
        return Alias(tp.__supertype__)
    if origin is typing.Union or origin is types.UnionType:
        return OneOf(args)
    if origin is typing.Literal:
        return Choice(args)
    for kind in (list, set, frozenset):
        if origin is kind or tp is kind:
            return Items(kind, args[0] if args else Any)
    if origin is tuple or tp is tuple:
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return Items(tuple, args[0] if args else Any)
        return Fixed(() if args == ((),) else args)
    if origin is dict or tp is dict:
        return Map(args[0], args[1]) if args else Map(Any, Any)
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return Enumeration(tp)
        if tp is dt.timedelta:
            return Duration()
        if tp in TEXT_TYPES:
            return Text(tp)
        if dataclasses.is_dataclass(tp):
            return Record(tp)
        base_model = pydantic_base()
        if base_model is not None and issubclass(tp, base_model):
            return Model(tp)
    raise ArgumentTypeError(
        f"annotation {describe(tp)} is not supported by Koala's typed encoding; use None, "
        "bool, int, float, str, bytes, list/tuple/dict/set, Optional/Union, Literal, an Enum, "
        "datetime, a dataclass or a pydantic model"
    )
