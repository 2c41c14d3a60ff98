"""Positions for real: `koala host` processes on a real etcd give positions back when
their activations end, and a forged or stale placement ticket sent over the real wire
never makes a second activation. Activations are counted by the actors themselves."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from koala import WrongHostError
from koala._messages import Request, new_chain_id, new_request_id
from koala.pd import PDClient
from koala.pd._ticket import make_ticket
from koala.pd.server import EtcdStore
from koala.transport import Transport, TransportConfig
from tests._cluster import Cluster, Proc, double_activations, stats, url
from tests._cluster_app import ICounter
from tests._etcd import etcd_url
from tests.test_pd_cluster import anyio_backend, cluster

__all__ = ["anyio_backend", "cluster", "etcd_url"]  # fixtures, imported for pytest

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SETTLE = 20.0  # a bound for background work under load (releases), not a speed claim
RECOVERY = 30.0  # a bound for liveness under load (TTL is 2 s), not a speed claim


@pytest.fixture
async def peer() -> AsyncIterator[Transport]:
    """A node of the cluster's wire protocol in this process (no secret: loopback)."""
    async with Transport(TransportConfig(node_id="test-peer")) as transport:
        yield transport


async def placement_keys(c: Cluster) -> int:
    store = EtcdStore(c.etcd_url)
    try:
        return len(await store.get_prefix(c.prefix + "placement/"))
    finally:
        await store.aclose()


async def get(client: httpx.AsyncClient, host: Proc, path: str) -> Any:
    resp = await client.get(f"{url(host)}{path}")
    assert resp.status_code == 200, resp.text
    return resp.json()


async def wait_for(what: Any, within: float = SETTLE) -> None:
    with anyio.fail_after(within):
        while not await what():
            await anyio.sleep(0.05)


async def test_positions_live_as_long_as_their_activations(cluster: Cluster) -> None:
    """etcd holds one key per live activation: keys go when actors are deactivated
    (their hosts give them back in batches), and come back when they are called again."""
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    keys = [f"live-{i}" for i in range(40)]
    async with httpx.AsyncClient(timeout=30) as client:
        for i, key in enumerate(keys):
            await get(client, (a, b)[i % 2], f"/hit/{key}")
        assert await placement_keys(cluster) == 40
        for key in keys[:30]:
            await get(client, a, f"/bye/{key}")

        async def given_back() -> bool:
            return await placement_keys(cluster) == 10

        await wait_for(given_back)
        assert sum(stats(h)["releases"] for h in (a, b)) == 30
        assert sum(stats(h)["activations"] for h in (a, b)) == 10
        for key in keys:  # called again: placed anew, wherever the PD puts them
            _, hits = await get(client, b, f"/hit/{key}")
            assert hits == (2 if key in keys[30:] else 1)
        assert await placement_keys(cluster) == 40
    assert double_activations(cluster.event_lines()) == []
    activations = cluster.activations()
    assert all(activations[k] == (2 if k in keys[:30] else 1) for k in keys), activations


async def call_with_ticket(peer: Transport, host: Proc, key: str, ticket: bytes) -> Any:
    spec = ICounter.__koala_methods__["hit"]
    req = Request(
        new_request_id(),
        new_chain_id(),
        anyio.current_time() + 10,
        "Counter",
        key,
        "ICounter",
        "hit",
        (),
        placement=ticket,
    )
    with anyio.fail_after(15):
        return await peer.call(host.address, req, spec)


async def test_forged_and_stale_tickets_never_make_a_second_activation(
    cluster: Cluster, peer: Transport
) -> None:
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    hosts = {a.pid: a, b.pid: b}
    pd_client = PDClient(url(pd))
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            pid, _ = await get(client, a, "/hit/target")
            home, other = hosts[pid], hosts[a.pid if pid == b.pid else b.pid]
            first = await pd_client.find_position("Counter", "target")
            assert first.ticket
            # forged: a well-formed ticket naming the other host, made with a made-up key
            forged = make_ticket(
                secrets.token_bytes(32), "Counter", "target", stats(other)["server_id"], 10**9
            )
            with pytest.raises(WrongHostError):
                await call_with_ticket(peer, other, "target", forged)
            # the home host's real ticket, sent to the other host: not its own, refused
            with pytest.raises(WrongHostError):
                await call_with_ticket(peer, other, "target", first.ticket)
            # and to the home host it is fine: the actor is there
            assert (await call_with_ticket(peer, home, "target", first.ticket))[0] == home.pid
            assert stats(other)["claims"] == 0
            # stale: the actor is deactivated (its position given back) and placed again
            # on the other host; the old ticket, replayed to its old host, is refused
            for _ in range(40):
                await get(client, home, "/bye/target")

                async def released() -> bool:
                    return await placement_keys(cluster) == 0

                await wait_for(released)
                pid, _ = await get(client, other, "/hit/target")
                if pid == other.pid:
                    break
            else:
                raise AssertionError("the PD never placed the actor on the other host")
            with pytest.raises(WrongHostError):
                await call_with_ticket(peer, home, "target", first.ticket)
            pid, _ = await get(client, a, "/hit/target")
            assert pid == other.pid
    finally:
        await pd_client.aclose()
    assert double_activations(cluster.event_lines()) == []


