"""The cluster for real: `koala pd` processes on a real etcd, `koala host` processes on
every backend, SIGKILL. Activations are counted by the actors themselves (each writes a
line to a shared file), never by our own bookkeeping."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests._cluster import Cluster, Proc, stats, url
from tests._etcd import etcd_url, unique_prefix

__all__ = ["etcd_url"]

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RECOVERY = 20.0  # a bound for liveness under load (TTL is 2 s), not a speed claim


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The test process only drives HTTP; the hosts run every backend between them."""
    return ("asyncio", {})


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd_url, unique_prefix("cluster"))
    try:
        yield c
    except BaseException:
        print(c.dump())
        raise
    finally:
        c.close()


async def hit(client: httpx.AsyncClient, host: Proc, key: str) -> list[int]:
    resp = await client.get(f"{url(host)}/hit/{key}")
    assert resp.status_code == 200, resp.text
    result: list[int] = resp.json()
    return result


async def test_racing_first_calls_activate_each_key_exactly_once(cluster: Cluster) -> None:
    """3 hosts (asyncio, uvloop, trio) behind 2 PDs over one etcd; 100 concurrent first
    calls, 5 per key, spread over the hosts."""
    pd1, pd2 = cluster.pd(), cluster.pd()
    hosts = [
        cluster.host(url(pd1), "asyncio"),
        cluster.host(url(pd2), "uvloop"),
        cluster.host(f"{url(pd2)},{url(pd1)}", "trio"),
    ]
    keys = [f"race-{i}" for i in range(20)]
    calls = [(hosts[i % 3], keys[i % 20]) for i in range(100)]
    answers: dict[str, set[int]] = {k: set() for k in keys}
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(host: Proc, key: str) -> None:
            pid, _ = await hit(client, host, key)
            answers[key].add(pid)

        async with anyio.create_task_group() as tg:
            for host, key in calls:
                tg.start_soon(one, host, key)
        total = {k: (await hit(client, hosts[0], k))[1] for k in keys}
    assert cluster.activations() == {k: 1 for k in keys}
    assert all(len(pids) == 1 for pids in answers.values()), answers
    assert total == {k: 6 for k in keys}  # every call reached the one activation
    holders = {pid for pids in answers.values() for pid in pids}
    assert holders <= {h.pid for h in hosts}
    assert len(holders) >= 2  # placement spreads load, it does not pile onto one host


async def test_the_host_a_first_call_lands_on_does_not_ask_the_pd_again(
    cluster: Cluster,
) -> None:
    """The caller's host asks the PD; the chosen host trusts the server id the request
    carries (REQUEST's placement), so it serves its new actors without a lookup."""
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    async with httpx.AsyncClient(timeout=30) as client:
        on_b = [
            key
            for key in (f"first-{i}" for i in range(30))
            if (await hit(client, a, key))[0] == b.pid
        ]
    assert on_b, "no actor was placed on the second host"
    assert stats(b)["activations"] == len(on_b)
    assert stats(b)["resolves"] == 0
    assert stats(a)["resolves"] == 30


async def test_killed_host_actors_come_back_elsewhere(cluster: Cluster) -> None:
    pd = cluster.pd()
    a, b = cluster.host(url(pd), "asyncio"), cluster.host(url(pd), "trio")
    async with httpx.AsyncClient(timeout=30) as client:
        on_b = []
        for i in range(40):
            key = f"kill-{i}"
            pid, _ = await hit(client, a, key)
            if pid == b.pid:
                on_b.append(key)
        assert on_b, "no actor was placed on the second host"
        b.kill()
        killed = time.monotonic()
        key = on_b[0]
        failures = 0
        while True:
            assert time.monotonic() - killed < RECOVERY, cluster.dump()
            with anyio.fail_after(15):  # no call hangs past its deadline meanwhile
                resp = await client.get(f"{url(a)}/hit/{key}")
            if resp.status_code == 200:
                break
            failures += 1
            await anyio.sleep(0.2)
        assert resp.json() == [a.pid, 1]  # a fresh activation on the surviving host
        for other in on_b[1:]:
            assert (await hit(client, a, other))[0] == a.pid
    counts = cluster.activations()
    assert all(counts[k] == 2 for k in on_b)  # once on b (dead), once on a
    st = stats(a)
    assert st["serving"]
    assert st["fences"] == 0


