"""The directory protocol under random interleavings: no key ever has two live activations.

Model-based (hypothesis), on every backend. Three hosts live in this process, each a
real Runtime with a real ClusterDirectory, registered with one real PlacementDriver
(memory store, its HTTP API through httpx's ASGI transport). Hosts reach each other
through an in-process network (:class:`Net`) that can lose a request before delivery or
hold it back (so requests arrive out of order), and the PD's answers to releases can be
held back too (a late delete). Hypothesis draws a program: calls from any host,
deactivations, stale tickets replayed to any host, forged tickets, host deaths (the
host fences itself, its lease is revoked, it registers again as a new node) and passes
of the reconciler that gives back positions a host never took. Every activation checks
in ``on_activate`` that no other host holds a live activation of its key; at the end
every live activation's position must be in the store, naming its host.
"""

from __future__ import annotations

import contextlib
import secrets
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from koala import (
    ActorBase,
    ActorInterface,
    HostConfig,
    HostUnavailableError,
    KoalaError,
    Runtime,
    WrongHostError,
    get_rpc_proxy,
)
from koala._interface import MethodSpec
from koala._messages import Request, rebuild_error
from koala.pd import ClusterDirectory, MemberConfig, PDClient
from koala.pd._positions import OwnPositions
from koala.pd._ticket import make_ticket
from koala.pd.server import MemoryStore, PlacementDriver, create_app

pytestmark = pytest.mark.anyio

HOSTS = ("h0", "h1", "h2")
KEYS = ("k0", "k1", "k2")


class ICell(ActorInterface):
    @abstractmethod
    async def poke(self) -> str: ...


@dataclass
class World:
    """What every host can see: who holds which key live, and what went wrong."""

    live: dict[str, str] = field(default_factory=dict)  # key -> host name
    host_of: dict[int, str] = field(default_factory=dict)  # id(runtime) -> host name
    violations: list[str] = field(default_factory=list)
    activations: int = 0


WORLD = World()


class Cell(ICell, ActorBase):
    async def on_activate(self) -> None:
        me = WORLD.host_of[id(self._koala_activation.runtime)]
        other = WORLD.live.get(str(self.key))
        if other is not None:
            WORLD.violations.append(f"{self.key} activated on {me} while live on {other}")
        WORLD.live[str(self.key)] = me
        WORLD.activations += 1

    async def on_deactivate(self) -> None:
        me = WORLD.host_of[id(self._koala_activation.runtime)]
        if WORLD.live.get(str(self.key)) == me:
            del WORLD.live[str(self.key)]

    async def poke(self) -> str:
        await anyio.lowlevel.checkpoint()  # a turn that suspends: turns overlap other steps
        return WORLD.host_of[id(self._koala_activation.runtime)]


class Gated:
    """Something whose messages can be held back: while ``gate`` is set they wait."""

    gate: anyio.Event | None = None

    def let_go(self) -> None:
        if self.gate is not None:
            self.gate.set()
            self.gate = None


class Net(Gated):
    """The hosts' network: a request goes straight into the target's serve_request,
    unless it is lost (never delivered: the caller sees the host as unreachable) or
    held (delivered when released, after whatever happened meanwhile)."""

    def __init__(self) -> None:
        self.runtimes: dict[str, Runtime] = {}  # address -> runtime
        self.lose_next = 0

    async def deliver(self, address: str, req: Request, spec: MethodSpec) -> Any:
        if self.lose_next:
            self.lose_next -= 1
            raise HostUnavailableError(f"the request to {address} was lost")
        if self.gate is not None:
            await self.gate.wait()
        rt = self.runtimes.get(address)
        if rt is None:
            raise HostUnavailableError(f"{address} cannot be reached")
        resp = await serve_within_deadline(rt, req)  # immutable: nothing to copy
        if resp is None:
            return None
        if resp.error is not None:
            raise rebuild_error(resp.error)
        return spec.result.from_wire(resp.result)


async def serve_within_deadline(rt: Runtime, req: Request) -> Any:
    """serve_request as the transport runs it: bounded by the request's deadline."""
    with anyio.fail_at(req.deadline):
        return await rt.serve_request(req)


