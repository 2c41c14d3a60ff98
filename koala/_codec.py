"""Typed values: an annotation compiled into three functions.

* ``copy(value)``: validate a Python value against the annotation and return a copy
  that shares no mutable object with it (the local call path: no bytes at all);
* ``encode(value)``: validate and turn it into plain CBOR data (the wire path);
* ``decode(data)``: validate plain CBOR data and rebuild the typed value.

Codecs are built once per annotation and cached. Immutable leaves (str, int, enums,
datetimes, frozen tuples of those) are validated and passed through without copying.
A value that does not fit raises :class:`ArgumentTypeError` with the path to the
offending part (``items[3].name``). Nothing here ever pickles.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import typing
from collections.abc import Callable, Mapping
from decimal import InvalidOperation
from typing import Any, Final

from ._annotations import (
    TEXT_TYPES,
    Alias,
    Choice,
    Duration,
    Enumeration,
    Fixed,
    Items,
    Map,
    Model,
    NoneType,
    OneOf,
    Plain,
    Record,
    Text,
    describe,
    shape_of,
)
from ._errors import ArgumentTypeError

Fn = Callable[[Any], Any]


def _tname(value: Any) -> str:
    return type(value).__name__


class Mismatch(Exception):
    """Internal: a value did not fit; `path` grows as the error unwinds."""

    def __init__(self, expected: str, value: Any) -> None:
        super().__init__(expected)
        self.expected = expected
        self.value = value
        self.path: list[str] = []

    def to_error(self, where: str) -> ArgumentTypeError:
        path = "".join(reversed(self.path))
        shown = repr(self.value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return ArgumentTypeError(
            f"{where}{path}: expected {self.expected}, got {_tname(self.value)} ({shown})",
            tuple(reversed(self.path)),
        )


def _fail(expected: str, value: Any) -> typing.NoReturn:
    raise Mismatch(expected, value)


class Codec:
    """The compiled functions of one annotation. Build with :func:`codec_for`."""

    __slots__ = ("copy", "decode", "encode", "immutable", "tp")

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.immutable = False
        self.copy: Fn = _unfinished
        self.encode: Fn = _unfinished
        self.decode: Fn = _unfinished

    def _set(self, copy: Fn, encode: Fn, decode: Fn, immutable: bool) -> Codec:
        self.copy, self.encode, self.decode, self.immutable = copy, encode, decode, immutable
        return self

    def check(self, value: Any, where: str = "value") -> Any:
        """Validate and copy `value`; raise ArgumentTypeError naming `where` if it does not fit."""
        try:
            return self.copy(value)
        except Mismatch as exc:
            raise exc.to_error(where) from None

    def to_wire(self, value: Any, where: str = "value") -> Any:
        try:
            return self.encode(value)
        except Mismatch as exc:
            raise exc.to_error(where) from None

    def from_wire(self, data: Any, where: str = "value") -> Any:
        try:
            return self.decode(data)
        except Mismatch as exc:
            raise exc.to_error(where) from None


def _unfinished(value: Any) -> Any:  # pragma: no cover - only during recursive builds
    raise RuntimeError("codec used before it was built")


_cache: dict[Any, Codec] = {}


def codec_for(tp: Any) -> Codec:
    """The codec of an annotation (cached; recursive dataclasses are supported)."""
    try:
        return _cache[tp]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation object
        return _build(tp)
    codec = Codec(tp)
    _cache[tp] = codec
    try:
        built = _build(tp, codec)
    except BaseException:
        del _cache[tp]
        raise
    return built


# ---------------------------------------------------------------- leaves


def _leaf(check: Callable[[Any], bool], expected: str) -> tuple[Fn, Fn, Fn]:
    def same(value: Any) -> Any:
        if check(value):
            return value
        _fail(expected, value)

    return same, same, same


def _is_int(v: Any) -> bool:
    return type(v) is int or (isinstance(v, int) and not isinstance(v, bool))


def _float_copy(value: Any) -> float:
    if type(value) is float:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    _fail("float", value)


def _bytes_copy(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    _fail("bytes", value)


def _str_copy(value: Any) -> str:
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str(value)
    _fail("str", value)


def _none_copy(value: Any) -> None:
    if value is not None:
        _fail("None", value)


_CBOR_LEAVES: Final = (type(None), bool, int, float, str, bytes)


def _any_copy(value: Any) -> Any:
    """`Any`: only plain CBOR data (None, bool, numbers, str, bytes, lists, dicts)."""
    if isinstance(value, _CBOR_LEAVES):
        return value
    if isinstance(value, (list, tuple)):
        return [_any_copy(v) for v in value]
    if isinstance(value, dict):
        return {_any_copy(k): _any_copy(v) for k, v in value.items()}
    _fail("plain data (None, bool, int, float, str, bytes, list, dict) for Any", value)


def _plain(tp: Any) -> tuple[Fn, Fn, Fn, bool]:
    if tp is Any or tp is object:
        return _any_copy, _any_copy, _any_copy, False
    if tp is NoneType:
        return _none_copy, _none_copy, _none_copy, True
    if tp is bool:
        return (*_leaf(lambda v: v is True or v is False, "bool"), True)
    if tp is int:
        return (*_leaf(_is_int, "int"), True)
    if tp is float:
        return _float_copy, _float_copy, _float_copy, True
    if tp is str:
        return _str_copy, _str_copy, _str_copy, True
    assert tp is bytes
    return _bytes_copy, _bytes_copy, _bytes_copy, True


def _stringly(
    tp: type, parse: Callable[[str], Any], fmt: Callable[[Any], str]
) -> tuple[Fn, Fn, Fn]:
    """Immutable values carried as text on the wire (datetime, UUID, Decimal...)."""
    name = tp.__name__

    def copy(value: Any) -> Any:
        if isinstance(value, tp) and not (tp is dt.date and isinstance(value, dt.datetime)):
            return value
        _fail(name, value)

    def encode(value: Any) -> str:
        return fmt(copy(value))

    def decode(data: Any) -> Any:
        if isinstance(data, tp):  # a peer may send a native CBOR datetime
            return data
        if not isinstance(data, str):
            _fail(f"{name} (as text)", data)
        try:
            return parse(data)
        except (ValueError, InvalidOperation):
            _fail(f"{name} (as text)", data)

    return copy, encode, decode


def _timedelta_codec() -> tuple[Fn, Fn, Fn]:
    def copy(value: Any) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        _fail("timedelta", value)

    def encode(value: Any) -> list[int]:
        v = copy(value)
        return [v.days, v.seconds, v.microseconds]

    def decode(data: Any) -> dt.timedelta:
        if isinstance(data, list) and len(data) == 3 and all(_is_int(x) for x in data):
            return dt.timedelta(days=data[0], seconds=data[1], microseconds=data[2])
        _fail("timedelta as [days, seconds, microseconds]", data)

    return copy, encode, decode


# ---------------------------------------------------------------- containers


def _seq(item: Codec, kind: Any, name: str) -> tuple[Fn, Fn, Fn]:
    def copy(value: Any) -> Any:
        if not isinstance(value, kind):
            _fail(name, value)
        c = item.copy
        out = []
        for i, v in enumerate(value):
            try:
                out.append(c(v))
            except Mismatch as exc:
                exc.path.append(f"[{i}]")
                raise
        return out if kind is list else kind(out)

    def encode(value: Any) -> list[Any]:
        if not isinstance(value, kind):
            _fail(name, value)
        e = item.encode
        out = []
        for i, v in enumerate(value):
            try:
                out.append(e(v))
            except Mismatch as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def decode(data: Any) -> Any:
        if not isinstance(data, (list, tuple)):
            _fail(f"{name} (as an array)", data)
        d = item.decode
        out = []
        for i, v in enumerate(data):
            try:
                out.append(d(v))
            except Mismatch as exc:
                exc.path.append(f"[{i}]")
                raise
        return out if kind is list else kind(out)

    return copy, encode, decode


def _list_copy_fast(item: Codec) -> Fn:
    """list of immutable leaves: validate each, copy the list itself."""
    c = item.copy

    def copy(value: Any) -> Any:
        if type(value) is not list and not isinstance(value, list):
            _fail(f"list[{describe(item.tp)}]", value)
        try:
            return [c(v) for v in value]
        except Mismatch as exc:
            for i, v in enumerate(value):  # find the index for the message
                try:
                    c(v)
                except Mismatch:
                    exc.path.append(f"[{i}]")
                    break
            raise

    return copy


def _fixed_tuple(items: list[Codec], name: str) -> tuple[Fn, Fn, Fn]:
    n = len(items)

    def run(value: Any, fns: list[Fn], out_kind: type) -> Any:
        out = []
        for i, (f, v) in enumerate(zip(fns, value, strict=True)):
            try:
                out.append(f(v))
            except Mismatch as exc:
                exc.path.append(f"[{i}]")
                raise
        return out_kind(out)

    def copy(value: Any) -> Any:
        if not isinstance(value, tuple) or len(value) != n:
            _fail(name, value)
        return run(value, [c.copy for c in items], tuple)

    def encode(value: Any) -> Any:
        if not isinstance(value, tuple) or len(value) != n:
            _fail(name, value)
        return run(value, [c.encode for c in items], list)

    def decode(data: Any) -> Any:
        if not isinstance(data, (list, tuple)) or len(data) != n:
            _fail(f"{name} (as an array of {n})", data)
        return run(data, [c.decode for c in items], tuple)

    return copy, encode, decode


def _mapping(key: Codec, val: Codec, name: str) -> tuple[Fn, Fn, Fn]:
    def run(value: Any, kf: Fn, vf: Fn) -> dict[Any, Any]:
        out = {}
        for k, v in value.items():
            try:
                nk = kf(k)
            except Mismatch as exc:
                exc.path.append(f"[key {k!r}]")
                raise
            try:
                out[nk] = vf(v)
            except Mismatch as exc:
                exc.path.append(f"[{k!r}]")
                raise
        return out

    def copy(value: Any) -> Any:
        if not isinstance(value, dict):
            _fail(name, value)
        return run(value, key.copy, val.copy)

    def encode(value: Any) -> Any:
        if not isinstance(value, dict):
            _fail(name, value)
        return run(value, key.encode, val.encode)

    def decode(data: Any) -> Any:
        if not isinstance(data, Mapping):
            _fail(f"{name} (as a map)", data)
        return run(data, key.decode, val.decode)

    return copy, encode, decode


def _union(members: list[Codec], name: str) -> tuple[Fn, Fn, Fn]:
    """Union: the first member that accepts the value wins (None is tried first)."""

    def pick(attr: str) -> Fn:
        fns = [getattr(m, attr) for m in members]

        def f(value: Any) -> Any:
            for fn in fns:
                try:
                    return fn(value)
                except Mismatch:
                    continue
            _fail(name, value)

        return f

    if len(members) == 2 and members[0].tp is NoneType:  # Optional[X]: the common case
        inner = members[1]

        def opt(attr: str) -> Fn:
            fn = getattr(inner, attr)

            def f(value: Any) -> Any:
                if value is None:
                    return None
                try:
                    return fn(value)
                except Mismatch as exc:
                    if not exc.path:
                        exc.expected = name
                    raise

            return f

        return opt("copy"), opt("encode"), opt("decode")
    return pick("copy"), pick("encode"), pick("decode")


def _literal(values: tuple[Any, ...], name: str) -> tuple[Fn, Fn, Fn]:
    allowed = [(type(v), v) for v in values]

    def same(value: Any) -> Any:
        for t, v in allowed:
            if type(value) is t and value == v:
                return value
            if isinstance(v, enum.Enum) and value == v.value and type(value) is type(v.value):
                return v
        _fail(name, value)

    def encode(value: Any) -> Any:
        out = same(value)
        return out.value if isinstance(out, enum.Enum) else out

    return same, encode, same


def _enum(tp: type[enum.Enum]) -> tuple[Fn, Fn, Fn]:
    name = tp.__name__

    def copy(value: Any) -> Any:
        if isinstance(value, tp):
            return value
        _fail(name, value)

    def encode(value: Any) -> Any:
        return copy(value).value

    def decode(data: Any) -> Any:
        try:
            return tp(data)
        except ValueError:
            _fail(f"a value of {name} ({', '.join(repr(m.value) for m in tp)})", data)

    return copy, encode, decode


# ---------------------------------------------------------------- records


def _dataclass(tp: type) -> tuple[Fn, Fn, Fn, bool]:
    hints = typing.get_type_hints(tp, include_extras=True)
    fields = [f for f in dataclasses.fields(tp)]
    codecs = {f.name: codec_for(hints.get(f.name, Any)) for f in fields}
    names = [f.name for f in fields]
    init_names = {f.name for f in fields if f.init}
    required = {
        f.name
        for f in fields
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    name = tp.__name__
    frozen = bool(tp.__dataclass_params__.frozen)  # type: ignore[attr-defined]
    setattr_ = object.__setattr__
    new = object.__new__

    def copy(value: Any) -> Any:
        if not isinstance(value, tp):
            _fail(name, value)
        out = new(type(value))
        for n in names:
            try:
                setattr_(out, n, codecs[n].copy(getattr(value, n)))
            except Mismatch as exc:
                exc.path.append(f".{n}")
                raise
        return out

    def encode(value: Any) -> dict[str, Any]:
        if not isinstance(value, tp):
            _fail(name, value)
        out = {}
        for n in names:
            try:
                out[n] = codecs[n].encode(getattr(value, n))
            except Mismatch as exc:
                exc.path.append(f".{n}")
                raise
        return out

    def decode(data: Any) -> Any:
        if not isinstance(data, Mapping):
            _fail(f"{name} (as a map of its fields)", data)
        unknown = [k for k in data if k not in codecs]
        if unknown:
            raise Mismatch(f"only the fields of {name} (unknown field {unknown[0]!r})", data)
        missing = [n for n in required if n not in data]
        if missing:
            exc = Mismatch(f"required field {missing[0]!r} of {name}", data)
            raise exc
        kwargs = {}
        late = {}
        for k, v in data.items():
            try:
                decoded = codecs[k].decode(v)
            except Mismatch as exc:
                exc.path.append(f".{k}")
                raise
            if k in init_names:
                kwargs[k] = decoded
            else:
                late[k] = decoded
        try:
            obj = tp(**kwargs)
        except (TypeError, ValueError) as e:
            raise Mismatch(f"valid {name} ({e})", data) from None
        for k, v in late.items():
            setattr_(obj, k, v)
        return obj

    immutable = frozen and all(c.immutable for c in codecs.values())
    if immutable:
        return _identity_checked(tp, name), encode, decode, True
    return copy, encode, decode, False


def _identity_checked(tp: type, name: str) -> Fn:
    def copy(value: Any) -> Any:
        if isinstance(value, tp):
            return value
        _fail(name, value)

    return copy


def _pydantic(tp: type) -> tuple[Fn, Fn, Fn]:
    from pydantic import ValidationError

    name = tp.__name__

    def copy(value: Any) -> Any:
        if not isinstance(value, tp):
            _fail(name, value)
        return value.model_copy(deep=True)  # type: ignore[attr-defined]

    def encode(value: Any) -> Any:
        if not isinstance(value, tp):
            _fail(name, value)
        return value.model_dump(mode="json")  # type: ignore[attr-defined]

    def decode(data: Any) -> Any:
        try:
            return tp.model_validate(data)  # type: ignore[attr-defined]
        except ValidationError as e:
            raise Mismatch(f"valid {name} ({e.errors()[0].get('msg', e)})", data) from None

    return copy, encode, decode


# ---------------------------------------------------------------- dispatch


def _build(tp: Any, codec: Codec | None = None) -> Codec:
    codec = codec or Codec(tp)
    shape = shape_of(tp)
    name = describe(tp)
    match shape:
        case Plain(tp=plain):
            return codec._set(*_plain(plain))
        case Alias(inner=inner):
            c = codec_for(inner)
            return codec._set(c.copy, c.encode, c.decode, c.immutable)
        case OneOf(members=args):
            members = sorted((codec_for(a) for a in args), key=lambda c: c.tp is not NoneType)
            return codec._set(*_union(members, name), all(m.immutable for m in members))
        case Choice(values=values):
            return codec._set(*_literal(values, name), True)
        case Items(kind=kind, item=item_tp):
            item = codec_for(item_tp)
            copy, enc, dec = _seq(item, kind, name)
            if kind is list and item.immutable:
                copy = _list_copy_fast(item)
            immutable = kind in (tuple, frozenset) and item.immutable
            return codec._set(copy, enc, dec, immutable)
        case Fixed(items=args):
            items = [codec_for(a) for a in args]
            return codec._set(*_fixed_tuple(items, name), all(i.immutable for i in items))
        case Map(key=key, value=value):
            return codec._set(*_mapping(codec_for(key), codec_for(value), name), False)
        case Enumeration(tp=members):
            return codec._set(*_enum(members), True)
        case Duration():
            return codec._set(*_timedelta_codec(), True)
        case Text(tp=text):
            parse, fmt = TEXT_TYPES[text]
            return codec._set(*_stringly(text, parse, fmt), True)
        case Record(tp=record):
            return codec._set(*_dataclass(record))
        case Model(tp=model):
            return codec._set(*_pydantic(model), False)
    typing.assert_never(shape)
