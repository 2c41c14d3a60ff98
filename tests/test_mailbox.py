"""Mailbox ordering against a model: whatever path a call takes (inline or queued),
an actor sees calls in the order they were made, and an awaited call returns only
after everything sent before it ran."""

from __future__ import annotations

from abc import abstractmethod

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala import ActorBase, ActorInterface, get_rpc_proxy, one_way
from koala.testing import local_runtime

pytestmark = pytest.mark.anyio


class IRecorder(ActorInterface):
    @one_way
    @abstractmethod
    async def post(self, value: int) -> None: ...

    @abstractmethod
    async def call(self, value: int, pause: bool) -> list[int]: ...


class Recorder(IRecorder, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    async def post(self, value: int) -> None:
        self.seen.append(value)

    async def call(self, value: int, pause: bool) -> list[int]:
        if pause:
            await anyio.lowlevel.checkpoint()  # suspend mid-turn: queued work must still wait
        self.seen.append(value)
        return list(self.seen)


operations = st.lists(
    st.tuples(st.sampled_from(["post", "call", "call-pause"]), st.integers(0, 3)),
    min_size=1,
    max_size=40,
)


@settings(max_examples=30, deadline=None)
@given(ops=operations)
async def test_calls_run_in_the_order_they_were_made(ops: list[tuple[str, int]]) -> None:
    async with local_runtime(Recorder):
        model: list[int] = []
        for i, (kind, actor) in enumerate(ops):
            proxy = get_rpc_proxy(IRecorder, actor)
            model.append(i)
            if kind == "post":
                await proxy.post(i)
            else:
                seen = await proxy.call(i, kind == "call-pause")
                mine = [j for j in model if ops[j][1] == actor]
                assert seen == mine
        for actor in {a for _, a in ops}:
            seen = await get_rpc_proxy(IRecorder, actor).call(-1, False)
            assert seen == [j for j in model if ops[j][1] == actor] + [-1]


@settings(max_examples=15, deadline=None)
@given(per_caller=st.lists(st.integers(1, 15), min_size=2, max_size=6))
async def test_each_callers_posts_keep_their_order(per_caller: list[int]) -> None:
    async with local_runtime(Recorder):
        proxy = get_rpc_proxy(IRecorder, "shared")

        async def caller(c: int, count: int) -> None:
            for k in range(count):
                await proxy.post(c * 100 + k)
                await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            for c, count in enumerate(per_caller):
                tg.start_soon(caller, c, count)
        seen = await proxy.call(-1, False)
    for c, count in enumerate(per_caller):
        assert [v for v in seen if v // 100 == c and v >= 0] == [c * 100 + k for k in range(count)]
    assert len(seen) == sum(per_caller) + 1