class NetDelivery:
    """The runtime's RemoteDelivery over :class:`Net`, forwarding the ticket as the
    transport does (PlacementRemote)."""

    def __init__(self, net: Net, directory: ClusterDirectory) -> None:
        self.net = net
        self.directory = directory

    async def call(self, host: str, req: Request, spec: MethodSpec) -> Any:
        req = req.with_placement(self.directory.ticket_of(req.actor_type, req.key))
        try:
            with anyio.fail_at(req.deadline):  # the connection enforces it (req.expires)
                return await self.net.deliver(host, req, spec)
        except (HostUnavailableError, WrongHostError):
            self.directory.forget(req.actor_type, req.key)
            raise


class HeldReleases(PDClient, Gated):
    """A PD client whose release requests can be held back (a late delete)."""

    async def release(self, server_id: int, positions: Any) -> list[bool]:
        if self.gate is not None:
            await self.gate.wait()
        return await super().release(server_id, positions)


@dataclass
class Host:
    name: str
    rt: Runtime
    directory: ClusterDirectory
    pd: HeldReleases


@dataclass
class Cluster:
    store: MemoryStore
    net: Net
    hosts: list[Host]
    tickets: list[tuple[str, bytes]]  # (key, ticket) of every position answered so far


@asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    WORLD.live.clear()
    WORLD.host_of.clear()
    WORLD.violations.clear()
    WORLD.activations = 0
    store = MemoryStore()
    app = create_app(PlacementDriver(store))
    net = Net()
    hosts: list[Host] = []
    config = HostConfig(default_timeout=2.0, shutdown_grace=1.0, idle_timeout=3600)
    # reconciling by hand (a step), with no grace: a first call may still be on its way
    member = MemberConfig(ttl=3600, reconcile_interval=0, reconcile_grace=1e-6)
    async with anyio.create_task_group() as tg:
        for i, name in enumerate(HOSTS):
            pd = HeldReleases("http://pd", transport=httpx.ASGITransport(app=app), timeout=2.0)
            address = f"10.0.0.{i}:7000"
            directory = ClusterDirectory(pd, address, {"Cell": "tests.Cell"}, member)
            rt = Runtime(config, [Cell], directory=directory)
            rt.remote = NetDelivery(net, directory)
            await tg.start(_run_host, rt, directory)
            net.runtimes[address] = rt
            WORLD.host_of[id(rt)] = name
            hosts.append(Host(name, rt, directory, pd))
        yield Cluster(store, net, hosts, [])
        tg.cancel_scope.cancel()


async def _run_host(
    rt: Runtime, directory: ClusterDirectory, *, task_status: Any = anyio.TASK_STATUS_IGNORED
) -> None:
    async with rt:
        directory.attach(rt)
        async with anyio.create_task_group() as tg:
            await tg.start(directory.run)
            task_status.started()
            await anyio.sleep_forever()


# ---------------------------------------------------------------- the program


@dataclass(frozen=True)
class Step:
    op: str
    host: int
    key: int
    n: int


OPS = (
    ["call"] * 6
    + ["deactivate"] * 3
    + ["collect", "replay", "replay", "forge", "lose", "hold", "let_go"]
    + ["hold_releases", "let_releases_go", "fence", "reconcile", "settle", "settle"]
)
steps = st.builds(
    Step,
    st.sampled_from(OPS),
    st.integers(0, len(HOSTS) - 1),
    st.integers(0, len(KEYS) - 1),
    st.integers(0, 50),
)


async def _quietly(call: Callable[[], Any]) -> None:
    """A call whose failure is fine (a lost request, a deadline): only safety counts."""
    with contextlib.suppress(KoalaError, TimeoutError):
        await call()


