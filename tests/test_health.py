"""/healthz and /readyz (koala.http.Front) on hosts, the PD and the gateway.

A real cluster (etcd, ``koala pd``, two ``koala host`` processes) shows readiness turning
503 while the hosts are fenced and the PD cannot reach etcd, and back once etcd returns;
in-process servers show a draining host, a full or stopping gateway, and that an app
keeps the health paths it routes itself.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import TaskStatus
from fastapi import FastAPI

from koala import ActorBase, ActorInterface, HostConfig, get_rpc_proxy
from koala._host import embedded_host, host_readiness
from koala.http import Readiness, serve_asgi

from ._cluster import Cluster, Proc, cluster_of, url
from ._etcd import EtcdProcess, private_etcd
from ._gateway_client import connect, session
from ._gateway_helpers import gateway_config, local_gateway

__all__ = ["private_etcd"]

pytestmark = pytest.mark.anyio

RECOVERY = 30.0  # a bound for liveness under load (TTLs are seconds), not a speed claim


def health(base: str, path: str) -> tuple[int, dict[str, Any]]:
    resp = httpx.get(base + path, timeout=10)
    return resp.status_code, resp.json()


@asynccontextmanager
async def served(
    app: Any, readiness: Readiness | None = None
) -> AsyncIterator[tuple[str, anyio.Event]]:
    """``app`` behind serve_asgi on a free port: its base URL and shutdown event."""
    shutdown = anyio.Event()

    async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
        await serve_asgi(
            app, "127.0.0.1", 0, shutdown, readiness=readiness, task_status=task_status
        )

    async with anyio.create_task_group() as tg:
        host, port = await tg.start(serve)
        try:
            yield f"http://{host}:{port}", shutdown
        finally:
            shutdown.set()


async def test_healthz_and_readyz_answer_before_the_app() -> None:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> str:
        return "hi"

    word = ""

    async def readiness() -> str:
        return word

    async with served(app, readiness) as (base, _), httpx.AsyncClient(base_url=base) as client:
        resp = await client.get("/healthz")
        assert (resp.status_code, resp.json()) == (200, {"status": "alive"})
        assert resp.headers["cache-control"] == "no-store"
        resp = await client.get("/readyz")
        assert (resp.status_code, resp.json()) == (200, {"status": "ready"})
        word = "fenced"
        resp = await client.get("/readyz")
        assert (resp.status_code, resp.json()) == (503, {"status": "fenced"})
        head = await client.head("/readyz")
        assert (head.status_code, head.content) == (503, b"")
        post = await client.post("/healthz")
        assert post.status_code == 405
        assert post.headers["allow"] == "GET, HEAD"
        assert (await client.get("/hello")).json() == "hi"  # the app's own routes
        assert (await client.get("/nothing")).status_code == 404


async def test_a_failing_readiness_check_is_503_unknown() -> None:
    async def broken() -> str:
        raise RuntimeError("the check itself broke")

    async with served(FastAPI(), broken) as (base, _), httpx.AsyncClient(base_url=base) as c:
        resp = await c.get("/readyz")
        assert (resp.status_code, resp.json()) == (503, {"status": "unknown"})
        assert (await c.get("/healthz")).status_code == 200


async def test_an_app_keeps_the_health_paths_it_routes() -> None:
    app = FastAPI()

    @app.get("/healthz")
    async def own() -> dict[str, str]:
        return {"mine": "yes"}

    async def never_ready() -> str:
        return "nope"

    async with served(app, never_ready) as (base, _), httpx.AsyncClient(base_url=base) as c:
        assert (await c.get("/healthz")).json() == {"mine": "yes"}
        assert (await c.get("/readyz")).status_code == 503  # not routed by the app


class ISlow(ActorInterface):
    @abstractmethod
    async def hold(self) -> str: ...


RELEASE: list[anyio.Event] = []
HOLDING: list[anyio.Event] = []


class Slow(ISlow, ActorBase):
    async def hold(self) -> str:
        HOLDING[0].set()
        await RELEASE[0].wait()
        return "released"


async def test_a_draining_host_is_not_ready() -> None:
    """runtime.shutdown() with a turn in flight: /readyz says "draining" until it ends,
    and /healthz stays 200 (the process still serves)."""
    RELEASE[:] = [anyio.Event()]
    HOLDING[:] = [anyio.Event()]
    app = FastAPI()

    @app.get("/hold")
    async def hold() -> str:
        return await get_rpc_proxy(ISlow, "s").hold()

    config = HostConfig(shutdown_grace=30.0, default_timeout=30.0)
    async with (
        embedded_host(config) as rt,
        served(app, host_readiness(rt)) as (base, _),
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        async with anyio.create_task_group() as tg:
            answers: list[str] = []

            async def call() -> None:
                answers.append((await client.get("/hold")).json())

            tg.start_soon(call)
            with anyio.fail_after(10):
                await HOLDING[0].wait()
            tg.start_soon(rt.shutdown)
            with anyio.fail_after(10):
                while not rt.draining:
                    await anyio.sleep(0.01)
            resp = await client.get("/readyz")
            assert (resp.status_code, resp.json()) == (503, {"status": "draining"})
            assert (await client.get("/healthz")).status_code == 200
            RELEASE[0].set()
        assert answers == ["released"]  # the turn in flight finished


async def test_gateway_readiness_full_and_stopping() -> None:
    async with local_gateway(gateway_config(max_connections=1)) as (address, gateway, _):
        base = f"http://{address[0]}:{address[1]}"
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).json() == {"status": "alive"}
            assert (await client.get("/readyz")).json() == {"status": "ready"}
            assert (await client.get("/")).status_code == 426  # still the gateway's own
            async with session(address, actor_id="h1") as c:
                await c.receive()
                resp = await client.get("/readyz")
                assert (resp.status_code, resp.json()) == (503, {"status": "full"})
            with anyio.fail_after(10):
                while gateway.statistics().connections:
                    await anyio.sleep(0.02)
            assert (await client.get("/readyz")).status_code == 200
            async with connect(address) as c:
                stop = anyio.Event()

                async def close_all() -> None:
                    await gateway.close_all()
                    stop.set()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(close_all)
                    await c.expect_close()
                    resp = await client.get("/readyz")
                    assert (resp.status_code, resp.json()) == (503, {"status": "stopping"})
                    await stop.wait()


# ---------------------------------------------------------------- a real cluster


@pytest.fixture
def etcd_cluster(tmp_path: Path, private_etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path, private_etcd.url, "health")


def wait_for(what: Callable[[], bool], why: Callable[[], str]) -> None:
    deadline = time.monotonic() + RECOVERY
    while not what():
        assert time.monotonic() < deadline, why()
        time.sleep(0.1)


def ready_word(proc: Proc) -> str:
    status, body = health(url(proc), "/readyz")
    word = str(body["status"])
    assert (status == 200) == (word == "ready"), (status, body)
    return word


def is_ready(proc: Proc, word: str) -> bool:
    return ready_word(proc) == word


def hit(host: Proc, key: str) -> int:
    return httpx.get(f"{url(host)}/hit/{key}", timeout=30).status_code


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_cluster_readiness_follows_fencing_and_the_store(
    etcd_cluster: Cluster, private_etcd: EtcdProcess, backend: str
) -> None:
    """With a cluster secret (so every PD request is signed): the health paths need
    none. etcd stops: the PD says store_unavailable, both hosts fence themselves and
    say so; etcd returns: all are ready again."""
    cluster = etcd_cluster
    cluster.extra_env["KOALA_CLUSTER_SECRET"] = "health-test-secret-0123456789"
    pd = cluster.pd(backend=backend)
    hosts = [cluster.host(url(pd), backend) for _ in range(2)]
    assert health(url(pd), "/healthz") == (200, {"status": "alive"})
    assert ready_word(pd) == "ready"
    refused = httpx.post(url(pd) + "/pd/api/v1/membership/fetch_all", timeout=10)
    assert refused.status_code == 401  # the API itself still wants a signature
    for host in hosts:
        assert health(url(host), "/healthz") == (200, {"status": "alive"})
        wait_for(partial(is_ready, host, "ready"), cluster.dump)
    assert hit(hosts[0], "h-1") == 200

    private_etcd.stop()
    wait_for(lambda: ready_word(pd) == "store_unavailable", cluster.dump)
    for host in hosts:  # TTL 2 s: no renewal, then the fence
        wait_for(partial(is_ready, host, "fenced"), cluster.dump)
        assert health(url(host), "/healthz")[0] == 200  # alive all along
    private_etcd.start()
    wait_for(lambda: ready_word(pd) == "ready", cluster.dump)
    for host in hosts:
        wait_for(partial(is_ready, host, "ready"), cluster.dump)
    # and the cluster serves again (once the old placements have expired)
    wait_for(lambda: hit(hosts[1], "h-2") == 200, cluster.dump)
