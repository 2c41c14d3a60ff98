"""Nodes in separate OS processes calling each other over loopback TCP."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from koala import HostUnavailableError
from koala._proxy import make_proxy
from tests._transport_helpers import SECRET, IAlpha, IEcho, free_port, node, transport_config

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PROMPTLY = 8.0  # a bound far below the calls' deadlines, not a speed claim


def backend_name(anyio_backend: tuple[str, dict[str, object]]) -> str:
    name, options = anyio_backend
    return "uvloop" if options.get("use_uvloop") else name


@asynccontextmanager
async def host_process(
    port: int,
    placements: Mapping[str, str],
    backend: str,
    secret: str | None = None,
) -> AsyncIterator[Process]:
    """``python -m tests._transport_helpers`` listening on ``port``; killed on exit."""
    cmd = [sys.executable, "-m", "tests._transport_helpers", "--listen", f"127.0.0.1:{port}"]
    cmd += ["--backend", backend]
    for actor_type, address in placements.items():
        cmd += ["--place", f"{actor_type}={address}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("KOALA_CLUSTER_SECRET", None)
    if secret:
        env["KOALA_CLUSTER_SECRET"] = secret
    process = await anyio.open_process(cmd, cwd=ROOT, env=env)
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        assert line.startswith(b"READY"), line
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with anyio.CancelScope(shield=True):
            await process.wait()
            await process.aclose()


async def test_two_processes_and_reentrancy_across_them(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    backend = backend_name(anyio_backend)
    p1, p2 = free_port(), free_port()
    a1, a2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    placements = {"Alpha": a1, "Beta": a2, "Echo": a2}
    async with (
        host_process(p1, placements, backend) as proc1,
        host_process(p2, placements, backend) as proc2,
        node(placements) as (rt, transport, _),
    ):
        assert await make_proxy(IEcho, "x", rt).echo("hi") == "hi"
        assert await make_proxy(IEcho, "x", rt).where() == proc2.pid
        # A (process 1) -> B (process 2) -> A again (process 1), one call chain
        pids = await make_proxy(IAlpha, "a", rt).start(1)
        assert pids == [proc1.pid, proc2.pid, proc1.pid]
        assert transport.statistics().connections == 2


async def test_bursts_from_many_callers_arrive_whole(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    # bursts of answers are written in parts while callers and the serving side queue
    # frames of their own (some larger than the socket's buffer): no frame may cut into
    # another, or a call would get a wrong answer, or none at all
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with (
        host_process(port, {}, backend_name(anyio_backend)),
        node({"Echo": address}) as (rt, _, _),
    ):
        done = 0

        async def one(i: int) -> None:
            nonlocal done
            proxy = make_proxy(IEcho, f"e{i}", rt)
            for j in range(200):
                text = f"{i}:{j}:" + "x" * (100_000 if j % 50 == 0 else 20)
                assert await proxy.echo(text) == text
                done += 1

        with anyio.fail_after(30):  # far beyond the time needed, far below the deadline
            async with anyio.create_task_group() as tg:
                for i in range(100):
                    tg.start_soon(one, i)
        assert done == 20_000


async def test_killed_peer_fails_pending_calls_at_once(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with (
        host_process(port, {}, backend_name(anyio_backend)) as proc,
        node({"Echo": address}) as (rt, _, _),
    ):
        echo = make_proxy(IEcho, "x", rt)
        assert await echo.echo("alive") == "alive"
        failure: list[BaseException] = []

        async def pending_call() -> None:
            try:
                await echo.sleep(60.0)
            except HostUnavailableError as exc:
                failure.append(exc)

        with anyio.fail_after(PROMPTLY):  # the call's own deadline is 60 s
            async with anyio.create_task_group() as tg:
                tg.start_soon(pending_call)
                await anyio.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
        assert len(failure) == 1
        with pytest.raises(HostUnavailableError):
            await echo.echo("dead")


async def test_wrong_secret_across_processes(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    wrong = transport_config(secret="not-the-cluster-secret-at-all")
    async with (
        host_process(port, {}, backend_name(anyio_backend), secret=SECRET),
        node({"Echo": address}, config=wrong) as (rt, _, _),
    ):
        with pytest.raises(HostUnavailableError, match="secret"):
            await make_proxy(IEcho, "x", rt).echo("x")
    right = transport_config(secret=SECRET)
    async with (
        host_process(port, {}, backend_name(anyio_backend), secret=SECRET),
        node({"Echo": address}, config=right) as (rt, _, _),
    ):
        assert await make_proxy(IEcho, "x", rt).echo("in") == "in"
