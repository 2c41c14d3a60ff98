"""Which runtime the running code belongs to: the one a proxy bound to none calls.

A :class:`~koala.Runtime` enters itself here when it starts and leaves when it stops;
while it serves a request it is also the current one of that request's context. The
proxies (``koala._proxy``) need nothing else of a runtime than :class:`Invoker`, so
they import this module, not the runtime's.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

from ._errors import RuntimeNotRunningError

if TYPE_CHECKING:
    from ._interface import ActorInterface, MethodSpec
    from ._messages import Key


class Invoker(Protocol):
    """What a proxy calls: a runtime (see :meth:`koala.Runtime.invoke`)."""

    async def invoke(
        self, spec: MethodSpec, interface: type[ActorInterface], key: Key, args: tuple[Any, ...]
    ) -> Any: ...


_current: ContextVar[Invoker | None] = ContextVar("koala_runtime", default=None)
_started: list[Invoker] = []  # runtimes running in this process, newest last


def current_invoker() -> Invoker:
    """The runtime of this context (or, outside any, the newest running in this process)."""
    rt = _current.get()
    if rt is not None and rt in _started:  # a context may outlive its runtime
        return rt
    if _started:
        return _started[-1]
    raise RuntimeNotRunningError(
        "no Koala runtime is running in this process: start one with `koala dev APP`, "
        "or in a test with `async with koala.testing.local_runtime(...)`"
    )


def started(rt: Invoker) -> Token[Invoker | None]:
    """``rt`` runs from now on, and is the current runtime of the caller's context."""
    _started.append(rt)
    return _current.set(rt)


def stopped(rt: Invoker, token: Token[Invoker | None]) -> None:
    """``rt`` stopped: no context finds it any more."""
    if rt in _started:
        _started.remove(rt)
    with contextlib.suppress(ValueError):  # exited in another context
        _current.reset(token)


def serving(rt: Invoker) -> Token[Invoker | None]:
    """``rt`` serves a request in the caller's context; undo with :func:`done_serving`."""
    return _current.set(rt)


def done_serving(token: Token[Invoker | None]) -> None:
    _current.reset(token)
