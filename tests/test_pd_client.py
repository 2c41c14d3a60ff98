"""The host side of the PD in one process, on every backend: a real PD over HTTP (memory
store), a runtime with the ClusterDirectory, the position cache, and self-fencing."""

from __future__ import annotations

import subprocess
import sys
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from koala import (
    LOCAL,
    ActorBase,
    ActorInterface,
    ConfigError,
    HostConfig,
    Runtime,
    WrongHostError,
    get_rpc_proxy,
)
from koala._messages import Request
from koala.pd import ClusterDirectory, MemberConfig, PDClient, PDRequestError, PDUnavailableError
from koala.pd import _directory as directory_module
from koala.pd.server import MemoryStore, serve_pd
from tests._etcd import free_port

pytestmark = pytest.mark.anyio

events: list[str] = []


class IThing(ActorInterface):
    @abstractmethod
    async def touch(self) -> int: ...


class Thing(IThing, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def on_deactivate(self) -> None:
        events.append(f"deactivate {self.key}")

    async def touch(self) -> int:
        self.count += 1
        return self.count


class PD:
    """A PD served on a fixed port; it can be stopped and started again."""

    def __init__(self, tg: Any) -> None:
        self.tg = tg
        self.store = MemoryStore()  # survives restarts, like etcd would
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.shutdown = anyio.Event()

    async def start(self) -> None:
        self.shutdown = anyio.Event()
        await self.tg.start(serve_pd, self.store, "127.0.0.1", self.port, self.shutdown)

    def stop(self) -> None:
        self.shutdown.set()


@asynccontextmanager
async def cluster(
    config: MemberConfig | None = None,
) -> AsyncIterator[tuple[PD, Runtime, ClusterDirectory]]:
    events.clear()
    async with anyio.create_task_group() as tg:
        pd = PD(tg)
        await pd.start()
        client = PDClient(pd.url, timeout=1.0)
        directory = ClusterDirectory(client, "127.0.0.1:1", {"Thing": "tests.Thing"}, config)
        rt = Runtime(HostConfig(default_timeout=5, shutdown_grace=1), [Thing], directory=directory)
        async with rt:
            directory.attach(rt)
            async with anyio.create_task_group() as member:
                await member.start(directory.run)
                yield pd, rt, directory
                member.cancel_scope.cancel()
        await client.aclose()
        pd.stop()


async def test_registers_and_owns_its_positions() -> None:
    async with cluster(MemberConfig(ttl=5)) as (_, rt, directory):
        assert directory.serving
        assert directory.server_id > 0
        assert directory.lookup("Thing", "a") is None
        assert await get_rpc_proxy(IThing, "a", runtime=rt).touch() == 1
        assert directory.lookup("Thing", "a") == LOCAL
        assert await get_rpc_proxy(IThing, "a", runtime=rt).touch() == 2
        directory.forget("Thing", "a")  # its own positions are not a cache: kept
        assert directory.lookup("Thing", "a") == LOCAL
        assert await directory.resolve("Thing", "a") == LOCAL
        stats = directory.statistics()
        assert (stats.resolves, stats.owned) == (1, 1)


def touch(key: str, ticket: bytes) -> Request:
    deadline = anyio.current_time() + 5
    return Request(1, 1, deadline, "Thing", key, "IThing", "touch", (), placement=ticket)


async def test_a_request_with_this_hosts_ticket_is_served_without_asking_the_pd() -> None:
    async with cluster(MemberConfig(ttl=5)) as (_, rt, directory):
        me = directory.server_id
        tickets = {}
        for key in ("x", "y", "z"):  # placed (on the only host), as a peer's lookup would
            pos = await directory.pd.find_position("Thing", key)
            assert pos.server_id == me
            assert pos.revision > 0
            tickets[key] = pos.ticket
        # the peer forwards the PD's ticket: trusted, it is this host's and not stale
        resp = await rt.serve_request(touch("x", tickets["x"]))
        assert resp is not None
        assert (resp.error, resp.result) == (None, 1)
        stats = directory.statistics()
        assert (stats.resolves, stats.claims) == (0, 1)
        assert directory.lookup("Thing", "x") == LOCAL  # owned now
        # a forged ticket (one bit changed), or another actor's: this host asks the PD
        forged = tickets["y"][:-1] + bytes([tickets["y"][-1] ^ 1])
        resp = await rt.serve_request(touch("y", forged))
        assert resp is not None
        assert (resp.error, resp.result) == (None, 1)
        assert directory.statistics().resolves == 1
        assert not directory.claim("Thing", "z", tickets["x"])
        assert not directory.claim("Thing", "z", b"\0" * 32)
        assert directory.lookup("Thing", "z") is None
        # a host that stopped serving trusts no one (after a fence it is a new node)
        directory.serving = False
        assert not directory.claim("Thing", "z", tickets["z"])
        directory.serving = True
        assert directory.claim("Thing", "z", tickets["z"])


async def test_a_deactivated_actor_gives_its_position_back() -> None:
    async with cluster(MemberConfig(ttl=5)) as (pd, rt, directory):
        assert await get_rpc_proxy(IThing, "a", runtime=rt).touch() == 1
        first = await directory.pd.find_position("Thing", "a")
        assert not first.created
        act = rt.activation_of(Thing, "a")
        assert act is not None
        act.deactivate_on_idle()
        assert await get_rpc_proxy(IThing, "a", runtime=rt).touch() == 2  # the turn that ends it
        with anyio.fail_after(5):
            while directory.statistics().releases < 1:
                await anyio.sleep(0.01)
        assert rt.statistics().activations == 0
        assert directory.lookup("Thing", "a") is None
        stored = await pd.store.get("/koala/placement/Thing/a")
        assert stored is None  # etcd holds live actors only
        # the released position's ticket is stale now: not trusted, the PD is asked
        assert not directory.claim("Thing", "a", first.ticket)
        resp = await rt.serve_request(touch("a", first.ticket))
        assert resp is not None
        assert (resp.error, resp.result) == (None, 1)  # a fresh activation, placed anew
        again = await directory.pd.find_position("Thing", "a")
        assert again.revision > first.revision
        assert directory.statistics().owned == 1


async def test_an_actor_back_before_its_release_leaves_keeps_its_position() -> None:
    async with cluster(MemberConfig(ttl=5)) as (pd, rt, directory):
        assert await get_rpc_proxy(IThing, "b", runtime=rt).touch() == 1
        first = await directory.pd.find_position("Thing", "b")
        act = rt.activation_of(Thing, "b")
        assert act is not None
        act.deactivate_on_idle()
        async with anyio.create_task_group() as tg:
            # the turn that ends it, and a call right behind it: no PD request between
            tg.start_soon(get_rpc_proxy(IThing, "b", runtime=rt).touch)
            tg.start_soon(get_rpc_proxy(IThing, "b", runtime=rt).touch)
        await anyio.sleep(0.2)
        assert rt.statistics().activations == 1
        stored = await pd.store.get("/koala/placement/Thing/b")
        assert stored is not None
        assert stored.mod_revision == first.revision  # never deleted, never placed anew
        assert directory.lookup("Thing", "b") == LOCAL


async def test_other_hosts_positions_are_a_bounded_lru_with_a_ttl() -> None:
    config = MemberConfig(ttl=5, cache_size=3, cache_ttl=0.3)
    async with cluster() as (pd, _, host):
        client = PDClient(pd.url, timeout=1.0)
        # a second host in this process that serves nothing: every position is elsewhere
        caller = ClusterDirectory(client, "127.0.0.1:2", {}, config)
        async with anyio.create_task_group() as tg:
            await tg.start(caller.run)
            for key in "abcd":
                assert await caller.resolve("Thing", key) == "127.0.0.1:1"
            assert caller.statistics().cached == 3
            assert caller.lookup("Thing", "a") is None  # the least recently used went
            assert caller.lookup("Thing", "d") == "127.0.0.1:1"
            assert caller.ticket_of("Thing", "d") != b""
            assert caller.ticket_of("Thing", "a") == b""
            await anyio.sleep(0.4)
            assert caller.lookup("Thing", "d") is None  # expired
            assert host.statistics().owned == 0  # placed on it, never activated there
            tg.cancel_scope.cancel()
        await client.aclose()


async def test_concurrent_resolves_of_one_key_ask_the_pd_once() -> None:
    async with cluster(MemberConfig(ttl=5)) as (_, _, directory):
        answers: list[str] = []

        async def resolve() -> None:
            answers.append(await directory.resolve("Thing", "same"))

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(resolve)
        assert answers == [LOCAL] * 10
        assert directory.statistics().resolves == 1


async def test_concurrent_first_calls_are_batched_and_placed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(directory_module, "LOOKUP_QUEUE", 8)  # callers beyond wait for room
    async with cluster(MemberConfig(ttl=5)) as (pd, rt, directory):
        keys = [f"k{i}" for i in range(200)]
        done: list[str] = []

        async def first_call(key: str) -> None:
            assert await get_rpc_proxy(IThing, key, runtime=rt).touch() >= 1
            done.append(key)

        async with anyio.create_task_group() as tg:
            for key in keys * 2:  # every key twice, at once
                tg.start_soon(first_call, key)
        assert sorted(done) == sorted(keys * 2)
        assert rt.statistics().activations == 200
        stats = directory.statistics()
        assert stats.resolves == 200  # one lookup per key ...
        assert stats.lookup_batches < 200  # ... in fewer requests
        other = PDClient(pd.url)
        try:
            answers = await other.find_positions([("Thing", k) for k in keys])
        finally:
            await other.aclose()
        for answer in answers:
            assert not isinstance(answer, Exception)
            assert (answer.server_id, answer.created) == (directory.server_id, False)


async def test_a_failed_lookup_fails_only_its_own_callers() -> None:
    async with cluster(MemberConfig(ttl=5)) as (_, _, directory):
        results: dict[str, object] = {}

        async def resolve(actor_type: str, key: str) -> None:
            try:
                results[f"{actor_type}/{key}"] = await directory.resolve(actor_type, key)
            except PDRequestError as exc:
                results[f"{actor_type}/{key}"] = exc.code

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(resolve, "Thing", f"ok{i}")
                tg.start_soon(resolve, "Nobody", f"no{i}")
            tg.start_soon(resolve, "Thing", "x" * 300)
        assert [results[f"Thing/ok{i}"] for i in range(20)] == [LOCAL] * 20
        assert [results[f"Nobody/no{i}"] for i in range(20)] == ["no_host"] * 20
        assert results["Thing/" + "x" * 300] == "bad_request"


async def test_a_directory_that_is_not_running_refuses_lookups() -> None:
    client = PDClient("http://127.0.0.1:1")
    try:
        directory = ClusterDirectory(client, "127.0.0.1:1", {"Thing": "tests.Thing"})
        directory.serving = True  # as if registered, but run() is not running
        with pytest.raises(PDUnavailableError, match="not running"):
            await directory.resolve("Thing", "a")
    finally:
        await client.aclose()


async def test_renewals_report_load_to_the_pd() -> None:
    async with cluster(MemberConfig(ttl=1)) as (pd, rt, directory):
        for key in "abc":
            await get_rpc_proxy(IThing, key, runtime=rt).touch()
        await anyio.sleep(0.8)  # two renewals at TTL/3
        other = PDClient(pd.url)
        try:
            view = await other.fetch_all()
        finally:
            await other.aclose()
        me = view.hosts[directory.server_id]
        assert (me.activations, me.load) == (3, 3)
        assert directory.statistics().renewals >= 2
        assert set(directory.members) == {directory.server_id}


async def test_losing_the_pd_fences_the_host_then_it_rejoins_as_a_new_node() -> None:
    config = MemberConfig(ttl=1, rejoin_wait=0.2)
    async with cluster(config) as (pd, rt, directory):
        for key in "abc":
            await get_rpc_proxy(IThing, key, runtime=rt).touch()
        first = directory.server_id
        pd.stop()
        with anyio.fail_after(5):
            while directory.serving:
                await anyio.sleep(0.02)
        # fenced before the TTL ran out: nothing is live, nothing is local any more
        with anyio.fail_after(1):
            while rt.statistics().activations:
                await anyio.sleep(0.02)
        assert sorted(events) == ["deactivate a", "deactivate b", "deactivate c"]
        assert directory.lookup("Thing", "a") is None
        with pytest.raises(WrongHostError, match="lost its lease"):
            await directory.resolve("Thing", "a")
        with pytest.raises(WrongHostError):
            await get_rpc_proxy(IThing, "a", runtime=rt).touch()
        assert rt.statistics().activations == 0
        await pd.start()
        with anyio.fail_after(5):
            while not directory.serving:
                await anyio.sleep(0.02)
        assert directory.server_id != first
        stats = directory.statistics()
        assert (stats.registrations, stats.fences) == (2, 1)
        assert await get_rpc_proxy(IThing, "a", runtime=rt).touch() == 1  # a fresh activation


async def test_evict_all_keeps_the_runtime_serving() -> None:
    events.clear()
    async with Runtime(HostConfig(shutdown_grace=1), [Thing]) as rt:
        for key in "xy":
            await get_rpc_proxy(IThing, key, runtime=rt).touch()
        assert await rt.evict_all(grace=1.0) == 0
        assert sorted(events) == ["deactivate x", "deactivate y"]
        assert rt.statistics().activations == 0
        assert await get_rpc_proxy(IThing, "x", runtime=rt).touch() == 1


async def test_unreachable_pd_is_a_clear_error() -> None:
    client = PDClient(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    try:
        with anyio.fail_after(5), pytest.raises(PDUnavailableError, match="no PD can be reached"):
            await client.new_server_id()
    finally:
        await client.aclose()


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="http://"):
        PDClient("127.0.0.1:9000")
    with pytest.raises(ConfigError, match="ttl"):
        MemberConfig(ttl=0)
    with pytest.raises(ConfigError, match="fence_margin"):
        MemberConfig(ttl=3, fence_margin=2.5)
    with pytest.raises(ConfigError, match="cache_size"):
        MemberConfig(cache_size=0)
    with pytest.raises(ConfigError, match="reconcile_interval"):
        MemberConfig(reconcile_interval=-1)
    with pytest.raises(ConfigError, match="reconcile_grace"):
        MemberConfig(reconcile_grace=0)
    with pytest.raises(ConfigError, match="positions_per_lease"):
        MemberConfig(positions_per_lease=-1)


# ---------------------------------------------------------------- deltas and retries


async def test_directories_follow_membership_through_deltas() -> None:
    async with anyio.create_task_group() as tg:
        pd = PD(tg)
        await pd.start()
        clients = [PDClient(pd.url, timeout=1.0) for _ in range(2)]
        a = ClusterDirectory(clients[0], "127.0.0.1:1", {"Thing": "t"}, MemberConfig(ttl=1))
        b = ClusterDirectory(clients[1], "127.0.0.1:2", {"Thing": "t"}, MemberConfig(ttl=1))
        answers: list[tuple[bool, set[int], list[int]]] = []
        renew = clients[0].keep_alive

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            view = await renew(*args, **kwargs)
            answers.append((view.full, set(view.hosts), view.removed))
            return view

        clients[0].keep_alive = recorded  # type: ignore[method-assign]
        async with anyio.create_task_group() as members:
            await members.start(a.run)
            with anyio.fail_after(5):
                while not answers:
                    await anyio.sleep(0.02)
            async with anyio.create_task_group() as other:
                await other.start(b.run)
                with anyio.fail_after(5):
                    while b.server_id not in a.members or a.server_id not in b.members:
                        await anyio.sleep(0.02)
                assert a.members[b.server_id].address == "127.0.0.1:2"
                await b.leave()
                other.cancel_scope.cancel()
            with anyio.fail_after(5):
                while b.server_id in a.members:
                    await anyio.sleep(0.02)
            assert set(a.members) == {a.server_id}
            members.cancel_scope.cancel()
        for client in clients:
            await client.aclose()
        pd.stop()
    # the first answer is the whole table; then only changes: b added, b removed
    assert answers[0] == (True, {a.server_id}, [])
    assert (False, {b.server_id}, []) in answers
    assert (False, set(), [b.server_id]) in answers
    assert all(not full for full, _, _ in answers[1:])
    assert a.statistics().failed_renewals == 0


class Proxy:
    """A TCP proxy in front of the PD that breaks the connections it is told to: each
    connection ``n`` in ``kill`` is closed once its request arrived, unanswered (a
    server closing it under the request); with ``idle_close``, a connection idle that
    many seconds is closed (a server's keep-alive timeout)."""

    def __init__(self, upstream: int, kill: set[int], idle_close: float = 0.0) -> None:
        self.upstream = upstream
        self.kill = kill
        self.idle_close = idle_close
        self.port = free_port()
        self.connections = 0

    async def serve(self, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        async with listener:
            task_status.started()
            await listener.serve(self._handle)

    async def _handle(self, client: Any) -> None:
        n = self.connections
        self.connections += 1
        async with client:
            if n in self.kill:
                await client.receive()
                return
            async with await anyio.connect_tcp("127.0.0.1", self.upstream) as server:
                last = [anyio.current_time()]

                async def pump(src: Any, dst: Any) -> None:
                    try:
                        async for chunk in src:
                            last[0] = anyio.current_time()
                            await dst.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass
                    tg.cancel_scope.cancel()

                async def idle() -> None:
                    while True:
                        await anyio.sleep(
                            max(0.0, last[0] + self.idle_close - anyio.current_time())
                        )
                        if anyio.current_time() - last[0] >= self.idle_close:
                            tg.cancel_scope.cancel()
                            return

                async with anyio.create_task_group() as tg:
                    tg.start_soon(pump, client, server)
                    tg.start_soon(pump, server, client)
                    if self.idle_close:
                        tg.start_soon(idle)


async def test_a_connection_dropped_under_a_renewal_does_not_fail_it() -> None:
    async with anyio.create_task_group() as tg:
        pd = PD(tg)
        await pd.start()
        direct = PDClient(pd.url)
        server_id = await direct.new_server_id()
        lease = await direct.register(server_id, "127.0.0.1:1", {"Thing": "t"}, ttl=30)
        async with anyio.create_task_group() as proxies:
            # the PD's connection breaks under the renewal: it is sent again, and succeeds
            proxy = Proxy(pd.port, kill={0})
            await proxies.start(proxy.serve)
            client = PDClient(f"http://127.0.0.1:{proxy.port}", timeout=5.0)
            owner = direct.owner_key(server_id)
            assert owner is not None
            client.adopt(server_id, owner)  # it renews the registration `direct` made
            view = await client.keep_alive(server_id, lease, 1)
            assert server_id in view.hosts
            assert (client.retries, proxy.connections) == (1, 2)
            await client.aclose()
            # a request that is not safe to repeat is not: new_server_id would burn an id
            proxy.kill = {proxy.connections}
            client = PDClient(f"http://127.0.0.1:{proxy.port}", timeout=5.0)
            with pytest.raises(PDUnavailableError, match="no PD can be reached"):
                await client.new_server_id()
            assert client.retries == 0
            await client.aclose()
            # a PD that closes idle connections just when the renewal comes: it still works
            idle = Proxy(pd.port, kill=set(), idle_close=0.05)
            await proxies.start(idle.serve)
            client = PDClient(f"http://127.0.0.1:{idle.port}", timeout=5.0)
            client.adopt(server_id, owner)
            for n in range(20):
                await client.keep_alive(server_id, lease, n)
                await anyio.sleep(0.04 + 0.001 * n)  # around the idle timeout
            assert idle.connections >= 2
            await client.aclose()
            proxies.cancel_scope.cancel()
        await direct.aclose()
        pd.stop()


async def test_positions_never_taken_are_given_back_by_the_reconciler() -> None:
    """A position placed for a first call that never came is given back after the grace;
    the host's own live ones stay, and the stray one's ticket is refused afterwards."""
    config = MemberConfig(ttl=5, reconcile_interval=0.2, reconcile_grace=0.3)
    async with cluster(config) as (pd, rt, directory):
        assert await get_rpc_proxy(IThing, "live", runtime=rt).touch() == 1
        stray = await directory.pd.find_position("Thing", "stray")  # nobody calls it
        assert stray.server_id == directory.server_id
        with anyio.fail_after(10):
            while await pd.store.get("/koala/placement/Thing/stray") is not None:
                await anyio.sleep(0.05)
        assert await pd.store.get("/koala/placement/Thing/live") is not None
        assert directory.lookup("Thing", "live") == LOCAL
        assert not directory.claim("Thing", "stray", stray.ticket)  # given back
        assert await get_rpc_proxy(IThing, "stray", runtime=rt).touch() == 1  # placed anew
        again = await directory.pd.find_position("Thing", "stray")
        assert again.revision > stray.revision
        await anyio.sleep(0.8)  # passes that find it live leave it alone
        assert await pd.store.get("/koala/placement/Thing/stray") is not None


def test_the_client_side_loads_no_server_code() -> None:
    """``import koala.gateway`` (and ``koala.pd``) loads the PD's client, never its server,
    its stores or FastAPI; the store names of ``koala.pd`` load the server when asked."""
    script = (
        "import sys, koala.gateway, koala.pd\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('koala.pd.server', 'fastapi')))\n"
        "assert not loaded, loaded\n"
        "from koala.pd.server import EtcdStore\n"
        "assert 'koala.pd.server._etcd' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
