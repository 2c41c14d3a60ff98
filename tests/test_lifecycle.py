"""Lifecycle: activation, failing activation, idle collection, steering, calls during
deactivation, shutdown drain and overload; a burst behind a failing activation and
deactivation asked inside on_activate (both found against Orleans' tests)."""

from __future__ import annotations

from abc import abstractmethod
from collections import Counter

import anyio
import anyio.lowlevel
import pytest

from koala import (
    ActivationState,
    ActorBase,
    ActorInterface,
    KoalaError,
    OverloadedError,
    ShuttingDownError,
    get_rpc_proxy,
    one_way,
)
from koala.host._activation import MAX_REDELIVERIES
from koala.testing import local_runtime, wait_until

pytestmark = pytest.mark.anyio

log: list[str] = []
activations: Counter[str] = Counter()
fail_activation: set[str] = set()
gate: dict[str, anyio.Event] = {}


class ILife(ActorInterface):
    @abstractmethod
    async def hello(self) -> str: ...

    @abstractmethod
    async def generation(self) -> int: ...

    @abstractmethod
    async def go_away(self) -> None: ...

    @abstractmethod
    async def stay(self, seconds: float) -> None: ...

    @abstractmethod
    async def wait_gate(self, name: str) -> str: ...


class LifeImpl(ILife, ActorBase):
    idle_timeout = 0.15

    def __init__(self) -> None:
        super().__init__()
        self.greeting = ""

    async def on_activate(self) -> None:
        key = str(self.key)
        activations[key] += 1
        log.append(f"activate {key}")
        if key in fail_activation:
            raise ConnectionError(f"storage for {key} unreachable")
        self.greeting = f"hello from {key}#{activations[key]}"

    async def on_deactivate(self) -> None:
        log.append(f"deactivate-start {self.key}")
        await anyio.sleep(0.05)
        log.append(f"deactivate-end {self.key}")

    async def hello(self) -> str:
        log.append(f"hello {self.key}")
        return self.greeting

    async def generation(self) -> int:
        return activations[str(self.key)]

    async def go_away(self) -> None:
        self.deactivate_on_idle()

    async def stay(self, seconds: float) -> None:
        self.delay_deactivation(seconds)

    async def wait_gate(self, name: str) -> str:
        log.append(f"gate {name} waiting")
        await gate[name].wait()
        return name


@pytest.fixture(autouse=True)
def _reset() -> None:
    log.clear()
    activations.clear()
    fail_activation.clear()
    gate.clear()


async def test_on_activate_is_the_first_turn() -> None:
    async with local_runtime(LifeImpl):
        assert await get_rpc_proxy(ILife, "a").hello() == "hello from a#1"
    assert log[:2] == ["activate a", "hello a"]


async def test_failing_activation_fails_the_call_and_is_retried_next_time() -> None:
    fail_activation.add("f")
    async with local_runtime(LifeImpl) as rt:
        with pytest.raises(ConnectionError, match="storage for f unreachable"):
            await get_rpc_proxy(ILife, "f").hello()
        assert rt.statistics().activations == 0
        fail_activation.clear()
        assert await get_rpc_proxy(ILife, "f").hello() == "hello from f#2"


async def test_idle_activation_is_collected_and_comes_back() -> None:
    async with local_runtime(LifeImpl) as rt:
        await get_rpc_proxy(ILife, "i").hello()
        await wait_until(lambda: "deactivate-end i" in log)
        assert rt.statistics().activations == 0
        assert await get_rpc_proxy(ILife, "i").generation() == 2


async def test_busy_activation_is_not_collected() -> None:
    gate["busy"] = anyio.Event()
    async with local_runtime(LifeImpl) as rt:
        async with anyio.create_task_group() as tg:
            tg.start_soon(get_rpc_proxy(ILife, "b").wait_gate, "busy")
            await anyio.sleep(0.5)  # three idle timeouts while a turn runs
            assert not any(e.startswith("deactivate") for e in log)
            gate["busy"].set()
        assert rt.statistics().activations == 1


async def test_deactivate_on_idle_ends_the_activation_after_the_turn() -> None:
    async with local_runtime(LifeImpl, idle_timeout=60) as rt:
        await get_rpc_proxy(ILife, "d").go_away()
        await wait_until(lambda: "deactivate-end d" in log)
        assert rt.statistics().activations == 0


