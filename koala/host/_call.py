"""What an activation runs: calls (:class:`Call`) and turns that are not calls
(:class:`Turn`), and the context a turn runs in.

A call to a local activation carries its arguments as Python values (validated copies:
nothing is encoded on the local path) and what its caller waits on. A turn that is not a
call (a timer tick, a client session's hook) is a closure that answers no one; it has a
call chain and a deadline of its own, so it queues and runs exactly as a one-way call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import anyio

from .._drive import lazy_deadline
from .._messages import ErrorCode, ErrorInfo, Key, new_chain_id

if TYPE_CHECKING:
    from .._interface import MethodSpec
    from ._activation import Activation
    from ._catalog import Catalog

log = logging.getLogger("koala.activation")

current_chain: ContextVar[int | None] = ContextVar("koala_chain", default=None)
current_activation: ContextVar[Activation | None] = ContextVar("koala_activation", default=None)
# How many inline turns this task is nested in; past the bound calls go through a mailbox
# (a fresh task and stack), so long call chains cannot exhaust the interpreter's stack.
inline_depth: ContextVar[int] = ContextVar("koala_inline_depth", default=0)


def current_deadline() -> float:
    """The deadline of the call being served, on ``anyio.current_time()``'s clock.

    Inside an actor turn this is the caller's deadline, or the default one when the
    caller had none; ``math.inf`` outside any deadline. Prefer it to
    ``anyio.current_effective_deadline()`` in a turn: a turn on the local fast path gets
    its default deadline's cancel scope only once it first suspends.
    """
    deadline = anyio.current_effective_deadline()
    return deadline if deadline != math.inf else lazy_deadline.get()


class Call:
    """A call to a method of a local activation, in flight on this host.

    ``args`` are Python values (the caller's validated copies, or the wire's decoded
    ones). One-way calls have no ``done`` event: nobody waits, a failure is logged.
    """

    __slots__ = (
        "answered",
        "args",
        "cancelled",
        "catalog",
        "chain_id",
        "counted",
        "deadline",
        "done",
        "error",
        "ident",
        "redelivered",
        "result",
        "scope",
        "spec",
    )

    def __init__(
        self,
        catalog: Catalog,
        spec: MethodSpec,
        ident: tuple[str, Key],
        chain_id: int,
        deadline: float,
        args: tuple[Any, ...],
        one_way: bool,
    ) -> None:
        self.catalog = catalog
        self.spec = spec
        self.ident = ident  # (actor type, key)
        self.chain_id = chain_id
        self.deadline = deadline  # absolute, on anyio's clock
        self.args = args
        self.done: anyio.Event | None = None if one_way else anyio.Event()
        self.result: Any = None
        self.error: ErrorInfo | None = None
        self.scope: anyio.CancelScope | None = None
        self.cancelled = False
        self.answered = False
        self.counted = False  # counted in the host's in-flight total once accepted
        self.redelivered = 0  # activations that ended in on_activate with this queued

    def _complete(self) -> None:
        self.answered = True
        if self.counted:
            self.catalog.call_ended()
        if self.done is not None:
            self.done.set()
        elif self.error is not None and self.error.code is not ErrorCode.CANCELLED:
            log.error(
                "one-way call %s to %s/%r failed: %s\n%s",
                self.spec.qualname,
                *self.ident,
                self.error.message,
                self.error.traceback,
            )

    def finish(self, result: Any) -> None:
        if not self.answered:
            self.result = result
            self._complete()

    def fail(self, info: ErrorInfo) -> None:
        if not self.answered:
            self.error = info
            self._complete()

    def cancel(self) -> None:
        """The caller gave up: drop the call if queued, cancel its turn if running."""
        self.cancelled = True
        if self.scope is not None:
            self.scope.cancel()


TurnBody = Callable[["Activation"], Awaitable[Any]]
"""What a scheduled turn runs: given the activation (its ``instance`` is the actor)."""


class Turn:
    """A turn that is not a call: ``body(activation)`` run under a chain of its own.

    Made by :meth:`Activation.schedule_turn`. Nobody waits for it: an error it raises,
    or the reason it could not run, is logged.
    """

    __slots__ = (
        "body",
        "catalog",
        "chain_id",
        "counted",
        "deadline",
        "ident",
        "name",
        "redelivered",
    )

    def __init__(
        self,
        catalog: Catalog,
        ident: tuple[str, Key],
        body: TurnBody,
        name: str,
        deadline: float,
    ) -> None:
        self.catalog = catalog
        self.ident = ident
        self.body = body
        self.name = name  # for the log: what the turn is (a timer's callback, a hook)
        self.chain_id = new_chain_id()
        self.deadline = deadline
        self.counted = False
        self.redelivered = 0

    def fail(self, info: ErrorInfo) -> None:
        """It could not run, or it raised: say so (it ended either way)."""
        if info.code is not ErrorCode.CANCELLED:
            log.error(
                "turn %s of %s/%r failed: %s\n%s",
                self.name,
                *self.ident,
                info.message,
                info.traceback,
            )
        self.ended()

    def ended(self) -> None:
        if self.counted:
            self.counted = False
            self.catalog.call_ended()


Work = Call | Turn
"""What waits in a mailbox."""
