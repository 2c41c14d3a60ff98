"""Fault tolerance of the cluster, with real processes (issue 4): a host joins, the PD
restarts, etcd restarts. Every scenario checks, through the actors' own event lines,
that no key ever had two live activations at once; every wait is bounded."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests._cluster import Cluster, Proc, cluster_of, double_activations, stats, url
from tests._etcd import EtcdProcess, etcd_url, private_etcd

__all__ = ["etcd_url", "private_etcd"]

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RECOVERY = 30.0  # a bound for liveness under load (TTLs are seconds), not a speed claim
BACKENDS = ["asyncio", "trio"]  # the backend of the PD and the hosts of one test


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The test process only drives HTTP; the cluster processes run the backend under test."""
    return ("asyncio", {})


def assert_never_two_live_activations(cluster: Cluster) -> None:
    assert double_activations(cluster.event_lines()) == [], cluster.event_lines()


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str) -> Iterator[Cluster]:
    """A cluster on the session's etcd."""
    yield from cluster_of(tmp_path, etcd_url, "faults")


@pytest.fixture
def etcd_cluster(tmp_path: Path, private_etcd: EtcdProcess) -> Iterator[Cluster]:
    """A cluster on the private etcd."""
    yield from cluster_of(tmp_path, private_etcd.url, "etcd-restart")


async def hit(client: httpx.AsyncClient, host: Proc, key: str) -> list[int]:
    """Call actor ``key`` through ``host``: [pid holding the activation, hits so far]."""
    resp = await client.get(f"{url(host)}/hit/{key}")
    assert resp.status_code == 200, resp.text
    result: list[int] = resp.json()
    return result


async def hit_eventually(client: httpx.AsyncClient, host: Proc, key: str) -> list[int]:
    """Call until it succeeds, within RECOVERY seconds; each call bounded too."""
    deadline = time.monotonic() + RECOVERY
    while True:
        with anyio.fail_after(15):  # no call hangs past its deadline (10 s)
            resp = await client.get(f"{url(host)}/hit/{key}")
        if resp.status_code == 200:
            result: list[int] = resp.json()
            return result
        assert time.monotonic() < deadline, f"{key} via {host.name}: {resp.text}"
        await anyio.sleep(0.1)


