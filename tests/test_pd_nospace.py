"""A full etcd (its NOSPACE alarm) with real processes: `koala pd` over an etcd with a
small quota, `koala host` processes on asyncio and trio. While etcd refuses writes, no
host fences, actors already placed keep answering (from any host), new placements fail
fast with store_full; once the junk is deleted, the PD recovers by itself."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests._cluster import Cluster, Proc, cluster_of, stats, url
from tests._etcd import EtcdProcess

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

QUOTA = 4 * 1024 * 1024  # bytes: a full etcd after ~1 000 junk keys of 4 kB
RECOVERY = 30.0  # a bound for liveness under load, not a speed claim
TTL = 2


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The test process only drives HTTP; the cluster processes run the backends."""
    return ("asyncio", {})


@pytest.fixture
def small_etcd() -> Iterator[EtcdProcess]:
    server = EtcdProcess(quota_bytes=QUOTA)
    try:
        server.start()
        yield server
    finally:
        print(f"--- etcd\n{server.log()}")
        server.destroy()


@pytest.fixture
def cluster(tmp_path: Path, small_etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path, small_etcd.url, "nospace")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def fill(client: httpx.AsyncClient, etcd: str) -> int:
    """Junk keys written straight to etcd until it is full; how many."""
    for n in range(20_000):
        resp = await client.post(
            f"{etcd}/v3/kv/put", json={"key": b64(f"/junk/{n}"), "value": b64("j" * 4096)}
        )
        if resp.status_code != 200:
            assert "space exceeded" in resp.text, resp.text
            return n
    raise AssertionError("etcd never filled up")


async def hit(client: httpx.AsyncClient, host: Proc, key: str) -> httpx.Response:
    return await client.get(f"{url(host)}/hit/{key}")


@pytest.mark.parametrize("pd_backend", ["asyncio", "trio"])
async def test_a_full_etcd_fences_no_host_and_the_pd_recovers_by_itself(
    cluster: Cluster, small_etcd: EtcdProcess, pd_backend: str
) -> None:
    flags = ("--store-check-interval", "0.5", "--etcd-quota-bytes", str(QUOTA))
    pd = cluster.pd(backend=pd_backend, extra=flags)
    one = cluster.host(url(pd), "asyncio", ttl=TTL)
    two = cluster.host(url(pd), "trio", ttl=TTL)
    keys = [f"k{n}" for n in range(10)]
    async with httpx.AsyncClient(timeout=15) as client:
        owners: dict[str, int] = {}
        for key in keys:  # placed through host one only: two has cached none of them
            resp = await hit(client, one, key)
            assert resp.status_code == 200, resp.text
            owners[key] = resp.json()[0]
        assert len(set(owners.values())) == 2  # both hosts hold some
        junk = await fill(client, small_etcd.url)
        # 3 TTLs of a full etcd: every placed actor answers from both hosts, where it was
        deadline = time.monotonic() + 3 * TTL
        rounds = 0
        while time.monotonic() < deadline or rounds < 2:
            for key in keys:
                for host in (two, one):
                    resp = await hit(client, host, key)
                    assert resp.status_code == 200, resp.text
                    assert resp.json()[0] == owners[key]
            rounds += 1
            await anyio.sleep(0.2)
        for host in (one, two):
            assert (stats(host)["fences"], stats(host)["registrations"]) == (0, 1), stats(host)
        # a new actor fails fast, and the PD says why
        started = time.monotonic()
        resp = await hit(client, one, "new")
        assert resp.status_code != 200
        assert time.monotonic() - started < 3
        answer = await client.post(
            f"{url(pd)}/pd/api/v1/placement/find_positions",
            json={"positions": [{"actor_type": "Counter", "actor_id": "new"}]},
        )
        (position,) = answer.json()["positions"]
        assert (position["status"], position["error"]) == (507, "store_full")
        assert "--quota-backend-bytes" in position["message"]
        assert "NOSPACE" in pd.output()  # logged loudly
        # the junk is deleted (deletes work while full): the PD recovers by itself
        resp = await client.post(
            f"{small_etcd.url}/v3/kv/deleterange",
            json={"key": b64("/junk/"), "range_end": b64("/junk0")},
        )
        assert resp.status_code == 200, resp.text
        assert int(resp.json()["deleted"]) >= junk
        deadline = time.monotonic() + RECOVERY
        while True:
            resp = await hit(client, two, "new")
            if resp.status_code == 200:
                break
            assert time.monotonic() < deadline, resp.text
            await anyio.sleep(0.2)
        alarms = await client.post(f"{small_etcd.url}/v3/maintenance/alarm", json={"action": "GET"})
        assert not alarms.json().get("alarms")
        assert "disarmed" in pd.output()
        for host in (one, two):
            assert stats(host)["fences"] == 0
    assert pd.stop() == 0
