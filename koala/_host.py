"""The host process, composed: runtime, transport, PD membership and the app's HTTP.

:func:`serve_host` is ``koala host``; :func:`embedded_host` is what ``koala dev`` runs:
one runtime registered with a PD inside this process (:func:`embedded_pd`). This is
the composition root of a host: it imports the runtime, the transport, the PD's
client, the gateway's bridge and the HTTP server, and nothing below imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from functools import partial
from types import ModuleType
from typing import Any

import anyio
import anyio.abc
import httpx

from ._actor import _implementations
from ._config import HostConfig
from ._errors import ConfigError
from ._net import join_hostport
from ._tls import TLSConfig
from .dashboard import ClusterSample, Dashboard, access_from_env
from .gateway import Gateway, HostBridge
from .host import Runtime
from .http import Readiness, add_error_handlers, serve_asgi
from .pd import ClusterDirectory, MemberConfig, PDClient, PlacementRemote
from .pd.server import MemoryStore, PlacementDriver, create_app
from .pd.server._dashboard import cluster_sample
from .transport import Transport, TransportConfig

EMBEDDED_PD_URL = "http://embedded-pd"
# what the embedded host registers as its address: never dialled (every actor is local),
# and a name that cannot resolve (RFC 2606's .invalid)
EMBEDDED_ADDRESS = "embedded.invalid:1"


def embedded_pd(driver: PlacementDriver | None = None) -> PDClient:
    """A placement driver inside this process (``driver``; default: a new one on the
    in-memory store), reached through its own HTTP API without a socket (httpx's ASGI
    transport): what ``koala dev`` runs, so one process places, leases and fences
    exactly as a cluster does."""
    app = create_app(driver or PlacementDriver(MemoryStore()))
    return PDClient(EMBEDDED_PD_URL, transport=httpx.ASGITransport(app=app))


class DevPage:
    """``koala dev``'s cluster page (koala.dashboard): its embedded PD's host table, and
    the sessions of its gateway once :meth:`serve_gateway` runs one. The embedded PD
    has no cluster secret, so the page is open (loopback by default), unless
    KOALA_DASHBOARD_PASSWORD asks for a password."""

    def __init__(self, driver: PlacementDriver | None = None) -> None:
        self.driver = driver or PlacementDriver(MemoryStore())
        self.gateway: Gateway | None = None
        password, closed = access_from_env(secret=False)
        self.dashboard = Dashboard(self._sample, password=password, closed_reason=closed)

    async def run(self, shutdown: anyio.Event) -> None:
        """Sample for the page until ``shutdown`` is set."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.dashboard.run)
            await shutdown.wait()
            tg.cancel_scope.cancel()

    async def _sample(self) -> ClusterSample:
        sessions = self.gateway.statistics().sessions if self.gateway is not None else None
        return cluster_sample(self.driver, sessions)

    async def serve_gateway(
        self,
        runtime: Runtime,
        host: str,
        port: int,
        shutdown: anyio.Event,
        *,
        task_status: anyio.abc.TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """``koala dev --gateway``: koala.gateway's in-process gateway, its sessions
        on the page."""
        from .gateway._gateway import LocalLink
        from .gateway._serve import dev_config

        self.gateway = Gateway(dev_config(), LocalLink(runtime))
        try:
            await self.gateway.serve(host, port, shutdown, task_status=task_status)
        finally:
            self.gateway = None


@asynccontextmanager
async def embedded_host(
    config: HostConfig,
    member: MemberConfig | None = None,
    *,
    driver: PlacementDriver | None = None,
) -> AsyncIterator[Runtime]:
    """A runtime registered with an embedded PD (``koala dev``; ``driver``: that PD,
    default a new one): every actor is placed through the PD's atomic placement, on
    this host, under a lease it renews."""
    services = served_types()
    pd = embedded_pd(driver)
    try:
        directory = ClusterDirectory(pd, EMBEDDED_ADDRESS, services, member)
        async with Runtime(config, directory=directory) as rt, anyio.create_task_group() as tg:
            directory.attach(rt, stats=rt.host_stats)
            await tg.start(directory.run)
            try:
                yield rt
                await rt.shutdown()
                with anyio.move_on_after(5, shield=True):
                    await directory.leave()
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await pd.aclose()


def host_readiness(rt: Runtime) -> Readiness:
    """``/readyz`` of a host: not ready while its runtime drains, nor while its
    membership says it is not registered, fenced, or not renewing its lease
    (:meth:`koala.pd.MembershipAgent.readiness`; a runtime without one: ready)."""
    membership: Callable[[], str] | None = getattr(rt.directory, "readiness", None)

    async def readiness() -> str:
        if rt.draining:
            return "draining"
        return membership() if membership is not None else ""

    return readiness


def served_types() -> dict[str, str]:
    """Actor type -> implementation, for every implementation defined in this process."""
    found: dict[str, str] = {}
    for impls in _implementations.values():
        for impl in impls:
            if not inspect.isabstract(impl):
                found[impl.actor_type] = f"{impl.__module__}.{impl.__qualname__}"
    return found


async def serve_host(
    module: ModuleType,
    pd_url: str,
    listen: tuple[str, int],
    shutdown: anyio.Event,
    *,
    http: tuple[str, int] | None = None,
    metrics: tuple[str, int] | None = None,
    config: HostConfig | None = None,
    member: MemberConfig | None = None,
    tls: TLSConfig | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """A host of the cluster: runtime, transport and PD membership, and the module's
    ``app`` over HTTP if it has one (``metrics``: an address for /metrics and the health
    checks alone); until ``shutdown``, then drain and leave. Its PD
    requests are signed with the transport's cluster secret (KOALA_CLUSTER_SECRET).
    ``tls`` (default: KOALA_TLS_*) secures all three: mutual TLS on host links, HTTPS
    to the PD (checked against its CA) and HTTPS for the app."""
    services = served_types()
    if not services:
        raise ConfigError("the app defines no actor implementation: a host would serve nothing")
    app: Any = getattr(module, "app", None)
    tls = tls if tls is not None else TLSConfig.from_env()
    transport_config = TransportConfig.from_env(tls=tls)
    pd = PDClient(pd_url, secret=transport_config.secret, tls=tls)
    try:
        async with Transport(transport_config) as transport:
            directory = ClusterDirectory(pd, "", services, member)
            remote = PlacementRemote(transport, directory)
            rt = Runtime(config or HostConfig(), directory=directory, remote=remote)
            rt.add_drain_hook(transport.go_away)
            async with rt:
                transport.handler = rt.serve_request
                transport.on_event = (bridge := HostBridge(rt)).on_event  # gateways' sessions
                directory.address = await _listen(transport, *listen)
                directory.attach(rt, stats=rt.host_stats)
                async with anyio.create_task_group() as member_tg:
                    member_tg.start_soon(bridge.run)
                    if not await _start_unless(shutdown, member_tg, directory.run):
                        # stopped while registering (the PD or its etcd is down): there
                        # is nothing to drain and no registration to leave
                        announce("koala host: stopped before it could register with the PD")
                        member_tg.cancel_scope.cancel()
                        return
                    async with anyio.create_task_group() as http_tg:
                        where = ""
                        if app is not None and http is not None:
                            add_error_handlers(app)
                            bound = await http_tg.start(
                                partial(serve_asgi, tls=tls, readiness=host_readiness(rt)),
                                app,
                                http[0],
                                http[1],
                                shutdown,
                            )
                            where = f"; HTTP on {tls.scheme}://{bound[0]}:{bound[1]}"
                        if metrics is not None:
                            bound = await http_tg.start(
                                partial(serve_asgi, tls=tls, readiness=host_readiness(rt)),
                                _nothing_else,
                                metrics[0],
                                metrics[1],
                                shutdown,
                            )
                            where += f"; metrics on {tls.scheme}://{bound[0]}:{bound[1]}/metrics"
                        announce(
                            f"koala host: server {directory.server_id} on {directory.address}"
                            f"{where}; serving {', '.join(sorted(services))}"
                        )
                        await shutdown.wait()
                    await rt.shutdown()
                    with anyio.move_on_after(5, shield=True):
                        await directory.leave()
                    member_tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await pd.aclose()


async def _nothing_else(scope: Any, receive: Any, send: Any) -> None:
    """The app behind a metrics-only address: koala.http answers /metrics, /healthz and
    /readyz in front of it; anything else is not here."""
    if scope["type"] == "lifespan":  # nothing to start or stop; say so when asked
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = b'{"error": "not_found", "message": "this address serves /metrics and health only"}'
    await send(
        {
            "type": "http.response.start",
            "status": 404,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _listen(transport: Transport, host: str, port: int) -> str:
    """The transport's listener, or a one-line error naming the address (a port in use
    is an operator's mistake, not a crash)."""
    try:
        return await transport.listen(host, port)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {join_hostport(host, port)}: {why}") from None


async def _start_unless(
    shutdown: anyio.Event,
    tg: anyio.abc.TaskGroup,
    func: Callable[..., Coroutine[Any, Any, None]],
) -> bool:
    """``tg.start(func)``, unless ``shutdown`` is set first: then ``func`` is cancelled
    (until it reports started it runs in this caller's scope) and the answer is False.

    Registration retries until the PD answers; a SIGTERM meanwhile must still stop
    the host, or a container manager ends up killing it."""
    with anyio.CancelScope() as starting:
        async with anyio.create_task_group() as watch:

            async def cancel_on_shutdown() -> None:
                await shutdown.wait()
                starting.cancel()

            watch.start_soon(cancel_on_shutdown)
            await tg.start(func)
            watch.cancel_scope.cancel()
    return not starting.cancelled_caught