async def wait_serving(host: Proc, *, registrations: int) -> dict[str, Any]:
    with anyio.fail_after(RECOVERY):
        while True:
            st = stats(host)
            if st["serving"] and st["registrations"] >= registrations:
                return st
            await anyio.sleep(0.1)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_new_host_receives_new_placements_at_once(cluster: Cluster, backend: str) -> None:
    pd = cluster.pd(backend=backend)
    a = cluster.host(url(pd), backend)
    async with httpx.AsyncClient(timeout=30) as client:
        old = [f"old-{i}" for i in range(5)]
        for key in old:
            assert (await hit(client, a, key)) == [a.pid, 1]
        b = cluster.host(url(pd), backend)  # returns once b is registered
        # at once, no wait: new first calls, made through the old host, reach the new one
        holders = {}
        for i in range(30):
            key = f"new-{i}"
            holders[key] = (await hit(client, a, key))[0]
        assert set(holders.values()) <= {a.pid, b.pid}
        on_b = [k for k, pid in holders.items() if pid == b.pid]
        assert on_b, "the new host received none of 30 new actors"
        # the new host serves the old actors where they live, and its own from itself
        for key in old:
            assert (await hit(client, b, key)) == [a.pid, 2]
        for key in on_b:
            assert (await hit(client, b, key)) == [b.pid, 2]
    assert cluster.activations() == {k: 1 for k in old + list(holders)}
    assert stats(a)["fences"] == stats(b)["fences"] == 0
    assert_never_two_live_activations(cluster)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_hosts_serve_cached_actors_while_the_pd_restarts(
    cluster: Cluster, backend: str
) -> None:
    """The TTL (10 s) is long enough that a PD restart stays inside it: hosts fence after
    TTL - TTL/4 = 7.5 s without a renewal (docs/pd.md), their last renewal was at most
    TTL/3 before the kill, which leaves 4 s for the PD to come back."""
    pd = cluster.pd(backend=backend)
    a, b = cluster.host(url(pd), backend, ttl=10), cluster.host(url(pd), backend, ttl=10)
    before = {h.pid: stats(h) for h in (a, b)}
    async with httpx.AsyncClient(timeout=30) as client:
        keys = [f"cached-{i}" for i in range(10)]
        holders = {k: (await hit(client, a, k))[0] for k in keys}
        assert set(holders.values()) == {a.pid, b.pid}  # both caches hold positions
        pd.kill()
        # the PD is gone: calls to placed actors still succeed, through the cached
        # positions of the caller and of the host that holds the actor
        for key in keys:
            with anyio.fail_after(15):
                assert (await hit(client, a, key)) == [holders[key], 2]
        # ... while a first call cannot be placed, and fails rather than hangs
        with anyio.fail_after(15):
            resp = await client.get(f"{url(a)}/hit/unplaced-0")
        assert resp.status_code != 200
        pd = cluster.pd(port=pd.port, backend=backend)  # the same port: hosts know it
        # new placements resume, on both hosts
        new = {f"after-{i}": (await hit_eventually(client, a, f"after-{i}"))[0] for i in range(10)}
        assert set(new.values()) == {a.pid, b.pid}
        assert (await hit(client, b, "unplaced-0"))[1] == 1
        for key in keys:
            assert (await hit(client, b, key)) == [holders[key], 3]
    for host in (a, b):
        st = stats(host)
        assert st["serving"], st
        assert st["fences"] == 0, "a short PD outage must not fence a host (TTL 10 s)"
        assert st["server_id"] == before[host.pid]["server_id"]  # the same lease throughout
        assert st["registrations"] == 1
    assert cluster.activations() == {k: 1 for k in [*keys, *new, "unplaced-0"]}
    assert_never_two_live_activations(cluster)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_cluster_recovers_by_itself_after_etcd_restarts(
    etcd_cluster: Cluster, private_etcd: EtcdProcess, backend: str
) -> None:
    """etcd stays down longer than the hosts' TTL (2 s): every host fences itself (its
    activations end), then registers again as a new node once etcd is back; the old
    positions die with the old leases and the actors are placed again, once each."""
    cluster = etcd_cluster
    pd = cluster.pd(backend=backend)
    a, b = cluster.host(url(pd), backend), cluster.host(url(pd), backend)
    first = {h.pid: stats(h) for h in (a, b)}
    async with httpx.AsyncClient(timeout=30) as client:
        keys = [f"etcd-{i}" for i in range(10)]
        for key in keys:
            await hit(client, a, key)
        private_etcd.stop()
        with anyio.fail_after(RECOVERY):  # no renewal can succeed: both hosts fence
            while any(stats(h)["serving"] for h in (a, b)):
                await anyio.sleep(0.1)
        for host in (a, b):
            assert stats(host)["activations"] == 0
        deactivated = [ln for ln in cluster.event_lines() if ln.startswith("deactivate ")]
        assert len(deactivated) == len(keys)
        await anyio.sleep(1.0)  # etcd stays down a while longer
        private_etcd.start()  # the same ports and data directory; nobody touches a host
        for host in (a, b):
            back = await wait_serving(host, registrations=2)
            assert back["server_id"] != first[host.pid]["server_id"]
        # the old actors answer again (each activated anew, once), through either host
        again = {k: await hit_eventually(client, a, k) for k in keys}
        assert all(hits == 1 for _, hits in again.values()), again
        for key in keys:
            assert (await hit(client, b, key)) == [again[key][0], 2]
        # and new placements work
        new = [f"etcd-new-{i}" for i in range(10)]
        holders = {k: (await hit_eventually(client, b, k))[0] for k in new}
        assert set(holders.values()) <= {a.pid, b.pid}
    assert cluster.activations() == {**{k: 2 for k in keys}, **{k: 1 for k in new}}
    assert pd.popen is not None
    assert pd.popen.poll() is None  # the PD lived through it
    assert_never_two_live_activations(cluster)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_hosts_ride_out_a_short_etcd_restart(
    etcd_cluster: Cluster, private_etcd: EtcdProcess, backend: str
) -> None:
    """etcd restarts inside the hosts' TTL (8 s; they fence after 6 s without a renewal):
    the leases survive in etcd's data directory, the hosts renew them once etcd is back
    and never fence; cached actors answer throughout, new placements resume."""
    cluster = etcd_cluster
    pd = cluster.pd(backend=backend)
    a, b = cluster.host(url(pd), backend, ttl=8), cluster.host(url(pd), backend, ttl=8)
    before = {h.pid: stats(h) for h in (a, b)}
    async with httpx.AsyncClient(timeout=30) as client:
        keys = [f"short-{i}" for i in range(10)]
        holders = {k: (await hit(client, a, k))[0] for k in keys}
        private_etcd.stop()
        for key in keys:  # etcd is down: cached positions still serve
            with anyio.fail_after(15):
                assert (await hit(client, a, key)) == [holders[key], 2]
        with anyio.fail_after(15):  # a first call cannot be placed, and fails, not hangs
            resp = await client.get(f"{url(a)}/hit/short-unplaced")
        assert resp.status_code != 200
        private_etcd.start()
        restarted_ms = time.time() * 1000
        new = {
            f"short-new-{i}": (await hit_eventually(client, b, f"short-new-{i}"))[0]
            for i in range(10)
        }
        assert set(new.values()) <= {a.pid, b.pid}
        assert (await hit(client, a, "short-unplaced"))[1] == 1
        for key in keys:
            assert (await hit(client, b, key)) == [holders[key], 3]
        # the hosts renew the leases they had (etcd kept them): the PD records each
        # renewal (in its memory: a renewal writes nothing to etcd)
        ids = {before[h.pid]["server_id"] for h in (a, b)}
        with anyio.fail_after(RECOVERY):
            while True:
                resp = await client.post(f"{url(pd)}/pd/api/v1/membership/fetch_all")
                hosts = resp.json()["hosts"] if resp.status_code == 200 else {}
                renewed = {int(s) for s, h in hosts.items() if h["renew_time"] > restarted_ms}
                if renewed >= ids:
                    break
                await anyio.sleep(0.2)
        assert set(map(int, hosts)) == ids  # no host re-registered
    for host in (a, b):
        st = stats(host)
        assert st["serving"], st
        assert st["fences"] == 0, "a short etcd outage must not fence a host (TTL 8 s)"
        assert st["server_id"] == before[host.pid]["server_id"]
        assert st["registrations"] == 1
    assert cluster.activations() == {k: 1 for k in [*keys, *new, "short-unplaced"]}
    assert_never_two_live_activations(cluster)
