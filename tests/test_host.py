"""The host package's seams: scheduled turns, the catalog's counts, the Directory's
``local_only`` attribute, immutable requests, and the host states."""

from __future__ import annotations

import dataclasses
import logging
from abc import abstractmethod
from collections import Counter

import anyio
import pytest

from koala import (
    ActorBase,
    ActorInterface,
    ActorNotFoundError,
    HostConfig,
    Key,
    Runtime,
    ShuttingDownError,
    get_rpc_proxy,
)
from koala._messages import Request
from koala._seams import LocalDirectory
from koala.host import Activation, HostState, TurnBody
from koala.testing import local_runtime, wait_until

pytestmark = pytest.mark.anyio


class IBox(ActorInterface):
    @abstractmethod
    async def put(self, item: str) -> None: ...

    @abstractmethod
    async def items(self) -> list[str]: ...


class Box(IBox, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    async def put(self, item: str) -> None:
        self.held.append(item)

    async def items(self) -> list[str]:
        return list(self.held)


class Other(IBox, ActorBase):
    async def put(self, item: str) -> None:
        pass

    async def items(self) -> list[str]:
        return []


def _put(item: str) -> TurnBody:
    async def body(act: Activation) -> None:
        assert isinstance(act.instance, Box)
        act.instance.held.append(item)

    return body


async def test_scheduled_turns_run_in_order_on_the_actor_activating_it() -> None:
    async with local_runtime(Box) as rt:
        for item in "abc":
            rt.schedule_turn(Box, "k", _put(item), "put")
        assert await get_rpc_proxy(IBox, "k").items() == ["a", "b", "c"]
        assert rt.statistics().queued == rt.statistics().inflight == 0


async def test_a_scheduled_turn_that_raises_is_logged_and_the_actor_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def boom(act: Activation) -> None:
        raise ValueError("boom in a hook")

    async with local_runtime(Box) as rt:
        rt.schedule_turn(Box, "k", boom, "on_client_message")
        rt.schedule_turn(Box, "k", _put("after"), "put")
        assert await get_rpc_proxy(IBox, "k").items() == ["after"]
        assert rt.statistics().inflight == 0
    assert any(
        "turn on_client_message of Box/'k' failed: boom in a hook" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR
    )


async def test_a_scheduled_turn_is_refused_for_an_actor_not_served_or_while_stopping() -> None:
    async with local_runtime(Box) as rt:
        with pytest.raises(ActorNotFoundError, match="does not serve Other"):
            rt.schedule_turn(Other, "k", _put("x"), "put")
        await rt.shutdown()
        with pytest.raises(ShuttingDownError):
            rt.schedule_turn(Box, "k", _put("x"), "put")


class Releasing(LocalDirectory):
    """A one-host directory that wants to hear of releases (a counting double)."""

    local_only = False

    def __init__(self) -> None:
        self.left: Counter[tuple[str, Key]] = Counter()

    def released(self, actor_type: str, key: Key) -> None:
        self.left[(actor_type, key)] += 1


async def test_a_subclass_of_local_directory_is_told_of_releases_when_not_local_only() -> None:
    directory = Releasing()
    config = HostConfig(idle_timeout=0.05, collection_interval=0.05)
    async with Runtime(config, [Box], directory=directory) as rt:
        await get_rpc_proxy(IBox, "gone").put("x")
        await wait_until(lambda: rt.statistics().activations == 0)
    assert directory.left == Counter({("Box", "gone"): 1})


def test_a_request_is_immutable_and_a_ticket_makes_a_new_one() -> None:
    req = Request(1, 2, 3.0, "Box", "k", "IBox", "put", ("x",), False, True)
    with pytest.raises(AttributeError):
        req.placement = b"t"  # type: ignore[misc]
    placed = req.with_placement(b"ticket")
    assert placed.placement == b"ticket"
    assert req.placement == b""
    assert placed._replace(placement=b"") == req
    assert not dataclasses.is_dataclass(req)


async def test_the_host_states_follow_shutdown_and_fencing() -> None:
    async with local_runtime(Box) as rt:
        cat = rt._catalog
        assert cat.state is HostState.RUNNING
        await get_rpc_proxy(IBox, "k").put("x")
        assert await rt.evict_all(1.0) == 0
        assert cat.state is HostState.RUNNING  # fencing ends with the eviction
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.shutdown)
            await wait_until(lambda: cat.state is HostState.STOPPING)
        assert rt.draining
        assert await rt.evict_all(1.0) == 0  # stopping already: nothing to do