async def test_a_host_that_loses_the_pd_fences_itself_and_rejoins(cluster: Cluster) -> None:
    pd = cluster.pd()
    host = cluster.host(url(pd), "trio")
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(5):
            await hit(client, host, f"fence-{i}")
        first = stats(host)
        assert first["activations"] == 5
        pd.kill()
        with anyio.fail_after(RECOVERY):
            while stats(host)["serving"]:
                await anyio.sleep(0.1)
        fenced = stats(host)
        assert fenced["activations"] == 0  # deactivated, before the lease could expire
        deactivated = [line for line in cluster.event_lines() if line.startswith("deactivate")]
        assert len(deactivated) == 5
        # the PD comes back (same port): the host registers again as a new node
        restarted = cluster.pd(port=pd.port)
        with anyio.fail_after(RECOVERY):
            while not stats(host)["serving"]:
                await anyio.sleep(0.1)
        back = stats(host)
        assert back["server_id"] != first["server_id"]
        assert back["registrations"] == 2
        # its old positions die with its old lease: then the actors are placed again
        with anyio.fail_after(RECOVERY):
            while True:
                resp = await client.get(f"{url(host)}/hit/fence-0")
                if resp.status_code == 200:
                    break
                await anyio.sleep(0.1)
        assert resp.json() == [host.pid, 1]
        assert cluster.activations()["fence-0"] == 2
        assert restarted.popen is not None


async def test_host_stops_cleanly_and_leaves(cluster: Cluster) -> None:
    pd = cluster.pd()
    a, b = cluster.host(url(pd)), cluster.host(url(pd))
    async with httpx.AsyncClient(timeout=30) as client:
        keys = [f"leave-{i}" for i in range(10)]
        placed = {k: (await hit(client, a, k))[0] for k in keys}
        assert b.stop() == 0
        # b deregistered on its way out: its actors are placed on a at once (no TTL wait)
        for k in keys:
            pid, _ = await hit(client, a, k)
            assert pid == a.pid
    counts = cluster.activations()
    for k in keys:
        assert counts[k] == (2 if placed[k] == b.pid else 1)
    deactivations = [ln for ln in cluster.event_lines() if ln.startswith("deactivate")]
    assert len(deactivations) == sum(1 for k in keys if placed[k] == b.pid)


async def test_status_prints_the_cluster_as_a_table(cluster: Cluster) -> None:
    pd = cluster.pd(store="memory")
    host = cluster.host(url(pd), "uvloop")
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(3):
            await hit(client, host, f"status-{i}")
    me = stats(host)
    cmd = [sys.executable, "-m", "koala.cli", "status", "--pd", url(pd)]
    with anyio.fail_after(30):
        while True:  # the activations reach the PD with the next renewal (TTL/3)
            done = await anyio.run_process(cmd, check=False, env=cluster.env())
            assert done.returncode == 0, done.stderr
            lines = done.stdout.decode().splitlines()
            row = next(ln for ln in lines if ln.startswith(str(me["server_id"])))
            if row.split()[3] == "3":
                break
            await anyio.sleep(0.2)
    assert lines[0].split()[:4] == ["SERVER", "ADDRESS", "LOAD", "ACTIVATIONS"]
    assert "Counter" in row
    assert lines[-1] == "1 host(s)"
    down = await anyio.run_process(
        [sys.executable, "-m", "koala.cli", "status", "--pd", "http://127.0.0.1:1"],
        check=False,
        env=cluster.env(),
    )
    assert down.returncode == 1
    assert "no PD can be reached" in down.stderr.decode()


async def test_bad_store_maintenance_flags_are_clear_errors(cluster: Cluster) -> None:
    for flag, value in (
        ("--compact-interval", "-1"),
        ("--store-check-interval", "0"),
        ("--etcd-quota-bytes", "-5"),
    ):
        cmd = [sys.executable, "-m", "koala.cli", "pd", "--store", "memory", flag, value]
        done = await anyio.run_process(cmd, check=False, env=cluster.env())
        assert done.returncode == 2, (flag, done.stderr)
        err = done.stderr.decode()
        assert err.startswith("koala: error: MaintenanceConfig."), err
        assert flag in err
