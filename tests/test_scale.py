"""Many activations: collection, eviction and shutdown in batches that let other tasks
run, the local fast path's yield, the draining host's live chains, and shed."""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import Counter
from typing import Any

import anyio
import pytest

from koala import (
    LOCAL,
    ActivationState,
    ActorBase,
    ActorInterface,
    ConfigError,
    HostConfig,
    Key,
    Runtime,
    ShuttingDownError,
    get_rpc_proxy,
)
from koala._interface import MethodSpec
from koala._messages import ErrorCode, Request, new_request_id
from koala.testing import local_runtime, wait_until

pytestmark = pytest.mark.anyio

deactivated: Counter[str] = Counter()
running = {"now": 0, "most": 0}
gates: dict[str, anyio.Event] = {}


@pytest.fixture(autouse=True)
def _reset() -> None:
    deactivated.clear()
    running.update(now=0, most=0)
    gates.clear()


class IPlain(ActorInterface):
    @abstractmethod
    async def touch(self) -> int: ...


class Plain(IPlain, ActorBase):
    """Nothing to run on deactivation: collected without a task."""

    async def touch(self) -> int:
        return 1


class IHot(ActorInterface):
    @abstractmethod
    async def ping(self, n: int) -> int: ...


class Hot(IHot, ActorBase):
    idle_timeout = 3600

    async def ping(self, n: int) -> int:
        return n


class IFarewell(ActorInterface):
    @abstractmethod
    async def touch(self) -> int: ...


class Farewell(IFarewell, ActorBase):
    """An on_deactivate that suspends (and, for key "gated", waits for a gate)."""

    idle_timeout = 0.2

    async def on_deactivate(self) -> None:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        try:
            if self.key == "gated":
                await gates["gated"].wait()
            else:
                await anyio.sleep(0.001)
        finally:
            running["now"] -= 1
        deactivated[str(self.key)] += 1

    async def touch(self) -> int:
        return len(deactivated)


class CountingDirectory:
    """Every actor lives here; counts what the runtime says left."""

    def __init__(self) -> None:
        self.left: Counter[tuple[str, Key]] = Counter()

    def lookup(self, actor_type: str, key: Key) -> str | None:
        return LOCAL

    async def resolve(self, actor_type: str, key: Key) -> str:
        return LOCAL

    def forget(self, actor_type: str, key: Key) -> None:
        pass

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return True

    def released(self, actor_type: str, key: Key) -> None:
        self.left[(actor_type, key)] += 1


async def _worst_gap_while(busy: anyio.Event, *, interval: float = 0.001) -> float:
    """The longest time between two calls to a hot actor made every ``interval`` until
    ``busy`` is set, in CPU time of this thread: what this process did meanwhile, not
    what other processes on a loaded machine did."""
    hot = get_rpc_proxy(IHot, "hot")
    await hot.ping(0)
    worst = 0.0
    last = time.thread_time()
    while not busy.is_set():
        await anyio.sleep(interval)
        assert await hot.ping(1) == 1
        now = time.thread_time()
        worst = max(worst, now - last)
        last = now
    return worst


class ILingering(ActorInterface):
    @abstractmethod
    async def touch(self) -> int: ...


class Lingering(ILingering, ActorBase):
    """Idle, kept a while: many of them expire together, once all are activated."""

    idle_timeout = 0.05

    async def on_activate(self) -> None:
        self.delay_deactivation(3.0)

    async def touch(self) -> int:
        return 1


async def test_collecting_many_idle_actors_does_not_block_a_concurrent_caller() -> None:
    count = 40_000
    directory = CountingDirectory()
    config = HostConfig(collection_interval=0.05, max_queued=10 * count, shutdown_grace=2)
    async with Runtime(config, [Lingering, Hot], directory=directory) as rt:
        for i in range(count):
            await get_rpc_proxy(ILingering, i).touch()
        assert rt.statistics().activations == count  # none expired yet
        gone = anyio.Event()
        worst: list[float] = []

        async def caller() -> None:
            worst.append(await _worst_gap_while(gone))

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await wait_until(lambda: rt.statistics().activations <= 1, timeout=30)
            gone.set()
        assert rt.is_active("Hot", "hot")
    # the old collector deactivated them all in one pass: seconds without a turn for others
    assert worst[0] < 0.5
    left = {ident: n for ident, n in directory.left.items() if ident[0] == "Lingering"}
    assert len(left) == count  # each left the catalog, and said so once
    assert set(left.values()) == {1}


