"""Typed encoding: round trips, copies, and clear rejections."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import uuid
from decimal import Decimal
from typing import Any, Literal, NewType, Optional, Union

import cbor2
import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala import ArgumentTypeError
from koala._codec import codec_for
from koala.testing import value_strategy


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass
class Item:
    name: str
    count: int = 0
    tags: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float


@dataclasses.dataclass
class Tree:
    value: int
    children: list[Tree] = dataclasses.field(default_factory=list)


class Profile(pydantic.BaseModel):
    name: str
    level: int
    items: list[Item] = []
    seen: dt.datetime | None = None


UserId = NewType("UserId", int)

ANNOTATIONS: list[Any] = [
    None,
    bool,
    int,
    float,
    str,
    bytes,
    list[int],
    tuple[int, ...],
    tuple[str, int, bool],
    dict[str, list[int]],
    dict[int, str],
    set[str],
    frozenset[int],
    Optional[str],  # noqa: UP045
    Union[int, str, None],  # noqa: UP007
    int | list[str],
    Literal["a", "b", 3],
    Color,
    Level,
    dt.datetime,
    dt.date,
    dt.time,
    dt.timedelta,
    uuid.UUID,
    Decimal,
    Item,
    Point,
    Tree,
    list[Item],
    dict[str, Point],
    Profile,
    UserId,
    Any,
]


def _wire(codec: Any, value: Any) -> Any:
    return codec.from_wire(cbor2.loads(cbor2.dumps(codec.to_wire(value))))


@pytest.mark.parametrize("annotation", ANNOTATIONS, ids=repr)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip_local_and_wire(annotation: Any, data: st.DataObject) -> None:
    codec = codec_for(annotation)
    value = data.draw(value_strategy(annotation))
    assert codec.check(value) == value
    assert _wire(codec, value) == value


class _NotData:
    pass


@pytest.mark.parametrize(
    "annotation",
    [complex, _NotData, list[complex], dict[str, _NotData], int | complex, type],
    ids=repr,
)
def test_codec_and_strategies_refuse_the_same_annotations(annotation: Any) -> None:
    """One grammar (koala._annotations) reads annotations for both: what the codec
    refuses, the test kit has no strategy for, with the codec's own sentence."""
    with pytest.raises(ArgumentTypeError, match="not supported by Koala's typed encoding"):
        codec_for(annotation)
    with pytest.raises(TypeError, match="not supported by Koala's typed encoding"):
        value_strategy(annotation)


@given(items=st.lists(st.builds(Item, st.text(), st.integers(), st.lists(st.text()))))
def test_copies_share_no_mutable_object(items: list[Item]) -> None:
    codec = codec_for(list[Item])
    snapshot = [dataclasses.replace(i, tags=list(i.tags)) for i in items]
    copy = codec.check(items)
    assert copy == items
    assert copy is not items
    for copied in copy:
        copied.tags.append("mutated")
        copied.count += 1
    assert items == snapshot


def test_immutable_values_are_not_copied() -> None:
    point = Point(1.0, 2.0)
    assert codec_for(Point).check(point) is point
    assert codec_for(tuple[str, int]).immutable
    assert not codec_for(list[int]).immutable


def test_pydantic_model_is_copied_deeply() -> None:
    profile = Profile(name="a", level=1, items=[Item("sword")])
    copy = codec_for(Profile).check(profile)
    assert copy == profile
    copy.items[0].count = 5
    assert profile.items[0].count == 0


@pytest.mark.parametrize(
    ("annotation", "value", "fragment"),
    [
        (str, 5, "expected str, got int"),
        (int, True, "expected int, got bool"),
        (int, "1", "expected int, got str"),
        (list[int], [1, "x"], "[1]: expected int"),
        (dict[str, int], {"a": "b"}, "['a']: expected int"),
        (Item, {"name": "x"}, "expected Item"),
        (list[Item], [Item("a"), Item(5)], "[1].name: expected str"),  # type: ignore[arg-type]
        (Literal["a", "b"], "c", "expected Literal['a', 'b']"),
        (Color, "red", "expected Color"),
        (Optional[int], "x", "expected Optional[int]"),  # noqa: UP045
        (tuple[int, int], (1,), "expected tuple[int, int]"),
        (dt.date, dt.datetime(2020, 1, 1), "expected date"),
    ],
)
def test_mismatch_names_the_path(annotation: Any, value: Any, fragment: str) -> None:
    with pytest.raises(ArgumentTypeError) as info:
        codec_for(annotation).check(value, "arg")
    assert str(info.value).startswith("arg")
    assert fragment in str(info.value)


def test_float_accepts_int_and_returns_float() -> None:
    assert codec_for(float).check(3) == 3.0
    assert type(codec_for(float).check(3)) is float


def test_unsupported_annotation_is_a_clear_error() -> None:
    class Opaque:
        pass

    with pytest.raises(ArgumentTypeError, match="not supported by Koala's typed encoding"):
        codec_for(Opaque)


@pytest.mark.parametrize(
    ("annotation", "data", "fragment"),
    [
        (Item, {"name": "a", "colour": 1}, "unknown field 'colour'"),
        (Item, {"count": 1}, "required field 'name'"),
        (Color, "blue", "a value of Color"),
        (dt.datetime, "yesterday", "datetime (as text)"),
        (Profile, {"name": "a"}, "valid Profile"),
        (tuple[int, str], [1], "array of 2"),
    ],
)
def test_decode_rejects_data_that_does_not_fit(annotation: Any, data: Any, fragment: str) -> None:
    with pytest.raises(ArgumentTypeError) as info:
        codec_for(annotation).from_wire(data, "x")
    assert fragment in str(info.value)


@dataclasses.dataclass
class Evolved:
    name: str
    added: int = 7


def test_dataclass_decodes_rows_without_new_defaulted_fields() -> None:
    assert codec_for(Evolved).from_wire({"name": "old"}) == Evolved("old", 7)


plain_data = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("annotation", ANNOTATIONS[:-1], ids=repr)
@settings(max_examples=30, deadline=None)
@given(data=plain_data)
def test_decoding_garbage_only_raises_argument_type_error(annotation: Any, data: Any) -> None:
    with contextlib.suppress(ArgumentTypeError):
        codec_for(annotation).from_wire(data)
