"""Deadlines: the caller's cancel scope bounds the call and cancels the callee's turn."""

from __future__ import annotations

import logging
import math
from abc import abstractmethod

import anyio
import anyio.lowlevel
import pytest

from koala import ActorBase, ActorInterface, current_deadline, get_rpc_proxy, one_way
from koala._drive import MAX_TRACKED_METHODS, run_under_deadline
from koala.testing import fail_if_hangs, local_runtime, wait_until
from tests._hooks import require_scope_marker

pytestmark = pytest.mark.anyio

events: list[str] = []
observed: dict[str, float] = {}


class ISlow(ActorInterface):
    @abstractmethod
    async def sleep(self, seconds: float, label: str) -> str: ...

    @abstractmethod
    async def deadline(self) -> float: ...

    @abstractmethod
    async def deadlines_around_a_suspension(self) -> list[float]: ...

    @abstractmethod
    async def nested_deadline(self, other: str) -> list[float]: ...

    @abstractmethod
    async def record(self, label: str) -> None: ...

    @one_way
    @abstractmethod
    async def fire(self, label: str, seconds: float) -> None: ...

    @one_way
    @abstractmethod
    async def explode(self) -> None: ...


class SlowImpl(ISlow, ActorBase):
    async def sleep(self, seconds: float, label: str) -> str:
        events.append(f"start {label}")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            events.append(f"cancelled {label}")
            raise
        events.append(f"end {label}")
        return label

    async def deadline(self) -> float:
        return current_deadline()

    async def deadlines_around_a_suspension(self) -> list[float]:
        before = current_deadline()
        await anyio.lowlevel.checkpoint()  # now a cancel scope carries the default deadline
        return [before, current_deadline(), anyio.current_effective_deadline()]

    async def nested_deadline(self, other: str) -> list[float]:
        inner = await self.get_proxy(ISlow, other).deadline()
        return [current_deadline(), inner]

    async def record(self, label: str) -> None:
        events.append(label)

    async def fire(self, label: str, seconds: float) -> None:
        await anyio.sleep(seconds)
        events.append(f"fired {label}")

    async def explode(self) -> None:
        raise RuntimeError("one-way failure")


async def test_caller_deadline_ends_call_and_cancels_the_callee_turn() -> None:
    events.clear()
    async with local_runtime(SlowImpl):
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await get_rpc_proxy(ISlow, "s").sleep(30, "long")
        with anyio.fail_after(5):  # the turn is over: the actor answers at once
            await get_rpc_proxy(ISlow, "s").record("after")
    assert events == ["start long", "cancelled long", "after"]


async def test_callee_sees_the_propagated_deadline_and_nested_calls_inherit_it() -> None:
    async with local_runtime(SlowImpl):
        with anyio.move_on_after(7) as scope:
            seen = await get_rpc_proxy(ISlow, "s").deadline()
            outer, inner = await get_rpc_proxy(ISlow, "a").nested_deadline("b")
        assert seen == pytest.approx(scope.deadline, abs=1e-6)
        assert outer == pytest.approx(scope.deadline, abs=1e-6)
        assert inner == pytest.approx(scope.deadline, abs=1e-6)


async def test_calls_without_a_deadline_get_the_default() -> None:
    events.clear()
    async with local_runtime(SlowImpl, default_timeout=0.3):
        start = anyio.current_time()
        seen = await get_rpc_proxy(ISlow, "s").deadline()
        assert math.isfinite(seen)
        assert start + 0.3 <= seen <= anyio.current_time() + 0.3
        before, after, scoped = await get_rpc_proxy(ISlow, "s").deadlines_around_a_suspension()
        assert math.isfinite(before)
        assert before == after == scoped
        with pytest.raises(TimeoutError):
            await get_rpc_proxy(ISlow, "s").sleep(30, "forever")
        await get_rpc_proxy(ISlow, "s").record("after")
    assert events == ["start forever", "cancelled forever", "after"]


async def test_request_expired_in_the_mailbox_is_dropped_not_run() -> None:
    events.clear()
    async with local_runtime(SlowImpl):
        proxy = get_rpc_proxy(ISlow, "q")
        async with anyio.create_task_group() as tg:
            tg.start_soon(proxy.sleep, 0.5, "blocker")
            await wait_until(lambda: "start blocker" in events)
            with pytest.raises(TimeoutError), anyio.fail_after(0.1):
                await proxy.record("expired")  # waits behind the blocker, then expires
        await proxy.record("fresh")
    assert events == ["start blocker", "end blocker", "fresh"]


async def test_one_way_returns_before_the_callee_runs() -> None:
    events.clear()
    async with local_runtime(SlowImpl) as rt:
        proxy = get_rpc_proxy(ISlow, "o")
        with anyio.fail_after(0.5):
            await proxy.fire("x", 0.2)  # returns at once: the turn sleeps 0.2 s
        assert events == []
        await wait_until(lambda: rt.statistics().inflight == 0)
    assert events == ["fired x"]


