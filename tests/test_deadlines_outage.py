"""Deadlines hold in every outage (issue 12), with real processes: etcd down longer than
the hosts' TTL, a peer frozen (SIGSTOP: it neither answers nor closes), the PD killed.
Every call made meanwhile answers (an error is fine) within its deadline plus a slack:
docs/design.md promises 100 ms; the bound here is wider for a loaded 2-core machine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests._cluster import Cluster, Proc, cluster_of, double_activations, stats, url
from tests._etcd import EtcdProcess, private_etcd

__all__ = ["private_etcd"]

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEADLINE = 2.0  # the hosts' default timeout, and the routes' own deadline
SLACK = 0.6  # measured at the HTTP client: the 100 ms promise, plus HTTP and a busy box
BACKENDS = ["asyncio", "trio"]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The test process only drives HTTP; the cluster processes run the backend under test."""
    return ("asyncio", {})


@pytest.fixture
def cluster(tmp_path: Path, private_etcd: EtcdProcess) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path, private_etcd.url, "outage")


async def timed(client: httpx.AsyncClient, path: str) -> tuple[float, int]:
    """(seconds until the answer, HTTP status) of one GET."""
    start = time.monotonic()
    resp = await client.get(path)
    return time.monotonic() - start, resp.status_code


async def storm(
    client: httpx.AsyncClient, paths: list[str], seconds: float
) -> list[tuple[float, int, str]]:
    """Call every path over and over, concurrently, for ``seconds``; every answer."""
    answers: list[tuple[float, int, str]] = []
    end = time.monotonic() + seconds

    async def one(path: str) -> None:
        while time.monotonic() < end:
            took, status = await timed(client, path)
            answers.append((took, status, path))
            if status == 200:
                await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        for path in paths:
            tg.start_soon(one, path)
    return answers


def late(answers: list[tuple[float, int, str]]) -> list[tuple[float, int, str]]:
    slowest = max(answers, default=(0.0, 0, ""))
    print(f"{len(answers)} answers, the slowest {slowest[0]:.3f} s ({slowest[1]} {slowest[2]})")
    return [a for a in answers if a[0] > DEADLINE + SLACK]


def paths(host: Proc, keys: list[str]) -> list[str]:
    """Each key through the default timeout and through the route's own deadline."""
    base = url(host)
    return [f"{base}/hit/{k}" for k in keys] + [f"{base}/within/{DEADLINE}/{k}" for k in keys]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_call_answers_late_while_etcd_is_down(
    cluster: Cluster, private_etcd: EtcdProcess, backend: str
) -> None:
    """etcd down for longer than the TTL (2 s): the hosts fence, placements cannot be
    made; calls to placed and unplaced actors alike answer within their deadline."""
    pd = cluster.pd(backend=backend)
    a = cluster.host(url(pd), backend, ttl=2, default_timeout=DEADLINE)
    b = cluster.host(url(pd), backend, ttl=2, default_timeout=DEADLINE)
    async with httpx.AsyncClient(timeout=30) as client:
        placed = [f"placed-{i}" for i in range(6)]
        for key in placed:
            assert (await client.get(f"{url(a)}/hit/{key}")).status_code == 200
        private_etcd.stop()
        unplaced = [f"unplaced-{i}" for i in range(6)]
        answers = await storm(client, paths(a, placed + unplaced) + paths(b, unplaced), 5.0)
        assert answers
        assert late(answers) == [], sorted(answers, reverse=True)[:5]
        assert any(status != 200 for _, status, _ in answers)  # the outage was felt
        private_etcd.start()
    assert double_activations(cluster.event_lines()) == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_call_answers_late_to_a_frozen_peer(cluster: Cluster, backend: str) -> None:
    """A host stops (SIGSTOP) with actors placed on it: calls to them from the other host
    end at their deadline, whether the connection is open or must be dialed."""
    pd = cluster.pd(backend=backend)
    a = cluster.host(url(pd), backend, ttl=30, default_timeout=DEADLINE)
    b = cluster.host(url(pd), backend, ttl=30, default_timeout=DEADLINE)
    async with httpx.AsyncClient(timeout=30) as client:
        on_b: list[str] = []
        for i in range(60):
            resp = await client.get(f"{url(b)}/hit/frozen-{i}")
            assert resp.status_code == 200
            if resp.json()[0] == b.pid:
                on_b.append(f"frozen-{i}")
        assert on_b
        for key in on_b[:3]:  # through a: a has the connection to b open, and the positions
            assert (await client.get(f"{url(a)}/hit/{key}")).status_code == 200
        assert b.popen is not None
        os.kill(b.popen.pid, signal.SIGSTOP)
        try:
            answers = await storm(client, paths(a, on_b[:6]), 5.0)
        finally:
            os.kill(b.popen.pid, signal.SIGCONT)
        assert answers
        assert late(answers) == [], sorted(answers, reverse=True)[:5]
        assert all(status != 200 for _, status, _ in answers)  # b could not have answered


@pytest.mark.parametrize("backend", BACKENDS)
async def test_no_call_answers_late_while_the_pd_is_down(cluster: Cluster, backend: str) -> None:
    """The PD killed: unplaced actors cannot be placed; their calls end in time."""
    pd = cluster.pd(backend=backend)
    a = cluster.host(url(pd), backend, ttl=30, default_timeout=DEADLINE)
    async with httpx.AsyncClient(timeout=30) as client:
        assert (await client.get(f"{url(a)}/hit/before")).status_code == 200
        pd.kill()
        answers = await storm(client, paths(a, ["before", "after-1", "after-2"]), 3.0)
        assert late(answers) == [], sorted(answers, reverse=True)[:5]
        assert {s for _, s, p in answers if "/before" in p} == {200}  # cached: served
        assert stats(a)["serving"]
