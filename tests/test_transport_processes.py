"""Nodes in separate OS processes calling each other over loopback TCP."""

from __future__ import annotations

import os
import signal
import struct
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

from koala import HostUnavailableError, get_rpc_proxy
from koala._tls import CA_ENV, CERT_ENV, KEY_ENV, TLSConfig
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
    tls: TLSConfig | None = None,
) -> AsyncIterator[Process]:
    """``python -m tests._transport_helpers`` listening on ``port``; killed on exit."""
    args = ["--listen", f"127.0.0.1:{port}", "--backend", backend]
    for actor_type, address in placements.items():
        args += ["--place", f"{actor_type}={address}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("KOALA_CLUSTER_SECRET", CERT_ENV, KEY_ENV, CA_ENV):
        env.pop(name, None)
    if secret:
        env["KOALA_CLUSTER_SECRET"] = secret
    if tls is not None:
        for name, path in ((CERT_ENV, tls.cert), (KEY_ENV, tls.key), (CA_ENV, tls.ca)):
            if path is not None:
                env[name] = path
    async with helper_process(args, env, b"READY") as process:
        yield process


@asynccontextmanager
async def helper_process(
    args: list[str], env: Mapping[str, str], ready: bytes
) -> AsyncIterator[Process]:
    """``python -m tests._transport_helpers ARGS`` once its first line starts with
    ``ready``; killed on exit."""
    cmd = [sys.executable, "-m", "tests._transport_helpers", *args]
    process = await anyio.open_process(cmd, cwd=ROOT, env=env)
    try:
        assert process.stdout is not None
        line = b""
        with anyio.fail_after(60):
            while not line.endswith(b"\n"):
                line += await process.stdout.receive(1)
        assert line.startswith(ready), line
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
        assert await get_rpc_proxy(IEcho, "x", runtime=rt).echo("hi") == "hi"
        assert await get_rpc_proxy(IEcho, "x", runtime=rt).where() == proc2.pid
        # A (process 1) -> B (process 2) -> A again (process 1), one call chain
        pids = await get_rpc_proxy(IAlpha, "a", runtime=rt).start(1)
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
            proxy = get_rpc_proxy(IEcho, f"e{i}", runtime=rt)
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
        echo = get_rpc_proxy(IEcho, "x", runtime=rt)
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
            await get_rpc_proxy(IEcho, "x", runtime=rt).echo("x")
    right = transport_config(secret=SECRET)
    async with (
        host_process(port, {}, backend_name(anyio_backend), secret=SECRET),
        node({"Echo": address}, config=right) as (rt, _, _),
    ):
        assert await get_rpc_proxy(IEcho, "x", runtime=rt).echo("in") == "in"


# ---------------------------------------------------------------- bounded before trust


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (its peak) of process ``pid``, in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


MiB = 1024 * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
async def test_oversized_frames_before_the_handshake_do_not_grow_the_host(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    # 128 strangers each announce a 16 MiB frame before HELLO and try to send it; before
    # the handshake the host accepts 4 KiB frames, so it drops each from its prefix
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with host_process(port, {}, backend_name(anyio_backend)) as proc:
        async with node({"Echo": address}) as (rt, _, _):
            assert await get_rpc_proxy(IEcho, "warm", runtime=rt).echo("warm") == "warm"
        before = memory(proc.pid)
        chunk = b"\x00" * 65536
        sent: list[int] = []

        async def stranger() -> None:
            total = 0
            try:
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(struct.pack(">I", 16 * MiB))
                    while total < 16 * MiB:
                        await stream.send(chunk)
                        total += len(chunk)
            except (anyio.BrokenResourceError, anyio.EndOfStream, OSError):
                pass
            sent.append(total)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(128):
                    tg.start_soon(stranger)
        after = memory(proc.pid)
        assert len(sent) == 128  # each was cut off, or sent all (into the kernel's buffers)
        peak = after["VmHWM"] - before["VmRSS"]
        assert peak < 64 * MiB, (before, after)
        async with node({"Echo": address}) as (rt, t, _):  # a real peer still gets in
            assert await get_rpc_proxy(IEcho, "after").echo("after") == "after"
            assert t.statistics().connects == 1


@asynccontextmanager
async def flood(address: str, count: int) -> AsyncIterator[list[str]]:
    """An attacker's process keeping ``count`` idle strangers on the host at ``address``;
    on exit, the lines it printed (``REOPENED n``: how many the host dropped)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = ["--flood", address, "--count", str(count)]
    async with helper_process(args, env, b"FLOODING") as process:
        assert process.stdin is not None
        assert process.stdout is not None
        said: list[str] = []
        yield said
        await process.stdin.aclose()
        with anyio.fail_after(30):
            rest = b""
            async for data in process.stdout:
                rest += data
        said.extend(rest.decode().splitlines())


async def test_a_flood_of_strangers_keeps_no_peer_out(
    anyio_backend: tuple[str, dict[str, object]],
) -> None:
    # 1,100 idle connections, renewed as fast as the host drops them, against a host
    # holding 64 strangers: new peers still connect and call, and a proven peer's
    # connection is never the one dropped
    port = free_port()
    address = f"127.0.0.1:{port}"
    async with (
        host_process(port, {}, backend_name(anyio_backend)),
        node({"Echo": address}) as (rt0, t0, _),
    ):
        assert await get_rpc_proxy(IEcho, "proven").echo("proven") == "proven"
        async with flood(address, 1100) as said:
            for i in range(12):
                async with node({"Echo": address}) as (rt, _, _):
                    with anyio.fail_after(3 * PROMPTLY):  # 1,100 strangers share the CPU
                        while True:
                            try:
                                text = await get_rpc_proxy(IEcho, f"new{i}", runtime=rt).echo("in")
                                break
                            except HostUnavailableError:  # displaced mid-handshake
                                await anyio.sleep(0.05)
                    assert text == "in"
            assert await get_rpc_proxy(IEcho, "proven", runtime=rt0).echo("kept") == "kept"
            assert t0.statistics().connects == 1  # its connection was never dropped
        reopened = [int(line.split()[1]) for line in said if line.startswith("REOPENED")]
        assert len(reopened) == 1
        assert reopened[0] > 0  # the host dropped strangers to make room
