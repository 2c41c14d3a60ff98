"""The processes of a cluster: ``koala pd``, ``koala host`` and ``koala status``.

Each ``serve_*`` runs until its ``shutdown`` event is set, then stops in order. The
CLI (koala/cli.py) parses flags and sets the event on SIGINT/SIGTERM.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from types import ModuleType
from typing import TYPE_CHECKING, Any

import anyio
import httpx
from anyio.abc import TaskStatus

from .._actor import _implementations
from .._config import HostConfig
from .._errors import ConfigError
from .._runtime import Runtime
from .._tls import TLSConfig
from ..gateway import HostBridge
from ..http import add_error_handlers, serve_asgi
from ..transport import Transport, TransportConfig
from ._client import ClusterDirectory, MemberConfig, Membership, PDClient, PlacementRemote

if TYPE_CHECKING:
    from ._auth import AuthConfig
    from ._service import MaintenanceConfig

log = logging.getLogger("koala.pd")


def open_store(store: str, etcd: str | None, *, timeout: float = 5.0) -> Any:
    """The store ``koala pd`` was asked for: ``memory``, or etcd at ``etcd``."""
    from ._etcd import EtcdStore
    from ._store import MemoryStore

    if store == "memory":
        if etcd:
            raise ConfigError("--store memory and --etcd exclude each other")
        return MemoryStore()
    if store != "etcd":
        raise ConfigError(f"--store must be 'etcd' or 'memory', got {store!r}")
    if not etcd:
        raise ConfigError(
            "koala pd needs --etcd URL (e.g. http://127.0.0.1:2379), or --store memory for a "
            "single PD without etcd"
        )
    return EtcdStore(etcd, timeout=timeout)


async def serve_pd(
    store: Any,
    host: str,
    port: int,
    shutdown: anyio.Event,
    *,
    prefix: str = "/koala/",
    maintenance: MaintenanceConfig | None = None,
    auth: AuthConfig | None = None,
    tls: TLSConfig | None = None,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the PD's HTTP API over ``store`` until ``shutdown`` is set, looking after
    the store meanwhile (compaction, recovery from NOSPACE: ``maintenance``).

    ``auth``: the cluster secret every request must be signed with, and the API's
    bounds (``AuthConfig.from_env()`` reads KOALA_CLUSTER_SECRET); None: no secret.
    ``tls`` with a certificate serves HTTPS; with a CA too, callers must present a
    certificate it signed (mutual TLS)."""
    from ._api import create_app
    from ._service import PlacementDriver

    pd = PlacementDriver(store, prefix=prefix, maintenance=maintenance)
    app = create_app(pd, auth)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pd.maintain)
            try:
                await serve_asgi(
                    app,
                    host,
                    port,
                    shutdown,
                    tls=tls,
                    require_client_cert=tls is not None and tls.ca is not None,
                    task_status=task_status,
                )
            finally:
                # maintenance ends by its own scope: cancelling this task group instead
                # left one of hypercorn's connections open on uvloop (the loop then
                # refused to close)
                pd.stop_maintenance()
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


EMBEDDED_PD_URL = "http://embedded-pd"
# what the embedded host registers as its address: never dialled (every actor is local),
# and a name that cannot resolve (RFC 2606's .invalid)
EMBEDDED_ADDRESS = "embedded.invalid:1"


def embedded_pd() -> PDClient:
    """A placement driver inside this process, on the in-memory store, reached through
    its own HTTP API without a socket (httpx's ASGI transport): what ``koala dev`` runs,
    so one process places, leases and fences exactly as a cluster does."""
    from ._api import create_app
    from ._service import PlacementDriver
    from ._store import MemoryStore

    app = create_app(PlacementDriver(MemoryStore()))
    return PDClient(EMBEDDED_PD_URL, transport=httpx.ASGITransport(app=app))


@asynccontextmanager
async def embedded_host(
    config: HostConfig, member: MemberConfig | None = None
) -> AsyncIterator[Runtime]:
    """A runtime registered with an embedded PD (``koala dev``): every actor is placed
    through the PD's atomic placement, on this host, under a lease it renews."""
    services = served_types()
    pd = embedded_pd()
    try:
        directory = ClusterDirectory(pd, EMBEDDED_ADDRESS, services, member)
        async with Runtime(config, directory=directory) as rt, anyio.create_task_group() as tg:
            directory.attach(rt)
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
    config: HostConfig | None = None,
    member: MemberConfig | None = None,
    tls: TLSConfig | None = None,
    announce: Callable[[str], None] = print,
) -> None:
    """A host of the cluster: runtime, transport and PD membership, and the module's
    ``app`` over HTTP if it has one; until ``shutdown``, then drain and leave. Its PD
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
            rt.drain_hooks.append(transport.go_away)
            async with rt:
                transport.handler = rt.serve_request
                transport.on_event = (bridge := HostBridge(rt)).on_event  # gateways' sessions
                directory.address = await transport.listen(*listen)
                directory.attach(rt)
                async with anyio.create_task_group() as member_tg:
                    member_tg.start_soon(bridge.run)
                    await member_tg.start(directory.run)
                    async with anyio.create_task_group() as http_tg:
                        where = ""
                        if app is not None and http is not None:
                            add_error_handlers(app)
                            bound = await http_tg.start(
                                partial(serve_asgi, tls=tls), app, http[0], http[1], shutdown
                            )
                            where = f"; HTTP on {tls.scheme}://{bound[0]}:{bound[1]}"
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


def _age(now_ms: int, then_ms: int) -> str:
    if not then_ms:
        return "-"
    seconds = max(0.0, (now_ms - then_ms) / 1000)
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def status_table(view: Membership) -> str:
    """The cluster as a text table: one host per line."""
    now = view.now or int(time.time() * 1000)
    header = ("SERVER", "ADDRESS", "LOAD", "ACTIVATIONS", "LEASE AGE", "RENEWED", "TTL", "SERVES")
    rows = [header]
    for server_id in sorted(view.hosts):
        h = view.hosts[server_id]
        rows.append(
            (
                str(server_id),
                h.address,
                str(h.load),
                str(h.activations),
                _age(now, h.start_time),
                f"{_age(now, h.renew_time)} ago",
                f"{h.ttl}s",
                ",".join(sorted(h.services)),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(f"{len(view.hosts)} host(s)")
    return "\n".join(lines)


async def fetch_status(
    pd_url: str, *, secret: bytes | str | None = None, tls: TLSConfig | None = None
) -> str:
    """``koala status``: the PD's membership as a table; ``secret`` signs the request
    (the cluster secret, when the PD has one); ``tls``: the CA to check the PD against
    (and this client's certificate, for a PD that asks for one)."""
    pd = PDClient(pd_url, secret=secret, tls=tls)
    try:
        return status_table(await pd.fetch_all())
    finally:
        await pd.aclose()
