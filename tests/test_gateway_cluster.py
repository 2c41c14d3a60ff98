"""The gateway as a cluster member, for real: etcd, `koala pd`, two `koala host`
processes and `koala gateway`, each backend in each role between the runs; real
WebSocket clients; SIGKILL for failover. What the actors saw comes from the actors
(lines they append to a shared file), never from our own bookkeeping."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from koala.gateway import ClientCloseCode

from ._cluster import ROOT, Cluster, Proc, url
from ._etcd import etcd_url, free_port, unique_prefix
from ._gateway_client import KEY, Closed, WSClient, connect, first_packet, session

__all__ = ["etcd_url"]

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

APP = str(ROOT / "tests" / "_gateway_cluster_app.py")
ORDER = ["asyncio", "uvloop", "trio"]
RECOVERY = 20.0  # a bound for liveness under load (TTL is 2 s), not a speed claim


def backend_name(anyio_backend: Any) -> str:
    name, options = anyio_backend
    return "uvloop" if options.get("use_uvloop") else str(name)


def other(backend: str) -> str:
    return ORDER[(ORDER.index(backend) + 1) % len(ORDER)]


class GatewayCluster(Cluster):
    """A cluster whose hosts run the gateway test app, and a `koala gateway`."""

    def player_host(self, pd_url: str, backend: str) -> Proc:
        cmd = [sys.executable, "-m", "koala.cli", "host", APP, "--pd", pd_url]
        cmd += ["--listen", "127.0.0.1:0", "--ttl", "2", "--default-timeout", "10"]
        cmd += ["--shutdown-grace", "2", "--log-level", "WARNING"]
        n = len(self.procs)
        proc = Proc(f"host{n}:{backend}", cmd, self.env(backend), self.tmp / f"host{n}.log")
        self.procs.append(proc)
        proc.start(r"koala host: server \d+ on ")
        return proc

    def gateway(
        self, pd_url: str, backend: str, failover_timeout: float = 15
    ) -> tuple[Proc, tuple[str, int]]:
        port = free_port()
        cmd = [sys.executable, "-m", "koala.cli", "gateway", "--pd", pd_url]
        cmd += ["--listen", f"127.0.0.1:{port}", "--failover-timeout", str(failover_timeout)]
        env = self.env(backend)
        env["KOALA_GATEWAY_KEY"] = KEY
        proc = Proc(f"gateway:{backend}", cmd, env, self.tmp / "gateway.log")
        proc.port = port
        self.procs.append(proc)
        proc.start(r"koala gateway: ws://")
        return proc, ("127.0.0.1", port)

    def opens(self, key: str) -> list[tuple[int, bool]]:
        """(pid, rebind) of every on_client_open the actor `key` ran."""
        found = []
        for line in self.event_lines():
            words = line.split()
            if words[0] == "open" and words[1] == key:
                found.append((int(words[2]), words[3] == "True"))
        return found


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str) -> Iterator[GatewayCluster]:
    c = GatewayCluster(tmp_path, etcd_url, unique_prefix("gwcluster"))
    try:
        yield c
    except BaseException:
        print(c.dump())
        raise
    finally:
        c.close()


def start(cluster: GatewayCluster, backend: str) -> tuple[Proc, Proc, tuple[str, int]]:
    pd = cluster.pd()
    a = cluster.player_host(url(pd), backend)
    b = cluster.player_host(url(pd), other(backend))
    _, address = cluster.gateway(url(pd), backend)
    return a, b, address


async def receive(client: WSClient) -> str | bytes:
    with anyio.fail_after(RECOVERY):
        item = await client.receive()
    assert not isinstance(item, Closed), item
    return item


def welcome_pid(text: str | bytes) -> tuple[int, bool]:
    assert isinstance(text, str), text
    found = re.fullmatch(r"welcome \S+ pid=(\d+) rebind=(True|False)", text)
    assert found, text
    return int(found[1]), found[2] == "True"


async def test_seed_flow_through_a_cluster(cluster: GatewayCluster, anyio_backend: Any) -> None:
    """A client signs its first packet with the seed's checksum, is bound to an actor on
    one of two hosts, sends text and binary frames and gets the actor's pushes back."""
    a, b, address = start(cluster, backend_name(anyio_backend))
    pids = set()
    for i in range(6):  # several actors: placement spreads them over both hosts
        async with session(address, "Player", f"seed-{i}", open_id=f"u{i}") as client:
            pid, rebind = welcome_pid(await receive(client))
            assert not rebind
            pids.add(pid)
            await client.send("hello")
            await client.send(b"\x00\x01\xff")
            await client.send("pid")
            assert await receive(client) == "hello"
            assert await receive(client) == b"\x00\x01\xff"
            assert await receive(client) == f"pid={pid} frames=3"
    assert pids <= {a.pid, b.pid}
    assert len(pids) == 2, "every actor was placed on one host"

    # no actor named: the account service (an actor on some host) names it
    async with connect(address) as client:
        await client.send_json(first_packet("carol"))
        welcome_pid(await receive(client))
        await client.send("pid")
        assert str(await receive(client)).startswith("pid=")
    assert len(cluster.opens("acct-carol")) == 1
    async with connect(address) as client:
        await client.send_json(first_packet("xavier"))  # the account names nobody
        assert (await client.expect_close(RECOVERY)).code == ClientCloseCode.NO_ACTOR
    async with session(address, "Nobody", "1") as client:  # no host serves the type
        assert (await client.expect_close(RECOVERY)).code == ClientCloseCode.NO_ACTOR

    # on_client_open raised: CLOSE_CLIENT carries 1011 as itself, as in-process
    async with session(address, "Player", "refuse-1") as client:
        closed = await client.expect_close(RECOVERY)
        assert (closed.code, closed.reason) == (ClientCloseCode.INTERNAL_ERROR, "refused")

    # the actor closes the session with its own code; the host sees the session end
    async with session(address, "Player", "closer") as client:
        welcome_pid(await receive(client))
        await client.send("close")
        closed = await client.expect_close(RECOVERY)
        assert (closed.code, closed.reason) == (4100, "asked to")
    with anyio.fail_after(RECOVERY):
        while not any(ln.startswith("close closer ") for ln in cluster.event_lines()):
            await anyio.sleep(0.05)