async def test_a_host_with_many_positions_killed_under_load(cluster: Cluster) -> None:
    """SIGKILL a host holding hundreds of positions while the others serve a steady load:
    calls to actors on the survivors keep succeeding, and the dead host's actors come
    back elsewhere once its lease is gone, once each. New actors the PD placed on the
    dead host before its lease ran out fail fast (HostUnavailable), as documented."""
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    victim = cluster.host(url(pd), "uvloop")
    survivors = {a.pid: a, b.pid: b}
    where: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(300):
            key = f"load-{i}"
            where[key], _ = await get(client, a, f"/hit/{key}")
        on_victim = [k for k, pid in where.items() if pid == victim.pid]
        on_survivors = [k for k, pid in where.items() if pid in survivors]
        assert len(on_victim) > 30, "placement did not spread onto the third host"
        failures: list[str] = []
        new_failures: list[str] = []
        slowest = 0.0
        stop = anyio.Event()

        async def steady(host: Proc, keys: list[str]) -> None:
            nonlocal slowest
            n = 0
            while not stop.is_set():
                key = keys[n % len(keys)] if n % 4 else f"new-{host.pid}-{n}"
                n += 1
                started = time.monotonic()
                resp = await client.get(f"{url(host)}/hit/{key}")
                slowest = max(slowest, time.monotonic() - started)
                if resp.status_code != 200:
                    why = f"{key}: {resp.status_code} {resp.text[:200]}"
                    (new_failures if key.startswith("new-") else failures).append(why)

        async with anyio.create_task_group() as tg:
            for host in (a, b):
                for _ in range(4):
                    tg.start_soon(steady, host, on_survivors)
            await anyio.sleep(1.0)
            victim.kill()
            killed = time.monotonic()
            back: dict[str, int] = {}
            while len(back) < len(on_victim):  # the dead host's actors, placed again
                assert time.monotonic() - killed < RECOVERY, (len(back), cluster.dump())

                async def again(key: str) -> None:
                    resp = await client.get(f"{url(a)}/hit/{key}")
                    if resp.status_code == 200:
                        back[key] = resp.json()[0]

                async with anyio.create_task_group() as round_tg:
                    for key in on_victim:
                        if key not in back:
                            round_tg.start_soon(again, key)
                await anyio.sleep(0.1)
            stop.set()
    assert failures == []
    assert all(victim.address in why for why in new_failures), new_failures
    assert slowest < 10.0  # no call to a live actor waited for the dead host
    assert set(back.values()) <= set(survivors)
    lines = [line for line in cluster.event_lines() if not line.endswith(f" {victim.pid}")]
    assert double_activations(lines) == []


async def test_a_host_that_joins_receives_its_share(cluster: Cluster) -> None:
    """Two hosts hold 240 active actors; a third joins. The two give up a few of theirs
    at each renewal while some host is below the mean, their next calls place them by
    load, and the new host ends up with its share, each actor still activated once at a
    time."""
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    keys = [f"share-{i}" for i in range(240)]
    async with httpx.AsyncClient(timeout=30) as client:

        async def call_all(via: Proc) -> dict[int, int]:
            where: dict[int, int] = {}

            async def one(key: str) -> None:
                pid, _ = await get(client, via, f"/hit/{key}")
                where[pid] = where.get(pid, 0) + 1

            async with anyio.create_task_group() as tg:
                for key in keys:
                    tg.start_soon(one, key)
            return where

        await call_all(a)
        c = cluster.host(url(pd), "uvloop")
        started = time.monotonic()
        while True:
            where = await call_all(b)
            if where.get(c.pid, 0) >= 60:  # within 25% of its share of 80
                break
            assert time.monotonic() - started < RECOVERY, (where, cluster.dump())
            await anyio.sleep(0.2)
        assert sum(stats(h)["shed"] for h in (a, b)) >= 60
        assert stats(c)["shed"] == 0
    assert double_activations(cluster.event_lines()) == []
