"""Run a coroutine's first step by hand, and pay for a cancel scope only if it suspends.

A cancel scope acts only where the code it guards suspends: a turn that finishes
without ever yielding to the event loop cannot be interrupted by its deadline, so a
scope around it costs (5-13 µs per call, measured) and buys nothing. The local fast path
therefore starts the turn's coroutine itself (:func:`first_step`); if the coroutine
finishes there, the call is done. If it yields, the value it yielded (an asyncio future
or a trio trap) has not reached the event loop yet: the caller enters its scope, then
awaits :func:`resume`, which hands that value to the loop and forwards everything
between loop and coroutine from then on. Cancellation, errors and ``close()`` reach
the coroutine exactly as they would through a plain ``await``.

The coroutine never changes task, so this is safe on asyncio and trio alike, with one
condition: a scope entered after the first step must be the innermost one. If the first
step itself entered a cancel scope (a task group, ``fail_after``, trio's ``sleep``) and
suspended inside it, a scope entered now would sit inside it in the task's scope stack
and corrupt it. :func:`scope_marker` tells the two cases apart: it names the task's
innermost cancel scope, so the caller compares it before and after the first step.
anyio and trio keep that scope in private attributes; when they are not where this
module looks, ``scope_marker`` is None and callers enter their scope up front. Those
lookups live in :mod:`koala._loop`, with every other use of a dependency's internals;
``scope_marker`` and ``fast_clock`` are re-exported here for the modules that use both.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Coroutine, Generator, Hashable
from contextvars import ContextVar
from typing import Any

import anyio

from ._loop import fast_clock as fast_clock
from ._loop import scope_marker as scope_marker

_UNSET: Any = object()

# Turns of a method that finish without suspending, in a row, before its turns skip the
# deadline's cancel scope until they suspend (see run_under_deadline).
SYNC_METHOD_CALLS = 8
# Methods counted per table at most (names come off the wire): the rest keep the scope.
MAX_TRACKED_METHODS = 4096

# The deadline of a turn that has not suspended yet, so no cancel scope carries it; the
# runtime reads it through koala.current_deadline() and gives it to calls the turn makes.
lazy_deadline: ContextVar[float] = ContextVar("koala_lazy_deadline", default=math.inf)


def first_step(coro: Coroutine[Any, Any, Any]) -> tuple[Any, Any]:
    """Run ``coro`` up to its first suspension: ``(result, UNSET)`` if it finished, else
    ``(UNSET, yielded)``; finish it with ``await resume(coro, yielded)``. Exceptions the
    coroutine raises propagate."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value, _UNSET
    return _UNSET, yielded


def finished(yielded: Any) -> bool:
    """Whether the ``yielded`` half of :func:`first_step`'s answer means "done"."""
    return yielded is _UNSET


@types.coroutine
def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:
    """Drive ``coro`` (suspended on ``yielded``) to its end, in the awaiting task."""
    try:
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                raise
            except BaseException as exc:
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value
    finally:
        coro.close()  # a no-op once it has finished; else it gets GeneratorExit


# A coroutine whose first step ran without a cancel scope and suspended: the coroutine,
# what it yielded, and the task's innermost scope (scope_marker()) before the step.
Suspended = tuple[Coroutine[Any, Any, Any], Any, object]


def skips_scope(
    method: Hashable, seen: dict[Any, int], marker: Callable[[], object] | None
) -> bool:
    """Whether a turn of ``method`` starts without its deadline's cancel scope: it has
    finished without suspending SYNC_METHOD_CALLS times in a row (``seen`` counts, per
    method, -1 once one suspended), and the innermost scope can be known (``marker``).

    This is the one policy for skipping the scope, wherever a turn starts: inline in
    the runtime (keyed by implementation and method) and in a transport's reader or
    serving task (keyed by interface and method, as the wire names them)."""
    return marker is not None and seen.get(method, 0) >= SYNC_METHOD_CALLS


def step_unscoped(
    make: Callable[[], Coroutine[Any, Any, Any]],
    deadline: float,
    method: Hashable,
    seen: dict[Any, int],
    marker: Callable[[], object],
) -> tuple[Any, Suspended | None]:
    """Run the first step of ``make()`` without a scope (``lazy_deadline`` carries
    ``deadline`` meanwhile): ``(result, None)`` if it finished, else ``(UNSET,
    suspended)`` for :func:`finish_under_deadline`, and ``method`` goes back to entering
    the scope first, for good. Call it only where :func:`skips_scope` said yes.
    Exceptions the coroutine raises propagate."""
    innermost = marker()
    token = lazy_deadline.set(deadline)
    try:
        coro = make()
        result, yielded = first_step(coro)
    finally:
        lazy_deadline.reset(token)
    if yielded is _UNSET:
        return result, None
    seen[method] = -1
    return result, (coro, yielded, innermost)


async def run_under_deadline(
    make: Callable[[], Coroutine[Any, Any, Any]],
    deadline: float,
    method: Hashable,
    seen: dict[Any, int],
    marker: Callable[[], object] | None,
    *,
    on_suspend: Callable[[], None] | None = None,
    on_scope: Callable[[anyio.CancelScope], None] | None = None,
) -> tuple[Any, anyio.CancelScope | None]:
    """Run the coroutine ``make()`` returns under a cancel scope with ``deadline``;
    return its result and the scope (None if none was needed).

    Until :func:`skips_scope` says the method has proved itself, the scope is entered
    first, and ``seen`` counts the turns that finish without suspending. After that
    the coroutine starts without one (:func:`step_unscoped`) and the scope is entered
    at its first suspension; if it suspended inside a cancel scope of its own, ours
    cannot go around it any more, so that one turn runs bounded by its own scopes only
    (:func:`finish_under_deadline`). ``on_suspend`` runs at the first suspension,
    ``on_scope`` when the scope is entered. If the scope cancelled the turn, the result
    is meaningless: check ``scope.cancelled_caught`` first.
    """
    if not skips_scope(method, seen, marker):
        count = seen.get(method, 0)
        with anyio.CancelScope(deadline=deadline) as scope:
            if on_scope is not None:
                on_scope(scope)
            coro = make()
            result, yielded = first_step(coro)
            if not finished(yielded):
                if on_suspend is not None:
                    on_suspend()
                result = await resume(coro, yielded)
        if 0 <= count < SYNC_METHOD_CALLS and (count or len(seen) < MAX_TRACKED_METHODS):
            seen[method] = count + 1 if finished(yielded) else -1
        return result, scope
    assert marker is not None  # skips_scope said so
    result, suspended = step_unscoped(make, deadline, method, seen, marker)
    if suspended is None:
        return result, None
    if on_suspend is not None:
        on_suspend()
    return await finish_under_deadline(suspended, deadline, marker, on_scope)


async def finish_under_deadline(
    suspended: Suspended,
    deadline: float,
    marker: Callable[[], object],
    on_scope: Callable[[anyio.CancelScope], None] | None = None,
) -> tuple[Any, anyio.CancelScope | None]:
    """Drive a coroutine whose first step ran without a scope (:func:`step_unscoped`)
    to its end: under a cancel scope with ``deadline`` if the task's innermost scope is
    still the one named before the step, else bounded by the scopes it entered itself
    (see run_under_deadline)."""
    coro, yielded, innermost = suspended
    if marker() is not innermost:
        return await resume(coro, yielded), None
    result: Any = _UNSET
    with anyio.CancelScope(deadline=deadline) as scope:
        if on_scope is not None:
            on_scope(scope)
        result = await resume(coro, yielded)
    return result, scope