async def test_failover_rebinds_the_session_on_the_other_host(
    cluster: GatewayCluster, anyio_backend: Any
) -> None:
    """SIGKILL the host of a bound actor: the gateway re-binds the session to a new
    activation on the surviving host (on_client_open with rebind=True), frames the
    client sent meanwhile reach it in order, and so do later ones."""
    a, b, address = start(cluster, backend_name(anyio_backend))
    hosts = {a.pid: a, b.pid: b}
    gateway = cluster.procs[-1]
    async with session(address, "Player", "fo-1") as client:
        pid, _ = welcome_pid(await receive(client))
        await client.send("before")
        assert await receive(client) == "before"
        victim = hosts[pid]
        survivor = b if victim is a else a
        victim.kill()
        # once the gateway saw the connection drop, frames wait for the re-bind
        with anyio.fail_after(RECOVERY):
            while "re-binding 1 session(s)" not in gateway.output():
                await anyio.sleep(0.02)
        await client.send_many(["during-1", b"during-2"])
        new_pid, rebind = welcome_pid(await receive(client))
        assert (new_pid, rebind) == (survivor.pid, True)
        item, repeated = await receive(client), 0
        if item == "before":  # the dead host ran it, but its ack died with it
            item, repeated = await receive(client), 1
        assert item == "during-1"
        assert await receive(client) == b"during-2"
        for i in range(3):
            await client.send(f"after-{i}")
            assert await receive(client) == f"after-{i}"
        await client.send("pid")
        assert await receive(client) == f"pid={survivor.pid} frames={6 + repeated}"
    assert cluster.opens("fo-1") == [(victim.pid, False), (survivor.pid, True)]