async def test_idle_activation_with_an_on_deactivate_runs_it_in_a_bounded_set_of_tasks() -> None:
    async with local_runtime(Farewell, deactivation_tasks=3, idle_timeout=0.2) as rt:
        for i in range(60):
            await get_rpc_proxy(IFarewell, i).touch()
        await wait_until(lambda: rt.statistics().activations == 0, timeout=10)
    assert deactivated == Counter({str(i): 1 for i in range(60)})
    assert 1 <= running["most"] <= 3


async def test_call_during_a_collected_deactivation_waits_for_a_fresh_activation() -> None:
    gates["gated"] = anyio.Event()
    async with local_runtime(Farewell) as rt:
        proxy = get_rpc_proxy(IFarewell, "gated")
        assert await proxy.touch() == 0
        await wait_until(lambda: running["now"] == 1)  # collected: on_deactivate runs
        old = rt.activation_of(Farewell, "gated")
        assert old is not None
        assert old.state is ActivationState.DEACTIVATING
        async with anyio.create_task_group() as tg:
            answers: list[int] = []

            async def call() -> None:
                answers.append(await proxy.touch())

            tg.start_soon(call)
            await wait_until(lambda: rt.statistics().queued == 1)
            assert not answers  # it waits: on_deactivate is the last turn
            gates["gated"].set()
        assert answers == [1]  # run by a fresh activation, after the old one's last turn
        assert rt.activation_of(Farewell, "gated") is not old


async def test_evict_all_in_batches_keeps_every_activation_out_until_done() -> None:
    count = 3_000
    async with local_runtime(Plain, Farewell, Hot, idle_timeout=60, deactivation_batch=50) as rt:
        for i in range(count):
            await get_rpc_proxy(IPlain, i).touch()
        for i in range(20):
            await get_rpc_proxy(IFarewell, i).touch()
        await get_rpc_proxy(IHot, "hot").ping(0)
        refused: list[str] = []

        async def try_meanwhile() -> None:
            # evict_all lets other tasks run between batches: none starts an activation
            while rt.statistics().activations:
                try:
                    await get_rpc_proxy(IPlain, "new").touch()
                except ShuttingDownError:
                    refused.append("new")
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(try_meanwhile)
            assert await rt.evict_all(grace=5) == 0
        assert refused
        assert not rt.is_active("Plain", "new")
        assert deactivated == Counter({str(i): 1 for i in range(20)})
        assert await get_rpc_proxy(IPlain, 1).touch() == 1  # serving again afterwards
        assert rt.statistics().activations == 1


async def test_evict_all_returns_what_is_left_after_its_grace() -> None:
    gates["gated"] = anyio.Event()
    async with local_runtime(Plain, Farewell, idle_timeout=60) as rt:
        for i in range(500):
            await get_rpc_proxy(IPlain, i).touch()
        await get_rpc_proxy(IFarewell, "gated").touch()
        assert await rt.evict_all(grace=0.2) == 1
        gates["gated"].set()
        await wait_until(lambda: rt.statistics().activations == 0)


async def test_shutdown_in_batches_runs_every_on_deactivate() -> None:
    async with local_runtime(Plain, Farewell, idle_timeout=60, deactivation_batch=10) as rt:
        for i in range(1_000):
            await get_rpc_proxy(IPlain, i).touch()
        for i in range(30):
            await get_rpc_proxy(IFarewell, i).touch()
    assert deactivated == Counter({str(i): 1 for i in range(30)})
    assert rt.statistics().activations == 0


async def test_a_loop_of_local_calls_that_never_suspend_lets_other_tasks_run() -> None:
    ticks: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            await anyio.sleep(0.001)
            ticks.append(anyio.current_time())
            cpu.append(time.thread_time())

    cpu: list[float] = []

    async with local_runtime(Hot) as rt, anyio.create_task_group() as tg:
        proxy = get_rpc_proxy(IHot, "loop")
        await proxy.ping(0)
        tg.start_soon(ticker)
        await anyio.sleep(0.01)
        start, start_cpu = anyio.current_time(), time.thread_time()
        ticks.clear()
        cpu.clear()
        n = 0
        while anyio.current_time() - start < 0.3:  # calls that finish without suspending
            n += await proxy.ping(1)
        end, end_cpu = anyio.current_time(), time.thread_time()
        seen = [c for t, c in zip(ticks, cpu, strict=True) if start <= t <= end]
        done = True
        assert rt.statistics().activations == 1
    assert n > 1_000
    assert len(seen) >= 5  # the old fast path never let the ticker in: none
    # in CPU time of this thread (a loaded machine may hold the whole process up)
    gaps = [b - a for a, b in zip([start_cpu, *seen], [*seen, end_cpu], strict=True)]
    assert max(gaps) < 0.15


