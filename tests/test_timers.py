"""Timers: ticks are turns, keep going after errors, end with the activation; the
schedule has no drift and no catch-up bursts."""

from __future__ import annotations

import logging
from abc import abstractmethod

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from koala import ActorBase, ActorInterface, TimerHandle, get_rpc_proxy
from koala.host._timers import next_tick
from koala.testing import local_runtime, wait_until

pytestmark = pytest.mark.anyio

ticks: list[str] = []


class IClock(ActorInterface):
    @abstractmethod
    async def start(self, interval: float, fail_every: int) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    async def busy(self, seconds: float) -> None: ...

    @abstractmethod
    async def bye(self) -> None: ...


class ClockImpl(IClock, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.timer: TimerHandle | None = None
        self.in_turn = False
        self.count = 0
        self.fail_every = 0

    async def start(self, interval: float, fail_every: int) -> None:
        self.fail_every = fail_every
        self.timer = self.register_timer(interval, self.tick)

    async def tick(self) -> None:
        if self.in_turn:
            ticks.append("OVERLAP")
        self.count += 1
        ticks.append(f"{self.key}:{self.count}")
        if self.fail_every and self.count % self.fail_every == 0:
            raise RuntimeError(f"tick {self.count} failed")

    async def stop(self) -> None:
        assert self.timer is not None
        self.timer.cancel()

    async def busy(self, seconds: float) -> None:
        self.in_turn = True
        await anyio.sleep(seconds)
        self.in_turn = False

    async def bye(self) -> None:
        self.deactivate_on_idle()


@pytest.fixture(autouse=True)
def _reset() -> None:
    ticks.clear()


async def test_ticks_are_turns_and_never_overlap_other_turns() -> None:
    async with local_runtime(ClockImpl):
        proxy = get_rpc_proxy(IClock, "c")
        await proxy.start(0.01, 0)
        for _ in range(3):
            await proxy.busy(0.05)
        await wait_until(lambda: len(ticks) >= 5)
        await proxy.stop()
    assert "OVERLAP" not in ticks


async def test_a_failing_tick_is_logged_and_the_timer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="koala")
    async with local_runtime(ClockImpl):
        await get_rpc_proxy(IClock, "f").start(0.01, 2)
        await wait_until(lambda: len(ticks) >= 5)
    assert "tick 2 failed" in caplog.text
    assert "tick 4 failed" in caplog.text


async def test_cancel_stops_the_timer() -> None:
    async with local_runtime(ClockImpl):
        proxy = get_rpc_proxy(IClock, "s")
        await proxy.start(0.01, 0)
        await wait_until(lambda: len(ticks) >= 2)
        await proxy.stop()
        seen = len(ticks)
        await anyio.sleep(0.1)
        assert len(ticks) <= seen + 1  # at most the tick already queued


async def test_timers_end_with_the_activation() -> None:
    async with local_runtime(ClockImpl, idle_timeout=60) as rt:
        proxy = get_rpc_proxy(IClock, "e")
        await proxy.start(0.01, 0)
        await wait_until(lambda: len(ticks) >= 2)
        await proxy.bye()
        await wait_until(lambda: rt.statistics().activations == 0)
        seen = len(ticks)
        await anyio.sleep(0.1)
        assert len(ticks) == seen


@given(
    start=st.floats(0, 1e6),
    interval=st.floats(0.001, 100),
    last=st.integers(0, 10_000),
    lateness=st.floats(0, 1000),
)
def test_next_tick_is_on_the_grid_in_the_future_and_never_a_burst(
    start: float, interval: float, last: int, lateness: float
) -> None:
    now = start + last * interval + lateness
    n = next_tick(start, interval, now, last)
    assert n > last  # progress
    assert start + n * interval >= now - 1e-6 * max(1.0, now)  # never already overdue
    assert n == last + 1 or start + (n - 1) * interval <= now + 1e-6 * max(1.0, now)
    # the previous slot had passed: we skipped only ticks that were already late


def test_on_time_ticks_follow_the_grid_without_drift() -> None:
    start, interval = 100.0, 0.25
    n = 0
    for _ in range(10_000):
        n = next_tick(start, interval, start + n * interval + 0.01, n)  # each tick 10 ms late
    assert n == 10_000  # lateness did not accumulate into skipped or extra ticks