async def test_next_call_after_deactivate_on_idle_gets_a_fresh_activation() -> None:
    async with local_runtime(LifeImpl, idle_timeout=60):
        proxy = get_rpc_proxy(ILife, "n")
        assert await proxy.generation() == 1
        await proxy.go_away()
        assert await proxy.generation() == 2
    assert log.index("deactivate-end n") < log.index("activate n", log.index("deactivate-end n"))


async def test_delay_deactivation_keeps_an_idle_activation() -> None:
    async with local_runtime(LifeImpl) as rt:
        await get_rpc_proxy(ILife, "k").stay(0.6)
        await anyio.sleep(0.4)  # well past idle_timeout, inside the delay
        assert "deactivate-start k" not in log
        await wait_until(lambda: "deactivate-end k" in log)
        assert rt.statistics().activations == 0


async def test_call_during_deactivation_waits_for_a_fresh_activation() -> None:
    async with local_runtime(LifeImpl, idle_timeout=60) as rt:
        proxy = get_rpc_proxy(ILife, "w")
        await proxy.go_away()
        await wait_until(lambda: "deactivate-start w" in log)
        act = rt.activation_of(LifeImpl, "w")
        assert act is not None
        assert act.state is ActivationState.DEACTIVATING
        assert await proxy.hello() == "hello from w#2"  # not lost, not run on the old one
    assert log.index("deactivate-end w") < log.index("activate w", log.index("deactivate-end w"))