# ------------------------------------------------------------------ draining


class INear(ActorInterface):
    @abstractmethod
    async def start(self) -> str: ...

    @abstractmethod
    async def back(self, tag: str) -> str: ...


class Near(INear, ActorBase):
    async def start(self) -> str:
        return await get_rpc_proxy(IFar, "f").hop("x")

    async def back(self, tag: str) -> str:
        return f"back {tag}"


class IFar(ActorInterface):
    @abstractmethod
    async def hop(self, tag: str) -> str: ...


class Far(IFar, ActorBase):  # lives on the (fake) peer
    async def hop(self, tag: str) -> str:
        raise AssertionError("never runs here")


class PeerDirectory(CountingDirectory):
    def lookup(self, actor_type: str, key: Key) -> str | None:
        return "peer" if actor_type == "Far" else LOCAL


class CallingBack:
    """A peer whose Far.hop calls Near.back on this host, in the caller's chain, once the
    host drains; and also sends a request of a chain this host never saw."""

    def __init__(self) -> None:
        self.rt: Runtime | None = None
        self.answers: dict[str, Any] = {}

    def request(self, chain: int, key: str) -> Request:
        deadline = anyio.current_time() + 5
        return Request(new_request_id(), chain, deadline, "Near", key, "INear", "back", ("x",))

    async def call(self, host: str, req: Request, spec: MethodSpec) -> Any:
        rt = self.rt
        assert rt is not None
        assert host == "peer"
        await wait_until(lambda: rt.draining)
        self.answers["live"] = await rt.serve_request(self.request(req.chain_id, "n2"))
        self.answers["other"] = await rt.serve_request(self.request(req.chain_id + 1, "n3"))
        live = self.answers["live"]
        return f"hop via {live.result}" if live.error is None else "refused"


async def test_a_draining_host_accepts_requests_of_live_chains_only() -> None:
    peer = CallingBack()
    config = HostConfig(shutdown_grace=5)
    async with Runtime(config, [Near, Far], directory=PeerDirectory(), remote=peer) as rt:
        peer.rt = rt
        result: list[str] = []

        async def first() -> None:
            result.append(await get_rpc_proxy(INear, "n1").start())

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await wait_until(lambda: bool(rt._chains))  # the call is out, at the peer
            tg.start_soon(rt.shutdown)
    assert result == ["hop via back x"]
    assert peer.answers["live"].error is None
    other = peer.answers["other"].error
    assert other is not None
    assert other.code is ErrorCode.SHUTTING_DOWN
    assert not rt._chains


# ------------------------------------------------------------------ shed


class IGate(ActorInterface):
    @abstractmethod
    async def hold(self) -> str: ...


class Gate(IGate, ActorBase):
    async def hold(self) -> str:
        await gates["hold"].wait()
        return "done"


async def test_shed_deactivates_idle_activations_least_recently_used_first() -> None:
    gates["hold"] = anyio.Event()
    async with local_runtime(
        Plain, Gate, idle_timeout=60, collection_interval=0.05, deactivation_batch=7
    ) as rt:
        async with anyio.create_task_group() as tg:
            tg.start_soon(get_rpc_proxy(IGate, "busy").hold)  # the oldest, but busy
            await wait_until(lambda: rt.is_active("Gate", "busy"))
            for i in range(40):
                await get_rpc_proxy(IPlain, f"old{i}").touch()
            await anyio.sleep(0.15)  # the coarse clock moves on: the next ones are newer
            for i in range(40):
                await get_rpc_proxy(IPlain, f"new{i}").touch()
            assert await rt.shed(50) == 50
            await wait_until(lambda: rt.statistics().activations == 31)
            assert not any(rt.is_active("Plain", f"old{i}") for i in range(40))
            assert sum(rt.is_active("Plain", f"new{i}") for i in range(40)) == 30
            assert rt.is_active("Gate", "busy")
            gates["hold"].set()
        assert await rt.shed(0) == 0
        assert await get_rpc_proxy(IPlain, "old1").touch() == 1  # activated anew
        assert await rt.shed(1_000) == 32
        await wait_until(lambda: rt.statistics().activations == 0)


def test_deactivation_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="deactivation_batch must be an integer"):
        HostConfig(deactivation_batch=2.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="deactivation_tasks must be a positive number"):
        HostConfig(deactivation_tasks=0)
