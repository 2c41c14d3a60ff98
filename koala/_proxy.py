"""Proxies: typed stand-ins for actors, generated once per interface."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ._context import Invoker, current_invoker
from ._errors import InterfaceError
from ._interface import ActorInterface, MethodSpec
from ._messages import Key

I = TypeVar("I", bound=ActorInterface)

_classes: dict[type[ActorInterface], type[Any]] = {}


class _ProxyBase:
    """State of a proxy: the key, and the runtime it is bound to (None: the current one)."""

    __slots__ = ()
    _key: Any
    _rt: Invoker | None
    _iface: type[ActorInterface]

    def __repr__(self) -> str:
        return f"<proxy {self._iface.__name__}/{self._key!r}>"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _ProxyBase)
            and other._iface is self._iface
            and type(other._key) is type(self._key)
            and other._key == self._key
        )

    def __hash__(self) -> int:
        return hash((self._iface, type(self._key), self._key))


def _method(spec: MethodSpec) -> Callable[..., Coroutine[Any, Any, Any]]:
    nparams = spec.nparams

    async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        rt = self._rt or current_invoker()
        if kwargs or len(args) != nparams:
            args = spec.bind(args, kwargs)
        return await rt.invoke(spec, self._iface, self._key, args)

    call.__name__ = spec.name
    call.__qualname__ = f"{spec.interface.__name__}Proxy.{spec.name}"
    call.__doc__ = spec.func.__doc__
    return call


def _proxy_class(interface: type[ActorInterface]) -> type[Any]:
    cls = _classes.get(interface)
    if cls is None:
        ns: dict[str, Any] = {"__koala_generated__": True, "_iface": interface}
        for name, spec in interface.__koala_methods__.items():
            ns[name] = _method(spec)
        cls = type(f"{interface.__name__}Proxy", (_ProxyBase, interface), ns)
        cls.__init__ = _init
        _classes[interface] = cls
    return cls


def _init(self: Any, key: Any, rt: Invoker | None) -> None:
    object.__setattr__(self, "_key", key)
    object.__setattr__(self, "_rt", rt)


def make_proxy(interface: Callable[..., I], key: Any, rt: Invoker | None = None) -> I:
    """A proxy to ``(interface, key)`` bound to ``rt`` (None: the current runtime)."""
    if not (isinstance(interface, type) and interface.__dict__.get("__koala_interface__")):
        raise InterfaceError(
            f"{interface!r} is not an actor interface: pass a subclass of ActorInterface"
        )
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"an actor key is a str or an int, got {type(key).__name__} ({key!r})")
    return _proxy_class(interface)(key, rt)  # type: ignore[no-any-return]


def get_rpc_proxy(interface: Callable[..., I], key: Key, *, runtime: Invoker | None = None) -> I:
    """A proxy to the actor ``(interface, key)``; works anywhere in a running Koala process.

    ``await get_rpc_proxy(IPlayer, "1").echo("hi")``. The proxy is cheap to make. Without
    ``runtime`` it binds to the running runtime when called (the one serving the current
    context, else the newest started in this process), so it can be made at import
    time; with ``runtime=rt`` every call goes through ``rt``, which is what a process
    running several runtimes (a test of a cluster, a benchmark) needs.
    """
    return make_proxy(interface, key, runtime)
