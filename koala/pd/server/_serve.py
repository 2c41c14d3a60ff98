"""The ``koala pd`` process: the store it was asked for, and the PD's API served over it."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from ..._errors import ConfigError
from ...dashboard import ClusterSample, Dashboard, access_from_env
from ...http import serve_asgi
from ._api import create_app
from ._dashboard import cluster_sample
from ._driver import PlacementDriver
from ._store import StoreError

if TYPE_CHECKING:
    from ..._tls import TLSConfig
    from .._auth import AuthConfig
    from ._maintenance import MaintenanceConfig


READY_FOR = 1.0  # seconds one answer of the store is reused for /readyz
READY_TIMEOUT = 2.0  # seconds the store has to answer /readyz's check


class StoreProbe:
    """``/readyz`` of a PD: ready while its store answers (a status request), else
    "store_unavailable". A full store (NOSPACE) still counts as ready: the PD serves
    renewals and reads, and every PD shares the store, so none would be better.

    One check runs at a time and its answer is kept READY_FOR seconds: /readyz needs
    no credentials, and must not become a way to load etcd."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._lock = anyio.Lock()
        self._checked = -math.inf
        self._word = ""

    async def __call__(self) -> str:
        async with self._lock:
            if anyio.current_time() - self._checked >= READY_FOR:
                try:
                    with anyio.fail_after(READY_TIMEOUT):
                        await self.store.status()
                    self._word = ""
                except (StoreError, TimeoutError):
                    self._word = "store_unavailable"
                self._checked = anyio.current_time()
            return self._word


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
    certificate it signed (mutual TLS).

    ``/dashboard`` is the cluster page (koala.dashboard), in front of the API's guard:
    it is not signed but has its own rule (``access_from_env``: open without a cluster
    secret, else only with KOALA_DASHBOARD_PASSWORD)."""
    pd = PlacementDriver(store, prefix=prefix, maintenance=maintenance)
    password, closed = access_from_env(auth is not None and auth.secret is not None)

    async def sample() -> ClusterSample:
        return cluster_sample(pd)

    dashboard = Dashboard(sample, password=password, closed_reason=closed)
    sampler = anyio.CancelScope()

    async def sampling() -> None:
        with sampler:
            await dashboard.run()

    app = dashboard.wrap(create_app(pd, auth))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(pd.maintain)
            if closed is None:
                tg.start_soon(sampling)
            try:
                await serve_asgi(
                    app,
                    host,
                    port,
                    shutdown,
                    tls=tls,
                    require_client_cert=tls is not None and tls.ca is not None,
                    readiness=StoreProbe(store),
                    task_status=task_status,
                )
            finally:
                # maintenance ends by its own scope: cancelling this task group instead
                # left one of hypercorn's connections open on uvloop (the loop then
                # refused to close); the sampler likewise, by its own scope
                pd.stop_maintenance()
                sampler.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
