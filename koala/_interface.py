"""Actor interfaces: checked when defined, compiled into typed method specs when first used."""

from __future__ import annotations

import inspect
import typing
from abc import ABC
from collections.abc import Callable
from typing import Any, TypeVar

from ._codec import Codec, Mismatch, codec_for
from ._errors import ArgumentTypeError, InterfaceError

F = TypeVar("F", bound=Callable[..., Any])

_ONE_WAY_ATTR = "__koala_one_way__"


def one_way(func: F) -> F:
    """Mark an interface method as one-way: the caller sends it and does not wait.

    A one-way method must be annotated ``-> None``; its errors are logged by the host.
    """
    setattr(func, _ONE_WAY_ATTR, True)
    return func


class MethodSpec:
    """One remotely callable method: its name, its typed parameters and result."""

    __slots__ = (
        "_built",
        "_params",
        "_result",
        "defaults",
        "func",
        "interface",
        "name",
        "nparams",
        "one_way",
        "param_names",
        "qualname",
        "signature",
    )

    def __init__(self, interface: type, func: Callable[..., Any]) -> None:
        self.interface = interface
        self.func = func
        self.name = func.__name__
        self.qualname = f"{interface.__name__}.{self.name}"
        self.one_way = bool(getattr(func, _ONE_WAY_ATTR, False))
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())[1:]  # drop self
        self.param_names = tuple(p.name for p in params)
        self.nparams = len(params)
        self._built = False
        self._params: tuple[Codec, ...] = ()
        self._result: Codec | None = None

    def _build(self) -> None:
        try:
            hints = typing.get_type_hints(self.func, include_extras=True)
        except Exception as exc:
            raise InterfaceError(
                f"cannot resolve the annotations of {self.qualname}: {exc}; "
                "define the types it names before the first call"
            ) from exc
        self._params = tuple(codec_for(hints[n]) for n in self.param_names)
        self._result = codec_for(hints["return"])
        self._built = True

    @property
    def params(self) -> tuple[Codec, ...]:
        if not self._built:
            self._build()
        return self._params

    @property
    def result(self) -> Codec:
        if not self._built:
            self._build()
        assert self._result is not None
        return self._result

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """Positional and keyword arguments -> one positional tuple, in declaration order."""
        if not kwargs and len(args) == self.nparams:
            return args
        try:
            bound = self.signature.bind(None, *args, **kwargs)
        except TypeError as exc:
            raise ArgumentTypeError(f"{self.qualname}(): {exc}") from None
        bound.apply_defaults()
        return tuple(bound.arguments[n] for n in self.param_names)

    def copy_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Validate positional arguments and copy them for the callee (the local path)."""
        if not self._built:
            self._build()
        codecs = self._params
        try:
            if len(args) == 1 == len(codecs):  # the common case, without a loop
                return (codecs[0].copy(args[0]),)
            return tuple([c.copy(v) for c, v in zip(codecs, args, strict=True)])
        except Mismatch:
            for name, codec, value in zip(self.param_names, codecs, args, strict=True):
                codec.check(value, f"{self.qualname}() argument {name!r}")
            raise

    def copy_result(self, value: Any) -> Any:
        """Validate a result and copy it for the caller (the local path)."""
        codec = self._result if self._built else self.result
        assert codec is not None
        try:
            return codec.copy(value)
        except Mismatch as exc:
            raise exc.to_error(f"the result of {self.qualname}") from None

    def encode_args(self, args: tuple[Any, ...]) -> list[Any]:
        return [
            c.to_wire(v, f"{self.qualname}() argument {n!r}")
            for n, c, v in zip(self.param_names, self.params, args, strict=True)
        ]

    def decode_args(self, data: Any) -> tuple[Any, ...]:
        if not isinstance(data, (list, tuple)) or len(data) != self.nparams:
            raise ArgumentTypeError(
                f"{self.qualname}() takes {self.nparams} arguments, the request carried "
                f"{len(data) if isinstance(data, (list, tuple)) else data!r}"
            )
        return tuple(
            c.from_wire(v, f"{self.qualname}() argument {n!r}")
            for n, c, v in zip(self.param_names, self.params, data, strict=True)
        )


def _check_method(iface: type, name: str, func: Any) -> None:
    where = f"{iface.__name__}.{name}"
    if not inspect.iscoroutinefunction(func):
        raise InterfaceError(
            f"{where} must be declared 'async def': actor methods are awaited by callers"
        )
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if not params or params[0].name != "self":
        raise InterfaceError(f"{where} must take 'self' as its first parameter")
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InterfaceError(f"{where} cannot take *{p.name}: every parameter needs a type")
        if p.annotation is p.empty:
            raise InterfaceError(f"{where} parameter {p.name!r} has no type annotation")
    if sig.return_annotation is sig.empty:
        raise InterfaceError(f"{where} has no return annotation (write '-> None' if none)")
    if getattr(func, _ONE_WAY_ATTR, False) and sig.return_annotation not in (None, "None"):
        raise InterfaceError(f"{where} is one-way, so it must be annotated '-> None'")


class ActorInterface(ABC):
    """Base of actor interfaces: subclass it and declare ``@abstractmethod async def`` methods.

    Every public method must be ``async def`` and fully annotated; this is checked when
    the class is defined. Only interface methods can be called through a proxy.
    """

    __koala_methods__: dict[str, MethodSpec] = {}
    __koala_interface__: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("__koala_generated__") or _is_implementation(cls):
            return
        methods: dict[str, MethodSpec] = {}
        for base in reversed(cls.__mro__[1:]):
            methods.update(getattr(base, "__koala_own_methods__", {}))
        own: dict[str, MethodSpec] = {}
        for name, value in cls.__dict__.items():
            if name.startswith("_"):
                continue
            func = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if not callable(func):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                raise InterfaceError(
                    f"{cls.__name__}.{name}: interfaces hold instance methods only"
                )
            _check_method(cls, name, func)
            own[name] = MethodSpec(cls, func)
        cls.__koala_own_methods__ = own  # type: ignore[attr-defined]
        methods.update(own)
        cls.__koala_methods__ = methods
        cls.__koala_interface__ = True


def _is_implementation(cls: type) -> bool:
    return any(b.__dict__.get("__koala_actor_base__", False) for b in cls.__mro__)


def interfaces_of(cls: type) -> list[type[ActorInterface]]:
    """The actor interfaces a class implements, most derived first."""
    return [
        b
        for b in cls.__mro__
        if isinstance(b, type)
        and issubclass(b, ActorInterface)
        and b.__dict__.get("__koala_interface__", False)
    ]