async def _step(c: Cluster, tg: Any, step: Step) -> None:
    host = c.hosts[step.host]
    key = KEYS[step.key]
    if step.op == "call":
        for _ in range(1 + step.n % 3):
            tg.start_soon(_quietly, get_rpc_proxy(ICell, key, runtime=host.rt).poke)
    elif step.op == "deactivate":  # wherever it lives
        for other in c.hosts:
            act = other.rt.activation_of(Cell, key)
            if act is not None:
                act.begin_deactivation()
    elif step.op == "collect":
        for act in list(host.rt._catalog):
            act.begin_deactivation()
    elif step.op in ("replay", "forge"):
        if step.op == "replay" and c.tickets:
            ticket_key, ticket = c.tickets[step.n % len(c.tickets)]
            key = ticket_key if step.n % 3 else key  # its own key, or another actor's
        else:  # a well-formed ticket for this host, keyed with a secret it never had
            fake = secrets.token_bytes(32)
            ticket = make_ticket(fake, "Cell", key, host.directory.server_id, 10**9)
        req = Request(
            1,
            step.n + 1,
            anyio.current_time() + 2.0,
            "Cell",
            key,
            "ICell",
            "poke",
            (),
            False,
            placement=ticket,
        )
        tg.start_soon(_quietly, lambda: serve_within_deadline(host.rt, req))
    elif step.op == "lose":
        c.net.lose_next += 1
    elif step.op == "hold":
        if c.net.gate is None:
            c.net.gate = anyio.Event()
    elif step.op == "let_go":
        c.net.let_go()
    elif step.op == "hold_releases":
        if host.pd.gate is None:
            host.pd.gate = anyio.Event()
    elif step.op == "let_releases_go":
        host.pd.let_go()
    elif step.op == "fence":
        tg.start_soon(_die_and_rejoin, c, host)
    elif step.op == "reconcile":
        tg.start_soon(_quietly, lambda: _reconcile_once(host))
    else:  # settle: let the background (releases, lookups, turns) run a while
        await anyio.sleep(0.001 * step.n)
    for _ in range(step.n % 8):  # let what was started take a few steps of its own
        await anyio.lowlevel.checkpoint()


async def _reconcile_once(host: Host) -> None:
    """One pass of the host's reconciler: positions it holds in the store but never took
    are given back (here at once, with no grace)."""
    directory = host.directory
    if directory.serving and await directory._disown_stray(directory.server_id, directory.lease_id):
        directory._release_wanted.set()


async def _die_and_rejoin(c: Cluster, host: Host) -> None:
    """The host loses its lease: it fences itself (nothing of it stays live), the lease
    is revoked in the store (its positions go), and it registers again as a new node."""
    directory = host.directory
    if not directory.serving:
        return
    lease = directory.lease_id
    await directory._fence()
    await c.store.revoke(lease)
    await directory._register()
    directory.serving = True
    directory._rejoined.set()


def _record_tickets(c: Cluster) -> None:
    for host in c.hosts:
        for (actor_type, key), entry in list(host.directory._cache.items()):
            if actor_type == "Cell" and entry[3]:
                c.tickets.append((str(key), entry[3]))
    del c.tickets[:-64]


async def _snapshot_tickets(c: Cluster) -> None:
    """Tickets the PD gives out now, as any caller could have seen them."""
    for key in KEYS:
        try:
            pos = await c.hosts[0].pd.find_position("Cell", key)
        except KoalaError:
            continue
        c.tickets.append((key, pos.ticket))


