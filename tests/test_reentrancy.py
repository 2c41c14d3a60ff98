"""Call-chain reentrancy: chains never deadlock on themselves, and never interleave."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala import ActorBase, ActorInterface, get_rpc_proxy
from koala.testing import local_runtime, wait_until

pytestmark = pytest.mark.anyio


class INode(ActorInterface):
    @abstractmethod
    async def ping_back(self, other: str, depth: int) -> str: ...

    @abstractmethod
    async def ring(self, path: list[str]) -> list[str]: ...

    @abstractmethod
    async def slow(self, label: str, gate: int) -> str: ...


_gates: dict[int, anyio.Event] = {}
_log: list[str] = []


class NodeImpl(INode, ActorBase):
    async def ping_back(self, other: str, depth: int) -> str:
        if depth == 0:
            return f"{self.key}"
        nested = await self.get_proxy(INode, other).ping_back(str(self.key), depth - 1)
        return f"{self.key}>{nested}"

    async def ring(self, path: list[str]) -> list[str]:
        if not path:
            return [str(self.key)]
        rest = await self.get_proxy(INode, path[0]).ring(path[1:])
        return [str(self.key), *rest]

    async def slow(self, label: str, gate: int) -> str:
        _log.append(f"start {label}")
        await _gates[gate].wait()
        _log.append(f"end {label}")
        return label


async def test_a_b_a() -> None:
    async with local_runtime(NodeImpl):
        with anyio.fail_after(5):
            assert await get_rpc_proxy(INode, "A").ping_back("B", 2) == "A>B>A"


async def test_a_calls_itself_through_a_proxy() -> None:
    async with local_runtime(NodeImpl):
        with anyio.fail_after(5):
            assert await get_rpc_proxy(INode, "A").ping_back("A", 3) == "A>A>A>A"


async def test_a_b_c_a() -> None:
    async with local_runtime(NodeImpl):
        with anyio.fail_after(5):
            result = await get_rpc_proxy(INode, "A").ring(["B", "C", "A", "B"])
            assert result == ["A", "B", "C", "A", "B"]


async def test_deep_chains_do_not_exhaust_the_stack() -> None:
    # Past MAX_INLINE_DEPTH nested turns, calls go through mailboxes (fresh tasks).
    async with local_runtime(NodeImpl):
        with anyio.fail_after(10):
            result = await get_rpc_proxy(INode, "A").ping_back("B", 150)
    assert result == ">".join(["A", "B"] * 75 + ["A"])


async def test_unrelated_callers_queue() -> None:
    _log.clear()
    _gates[1] = anyio.Event()
    async with local_runtime(NodeImpl) as rt:
        with anyio.fail_after(5):
            proxy = get_rpc_proxy(INode, "Q")
            async with anyio.create_task_group() as tg:
                tg.start_soon(proxy.slow, "first", 1)
                await wait_until(lambda: _log == ["start first"])
                tg.start_soon(proxy.slow, "second", 1)
                await wait_until(lambda: rt.statistics().queued == 1)
                assert _log == ["start first"]  # the second call waits its turn
                _gates[1].set()
            assert _log == ["start first", "end first", "start second", "end second"]


# ---------------------------------------------------------------- random call graphs


@dataclasses.dataclass
class Plan:
    """Visit `actor`, then make the calls in `calls` one after another."""

    actor: int
    calls: list[Plan]


class IGraph(ActorInterface):
    @abstractmethod
    async def run(self, root: int, plan: Plan) -> int: ...


violations: list[str] = []


class GraphImpl(IGraph, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.holder: int | None = None  # the root whose chain is inside this actor
        self.depth = 0

    async def run(self, root: int, plan: Plan) -> int:
        if self.holder not in (None, root):
            violations.append(f"actor {self.key}: chain {root} entered during chain {self.holder}")
        self.holder = root
        self.depth += 1
        visited = 1
        try:
            for call in plan.calls:
                await anyio.lowlevel.checkpoint()  # let other chains try to get in
                visited += await self.get_proxy(IGraph, call.actor).run(root, call)
                if self.holder != root:
                    violations.append(f"actor {self.key}: chain {self.holder} ran inside {root}")
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.holder = None
        return visited


ACTORS = 5


@st.composite
def plans(draw: st.DrawFn, path: tuple[int, ...] = (), budget: int = 3) -> Plan:
    """A call tree where each call either re-enters an actor already on the path (A->B->A,
    A->A) or goes to a higher-numbered actor. Chains acquire actors in increasing order,
    so concurrent chains cannot wait on each other in a cycle: no deadlock is legitimate.
    """
    if not path:
        path = (draw(st.integers(0, ACTORS - 1)),)
    if budget == 0:
        return Plan(path[-1], [])
    choices = sorted(set(path) | set(range(max(path) + 1, ACTORS)))
    calls = []
    for _ in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(choices))
        calls.append(draw(plans(path=(*path, target), budget=budget - 1)))
    return Plan(path[-1], calls)


def _size(plan: Plan) -> int:
    return 1 + sum(_size(c) for c in plan.calls)


@settings(max_examples=25, deadline=None)
@given(roots=st.lists(plans(), min_size=1, max_size=4))
async def test_random_call_graphs_never_deadlock_nor_interleave(roots: list[Plan]) -> None:
    violations.clear()
    async with local_runtime(GraphImpl):
        results: dict[int, int] = {}

        async def start(i: int, plan: Plan) -> None:
            results[i] = await get_rpc_proxy(IGraph, plan.actor).run(i, plan)

        with anyio.fail_after(10):  # a deadlock would hang here
            async with anyio.create_task_group() as tg:
                for i, plan in enumerate(roots):
                    tg.start_soon(start, i, plan)
    assert violations == []
    assert results == {i: _size(plan) for i, plan in enumerate(roots)}


async def test_turns_of_one_chain_that_end_out_of_order_leave_the_actor_free() -> None:
    """Two turns of one chain run at once on one activation (a call back into it from
    another host, still running after the turn that made the chain's call gave up on
    its deadline). The first to start ends first: the activation must end up held by
    nobody, so a call of another chain runs, instead of queueing behind a chain that no
    turn holds any more."""
    from koala.host import current_chain

    _gates[10] = anyio.Event()
    _gates[11] = anyio.Event()
    _log.clear()
    async with local_runtime(NodeImpl):
        node = get_rpc_proxy(INode, "X")

        async def in_chain(label: str, gate: int) -> None:
            current_chain.set(4242)  # this task's calls belong to chain 4242
            await node.slow(label, gate)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(in_chain, "outer", 10)
                await wait_until(lambda: "start outer" in _log)
                tg.start_soon(in_chain, "inner", 11)  # same chain: runs at once, inside
                await wait_until(lambda: "start inner" in _log)
                _gates[10].set()  # the outer turn ends first
                await wait_until(lambda: "end outer" in _log)
                _gates[11].set()
            _gates[12] = anyio.Event()
            _gates[12].set()
            assert await node.slow("other chain", 12) == "other chain"