async def test_one_way_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="koala")
    async with local_runtime(SlowImpl) as rt:
        await get_rpc_proxy(ISlow, "o").explode()
        await wait_until(lambda: rt.statistics().inflight == 0)
    assert "one-way call ISlow.explode" in caplog.text
    assert "one-way failure" in caplog.text


async def test_first_call_with_a_passed_deadline_leaves_no_half_made_activation() -> None:
    async with local_runtime(SlowImpl) as rt:
        with pytest.raises(TimeoutError), anyio.CancelScope(deadline=anyio.current_time() - 1):
            await get_rpc_proxy(ISlow, "late").record("never")
        assert rt.statistics().activations == 0
        await get_rpc_proxy(ISlow, "late").record("fine")
    assert "never" not in events


# The default deadline on the local fast path: a method whose turns keep finishing
# without suspending skips the cancel scope until a turn suspends (koala._drive).

gates: dict[str, anyio.Event] = {}


@pytest.fixture(autouse=True)
def _fresh_gates() -> None:
    gates.clear()  # events belong to one event loop


class IGate(ActorInterface):
    @abstractmethod
    async def pass_or_wait(self, wait: bool) -> str: ...

    @abstractmethod
    async def wait_in_own_scope(self, wait: bool, seconds: float) -> str: ...

    @abstractmethod
    async def ask(self, other: str, wait: bool) -> str: ...


class GateImpl(IGate, ActorBase):
    async def pass_or_wait(self, wait: bool) -> str:
        if wait:
            events.append(f"waiting {self.key}")
            try:
                await gates.setdefault(str(self.key), anyio.Event()).wait()
            except anyio.get_cancelled_exc_class():
                events.append(f"cancelled {self.key}")
                raise
        return f"passed {self.key}"

    async def wait_in_own_scope(self, wait: bool, seconds: float) -> str:
        if wait:
            with anyio.move_on_after(seconds):
                await gates.setdefault(str(self.key), anyio.Event()).wait()
        return f"passed {self.key}"

    async def ask(self, other: str, wait: bool) -> str:
        return await self.get_proxy(IGate, other).pass_or_wait(wait)


WARM = 12  # more turns than koala._activation.SYNC_METHOD_CALLS


async def test_a_method_that_never_suspended_still_gets_the_default_deadline() -> None:
    events.clear()
    async with local_runtime(GateImpl, default_timeout=0.3) as rt:
        proxy = get_rpc_proxy(IGate, "g1")
        for _ in range(WARM):
            assert await proxy.pass_or_wait(False) == "passed g1"
        async with fail_if_hangs():
            with pytest.raises(TimeoutError):
                await proxy.pass_or_wait(True)  # suspends outside any scope of its own
        assert events == ["waiting g1", "cancelled g1"]
        assert await proxy.pass_or_wait(False) == "passed g1"  # the activation is free
        assert rt.statistics().inflight == 0


async def test_nested_inline_turns_share_the_outer_default_deadline() -> None:
    events.clear()
    async with local_runtime(GateImpl, default_timeout=0.3):
        proxy = get_rpc_proxy(IGate, "outer")
        for _ in range(WARM):
            assert await proxy.ask("inner", False) == "passed inner"
        async with fail_if_hangs():
            with pytest.raises(TimeoutError):
                await proxy.ask("inner", True)
        assert events == ["waiting inner", "cancelled inner"]
        assert await proxy.ask("inner", False) == "passed inner"


async def test_a_turn_suspending_in_its_own_scope_makes_its_method_scoped() -> None:
    require_scope_marker()  # without it every turn enters the default deadline's scope
    async with local_runtime(GateImpl, default_timeout=0.3) as rt:
        proxy = get_rpc_proxy(IGate, "g2")
        for _ in range(WARM):
            assert await proxy.wait_in_own_scope(False, 0) == "passed g2"
        # this turn suspended inside its own move_on_after, where no scope can be put
        # around it any more: its own scope bounds it (0.5 s, past the default 0.3 s)
        async with fail_if_hangs():
            assert await proxy.wait_in_own_scope(True, 0.5) == "passed g2"
        assert rt.sync_methods[(GateImpl, "wait_in_own_scope")] == -1
        # from now on the method enters the default deadline's scope up front
        async with fail_if_hangs():
            with pytest.raises(TimeoutError):
                await proxy.wait_in_own_scope(True, 30)


async def test_the_table_of_methods_seen_is_bounded() -> None:
    async def quick() -> int:
        return 1

    seen: dict[object, int] = {}
    deadline = anyio.current_time() + 10
    for i in range(MAX_TRACKED_METHODS + 50):
        result, scope = await run_under_deadline(quick, deadline, ("I", f"m{i}"), seen, None)
        assert result == 1
        assert scope is not None
    assert len(seen) == MAX_TRACKED_METHODS
