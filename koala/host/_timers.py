"""Timers of an activation: each tick is a turn of the actor (see ``schedule_turn``).

A timer's task sleeps until tick n is due at ``start + n * interval`` and then schedules
the tick as a turn with a chain of its own, so ticks never overlap other turns. A tick
still queued or running when the next is due makes that one skip; after a delay the next
index is the first slot still in the future (:func:`next_tick`), so a late timer does
not replay missed ticks in a burst and never drifts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import OverloadedError
from ._states import State

if TYPE_CHECKING:
    from ._activation import Activation

log = logging.getLogger("koala.activation")


class TimerHandle:
    """A registered timer; ``cancel()`` stops it. Ticks never overlap other turns."""

    __slots__ = ("_pending", "_scope", "callback", "interval", "ticks")

    def __init__(self, interval: float, callback: Callable[[], Awaitable[Any]]) -> None:
        self.interval = interval
        self.callback = callback
        self.ticks = 0
        self._pending = False
        self._scope = anyio.CancelScope()

    def cancel(self) -> None:
        self._scope.cancel()

    @property
    def cancelled(self) -> bool:
        return self._scope.cancel_called


def next_tick(start: float, interval: float, now: float, last: int) -> int:
    """Index of the next tick to run after tick `last`, at time `now`.

    Tick n is due at ``start + n * interval``. Ticks whose time already passed are
    skipped rather than run back to back, so a late timer catches up without a burst.
    """
    behind = math.floor((now - start) / interval) + 1
    return max(last + 1, behind)


def check_timer(interval: float, callback: Callable[[], Awaitable[Any]]) -> TimerHandle:
    """A handle for ``register_timer(interval, callback)``, or a clear error."""
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        raise ValueError(f"register_timer() needs a positive interval, got {interval!r}")
    if not callable(callback):
        raise TypeError("register_timer() needs an async callable taking no arguments")
    return TimerHandle(float(interval), callback)


async def run_timer(act: Activation, handle: TimerHandle) -> None:
    """The timer's task: schedule a tick of ``act`` when due, until cancelled or the
    activation is no longer live."""
    with handle._scope:
        start = anyio.current_time()
        n = 1
        while True:
            await anyio.sleep_until(start + n * handle.interval)
            if act.state is not State.VALID and act.state is not State.ACTIVATING:
                break
            if not handle._pending:
                handle._pending = True
                _schedule_tick(act, handle)
            n = next_tick(start, handle.interval, anyio.current_time(), n)
    act.timer_ended(handle)


def _schedule_tick(act: Activation, handle: TimerHandle) -> None:
    async def tick(_: Activation) -> None:
        try:
            handle.ticks += 1
            await handle.callback()
        except Exception:
            log.exception("timer tick of %s/%r raised; the timer goes on", *act.ident)
        finally:
            handle._pending = False

    try:
        act.schedule_turn(tick, getattr(handle.callback, "__name__", "callback"))
    except OverloadedError:
        handle._pending = False
        log.warning("timer tick of %s/%r skipped: mailbox full", *act.ident)