async def test_a_drained_host_hands_its_sessions_over(
    cluster: GatewayCluster, anyio_backend: Any
) -> None:
    """SIGTERM: the host drains and leaves; its sessions are re-bound elsewhere."""
    a, b, address = start(cluster, backend_name(anyio_backend))
    hosts = {a.pid: a, b.pid: b}
    async with session(address, "Player", "drain-1") as client:
        pid, _ = welcome_pid(await receive(client))
        leaving = hosts[pid]
        staying = b if leaving is a else a
        await anyio.to_thread.run_sync(leaving.stop)
        assert welcome_pid(await receive(client)) == (staying.pid, True)
        await client.send("pid")
        assert await receive(client) == f"pid={staying.pid} frames=1"


async def test_no_host_to_take_over_closes_the_client_with_4011(
    cluster: GatewayCluster, anyio_backend: Any
) -> None:
    """The only host of the actor type dies: past failover_timeout the client is closed
    with 4011 (its frame was not delivered, and the client is told so)."""
    backend = backend_name(anyio_backend)
    pd = cluster.pd()
    host = cluster.player_host(url(pd), backend)
    gateway, address = cluster.gateway(url(pd), other(backend), failover_timeout=1.5)
    async with session(address, "Player", "alone") as client:
        welcome_pid(await receive(client))
        host.kill()
        with anyio.fail_after(RECOVERY):
            while "re-binding 1 session(s)" not in gateway.output():
                await anyio.sleep(0.02)
        await client.send("nobody hears this")
        closed = await client.expect_close(RECOVERY)
        assert closed.code == ClientCloseCode.UNAVAILABLE
    assert not any(ln.startswith("msg alone ") for ln in cluster.event_lines())


def burst_runs(cluster: GatewayCluster, key: str) -> dict[int, list[int]]:
    """pid -> the numbers of the burst frames `n-<i>` the actor `key` ran there, in order."""
    runs: dict[int, list[int]] = {}
    for line in cluster.event_lines():
        words = line.split()
        if words[:2] == ["msg", key] and words[3].startswith("'n-"):
            runs.setdefault(int(words[2]), []).append(int(words[3][3:-1]))
    return runs


async def test_no_frame_is_lost_when_its_host_dies_mid_burst(
    cluster: GatewayCluster, anyio_backend: Any
) -> None:
    """A client sends a numbered burst; its actor's host is SIGKILLed once it ran a
    quarter of it. Every frame the gateway accepted runs on the dead host or on the new
    activation, in order, none missing; the new activation starts no later than the
    first frame the dead host did not run (a repeat only of what it may have run)."""
    a, b, address = start(cluster, backend_name(anyio_backend))
    hosts = {a.pid: a, b.pid: b}
    count = 300
    got: list[str | bytes] = []
    async with session(address, "Player", "burst-1") as client:
        pid, _ = welcome_pid(await receive(client))
        victim = hosts[pid]
        survivor = b if victim is a else a

        async def read_all() -> None:
            while True:
                got.append(item := await receive(client))
                if isinstance(item, str) and item.startswith("pid="):
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(read_all)
            await client.send_many([f"n-{i}" for i in range(count)])
            with anyio.fail_after(RECOVERY):
                while len(burst_runs(cluster, "burst-1").get(victim.pid, [])) < count // 4:
                    await anyio.sleep(0.005)
            victim.kill()
            await client.send("pid")
    assert str(got[-1]).startswith(f"pid={survivor.pid} ")
    runs = burst_runs(cluster, "burst-1")
    dead, new = runs.get(victim.pid, []), runs.get(survivor.pid, [])
    assert dead == list(range(len(dead)))
    assert len(dead) < count, "the burst was over before the kill"
    assert new, "nothing reached the new activation"
    assert new == list(range(new[0], count)), "a frame was lost, repeated or reordered"
    assert new[0] <= len(dead), "a frame the dead host never ran is missing"