async def test_shutdown_drains_in_flight_turns_and_deactivates_everything() -> None:
    gate["drain"] = anyio.Event()
    results: list[str] = []
    async with local_runtime(LifeImpl, idle_timeout=60) as rt:
        for key in ("x", "y", "z"):
            await get_rpc_proxy(ILife, key).hello()

        async def in_flight() -> None:
            results.append(await get_rpc_proxy(ILife, "x").wait_gate("drain"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_flight)
            await wait_until(lambda: "gate drain waiting" in log)
            tg.start_soon(rt.shutdown)
            await wait_until(lambda: rt.draining)
            with pytest.raises(ShuttingDownError, match="shutting down"):
                await get_rpc_proxy(ILife, "y").hello()
            gate["drain"].set()
    assert results == ["drain"]
    assert {e for e in log if e.startswith("deactivate-end")} == {
        "deactivate-end x",
        "deactivate-end y",
        "deactivate-end z",
    }


async def test_host_wide_queue_bound_rejects_at_once() -> None:
    gate["block"] = anyio.Event()
    async with local_runtime(LifeImpl, max_queued=5) as rt:
        proxy = get_rpc_proxy(ILife, "o")
        async with anyio.create_task_group() as tg:
            tg.start_soon(proxy.wait_gate, "block")
            await wait_until(lambda: "gate block waiting" in log)
            for _ in range(5):
                tg.start_soon(proxy.hello)
            await wait_until(lambda: rt.statistics().queued == 5)
            with pytest.raises(OverloadedError, match="calls queued"):
                await proxy.hello()
            gate["block"].set()
        assert rt.statistics().queued == 0


async def test_mailbox_bound_rejects_at_once() -> None:
    gate["block"] = anyio.Event()
    async with local_runtime(LifeImpl, mailbox_size=2) as rt:
        proxy = get_rpc_proxy(ILife, "m")
        async with anyio.create_task_group() as tg:
            tg.start_soon(proxy.wait_gate, "block")
            await wait_until(lambda: "gate block waiting" in log)
            tg.start_soon(proxy.hello)
            tg.start_soon(proxy.hello)
            await wait_until(lambda: rt.statistics().queued == 2)
            with pytest.raises(OverloadedError, match="mailbox of LifeImpl/'m' is full"):
                await proxy.hello()
            assert await get_rpc_proxy(ILife, "other").hello() == "hello from other#1"
            gate["block"].set()


# ---------------------------------------------------------------- found against Orleans

attempts: Counter[str] = Counter()
ran: list[str] = []


class IFragile(ActorInterface):
    @abstractmethod
    async def ping(self) -> str: ...

    @one_way
    @abstractmethod
    async def poke(self) -> None: ...


class SlowToFail(IFragile, ActorBase):
    """on_activate suspends, then raises: calls pile up behind it meanwhile."""

    async def on_activate(self) -> None:
        attempts[str(self.key)] += 1
        await anyio.sleep(0.05)
        raise ConnectionError(f"storage for {self.key} unreachable")

    async def ping(self) -> str:
        return "pong"

    async def poke(self) -> None:
        pass


class GoesAtOnce(IFragile, ActorBase):
    """Asks to deactivate inside on_activate: its first activation only, or always."""

    async def on_activate(self) -> None:
        key = str(self.key)
        attempts[key] += 1
        await anyio.lowlevel.checkpoint()
        if key.startswith("always") or attempts[key] == 1:
            self.deactivate_on_idle()

    async def on_deactivate(self) -> None:
        log.append(f"deactivate {self.key}#{attempts[str(self.key)]}")

    async def ping(self) -> str:
        ran.append(f"ping {self.key}#{attempts[str(self.key)]}")
        return f"#{attempts[str(self.key)]}"

    async def poke(self) -> None:
        ran.append(f"poke {self.key}#{attempts[str(self.key)]}")


@pytest.fixture(autouse=True)
def _reset_fragile() -> None:
    attempts.clear()
    ran.clear()


async def _burst(proxy: IFragile, calls: int) -> list[BaseException | str]:
    out: list[BaseException | str] = []

    async def call() -> None:
        try:
            with anyio.fail_after(5):
                out.append(await proxy.ping())
        except Exception as exc:
            out.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(call)
    return out


@pytest.mark.parametrize("first", ["call", "one-way"])
async def test_a_burst_behind_a_failing_activation_fails_with_its_error_tried_once(
    first: str,
) -> None:
    """Orleans: the calls queued for an activation whose OnActivateAsync throws are
    rejected with that exception. Retrying the activation once per queued call made
    them wait in line (40 x on_activate), and the last ones timed out."""
    async with local_runtime(SlowToFail) as rt:
        proxy = get_rpc_proxy(IFragile, "burst")
        if first == "one-way":  # the pump activates it, not an inline caller
            await proxy.poke()
        out = await _burst(proxy, 40)
        assert rt.statistics().activations == 0
        assert rt.statistics().queued == rt.statistics().inflight == 0
    assert len(out) == 40
    assert {type(e) for e in out} == {ConnectionError}, out
    assert all("storage for burst unreachable" in str(e) for e in out)
    assert attempts["burst"] == 1


async def test_a_failed_activation_is_tried_again_by_the_next_call() -> None:
    async with local_runtime(SlowToFail):
        proxy = get_rpc_proxy(IFragile, "again")
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await proxy.ping()
    assert attempts["again"] == 2


@pytest.mark.parametrize("first", ["call", "one-way"])
async def test_deactivate_on_idle_inside_on_activate_sends_the_call_to_a_fresh_activation(
    first: str,
) -> None:
    """Orleans: a grain that calls DeactivateOnIdle in OnActivateAsync does not serve
    the pending call; it goes to a new activation. The method ran on the activation
    that was going away."""
    async with local_runtime(GoesAtOnce, idle_timeout=60) as rt:
        proxy = get_rpc_proxy(IFragile, "once")
        if first == "one-way":
            await proxy.poke()
        assert await proxy.ping() == "#2"
        assert rt.statistics().activations == 1
    assert log[0] == "deactivate once#1"  # the last turn of the first one still ran
    expected = ["poke once#2", "ping once#2"] if first == "one-way" else ["ping once#2"]
    assert ran == expected


async def test_an_actor_that_always_deactivates_in_on_activate_fails_the_call_clearly() -> None:
    async with local_runtime(GoesAtOnce, idle_timeout=60) as rt:
        out = await _burst(get_rpc_proxy(IFragile, "always"), 5)
        await wait_until(lambda: rt.statistics().activations == 0)
        assert rt.statistics().queued == rt.statistics().inflight == 0
    assert len(out) == 5
    assert all(isinstance(e, KoalaError) for e in out), out
    assert all("deactivated itself in on_activate" in str(e) for e in out)
    assert ran == []
    assert attempts["always"] <= 2 + MAX_REDELIVERIES  # bounded, not forever