@settings(
    max_examples=40,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(program=st.lists(steps, min_size=10, max_size=60))
async def test_no_key_ever_has_two_live_activations(program: list[Step]) -> None:
    async with cluster() as c:
        with anyio.fail_after(15):  # a hang fails the example (every call has a deadline)
            async with anyio.create_task_group() as tg:
                for i, step in enumerate(program):
                    await _step(c, tg, step)
                    _record_tickets(c)
                    if i % 7 == 0:
                        await _snapshot_tickets(c)
                # let everything held go; the task group waits for what is in flight
                c.net.let_go()
                for host in c.hosts:
                    host.pd.let_go()
        assert WORLD.violations == []
        _check_store(c)


def _check_store(c: Cluster) -> None:
    """Every live activation's position is in the store, naming its host at the
    revision the host holds (read at one instant: nothing runs meanwhile)."""
    by_name = {h.name: h for h in c.hosts}
    for key, name in WORLD.live.items():
        host = by_name[name]
        assert host.directory.serving
        positions = host.directory._positions
        # held, or ended with its actor back before the release left (taken back next)
        revision = positions.owned(("Cell", key)) or positions._ended.get(("Cell", key))
        stored = c.store._data.get(f"/koala/placement/Cell/{key}")
        assert stored is not None, f"{key} is live on {name} with no position"
        assert revision == stored.mod_revision, f"{key} on {name}: {revision} != stored"
        assert stored.lease == host.directory.lease_id


async def _live_on_another_host(c: Cluster, key: str, not_on: str) -> str:
    """Deactivate ``key`` and call it again until it lives on a host other than
    ``not_on`` (placement picks hosts at random); that host's name."""
    for _ in range(50):
        for host in c.hosts:
            act = host.rt.activation_of(Cell, key)
            if act is not None:
                act.begin_deactivation()
        while any(h.rt.activation_of(Cell, key) for h in c.hosts) or any(
            h.directory.statistics().unreleased for h in c.hosts
        ):
            await anyio.sleep(0.005)
        for host in c.hosts:  # no stale cache: the PD places it anew
            host.directory.forget("Cell", key)
        caller = next(h for h in c.hosts if h.name != not_on)  # no cache on not_on then
        where = await get_rpc_proxy(ICell, key, runtime=caller.rt).poke()
        if where != not_on:
            return where
    raise AssertionError(f"{key} never left {not_on}")


def _request(key: str, ticket: bytes) -> Request:
    return Request(
        1, 7, anyio.current_time() + 2.0, "Cell", key, "ICell", "poke", (), placement=ticket
    )


async def test_a_stale_ticket_is_refused_and_the_model_sees_it_matter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ticket of a position given back since is not trusted: the host asks the PD, and
    the call reaches the actor where it lives now. With the staleness check turned off
    (trusting a ticket only because it is the host's own, as before positions were
    deleted), the same request makes a second activation, which the model reports."""
    for broken in (False, True):
        if broken:
            monkeypatch.setattr(OwnPositions, "stale", lambda self, ident, revision: False)
        async with cluster() as c:
            with anyio.fail_after(20):
                first = await get_rpc_proxy(ICell, "k0", runtime=c.hosts[0].rt).poke()
                old = await c.hosts[0].pd.find_position("Cell", "k0")
                assert WORLD.host_of[id(c.hosts[int(first[1])].rt)] == first
                now = await _live_on_another_host(c, "k0", first)
                stale = c.hosts[int(first[1])]
                resp = await stale.rt.serve_request(_request("k0", old.ticket))
                assert resp is not None
        if broken:
            assert WORLD.violations, "the model missed a second activation"
        else:
            assert WORLD.violations == []
            assert resp.error is not None  # wrong host: it lives elsewhere
            assert "WrongHost" in resp.error.type_name, resp.error
            assert now != first


async def test_a_forged_ticket_is_refused_and_the_model_sees_it_matter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A well-formed ticket naming a host, made with a key it never had, is not trusted.
    A directory that trusts any ticket naming it (the old placed_on rule) gives a second
    activation on it, which the model reports."""

    def trusting(self: ClusterDirectory, actor_type: str, key: Any, ticket: bytes) -> bool:
        if not self.serving or len(ticket) != 32:
            return False
        self._positions.own((actor_type, key), 1)
        return True

    for broken in (False, True):
        if broken:
            monkeypatch.setattr(ClusterDirectory, "claim", trusting)
        async with cluster() as c:
            with anyio.fail_after(10):
                where = await get_rpc_proxy(ICell, "k0", runtime=c.hosts[0].rt).poke()
                for host in c.hosts:
                    if host.name != where:
                        fake = make_ticket(b"x" * 32, "Cell", "k0", host.directory.server_id, 1)
                        await host.rt.serve_request(_request("k0", fake))
        assert bool(WORLD.violations) == broken
