"""Shutdown of every server Koala runs ends within its graceful timeout, whatever the
clients do (koala.http.serve_asgi; hypercorn issue #308: on Python 3.12+ its asyncio
server waited for every open connection, so one client that never closed kept it up).

The clients here are real sockets that misbehave: a WebSocket client that floods and
never reads (nor answers the close), a request whose headers never end, and a request
whose handler never returns. Run this file on 3.12 or 3.13 too: on 3.11 the old code
passed it by luck of asyncio's ``wait_closed``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import SocketStream, TaskGroup, TaskStatus
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from koala.http import serve_asgi
from koala.testing import free_port

from ._gateway_client import first_packet
from ._gateway_helpers import gateway_config, local_gateway

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
GRACE = 1.0  # the servers' graceful timeout here
# What "soon after" means: far above the few ms a cut takes, far below a hang; the
# point is that the server stops at all (it did not before), not how fast.
MARGIN = 6.0


async def ws_app(scope: Any, receive: Any, send: Any) -> None:
    """Accepts a WebSocket, reads one message, closes it, and returns; an HTTP request
    to /forever is answered never (its handler ignores the disconnect)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["type"] == "websocket":
        await receive()  # connect
        await send({"type": "websocket.accept"})
        await receive()
        await send({"type": "websocket.close", "code": 1008})
        return
    if scope["path"] == "/forever":
        await anyio.sleep(3600)  # reads no disconnect: ends when the server cancels it
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def ws_open(address: tuple[str, int]) -> tuple[SocketStream, WSConnection]:
    stream = await anyio.connect_tcp(*address)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send(ws.send(Request(host=f"{address[0]}:{address[1]}", target="/")))
    with anyio.fail_after(5):
        while True:
            ws.receive_data(await stream.receive())
            if any(isinstance(ev, AcceptConnection) for ev in ws.events()):
                return stream, ws


async def flood(stream: SocketStream, ws: WSConnection, first: str = "hello") -> None:
    """Send frames until cancelled; never read, never close."""
    frame = ws.send(TextMessage(data="x" * 1000))
    await stream.send(ws.send(TextMessage(data=first)))
    try:
        while True:
            await stream.send(frame * 16)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        await anyio.sleep_forever()  # the server cut us: stay quiet, keep the socket


async def misbehave(tg: TaskGroup, address: tuple[str, int], streams: list[SocketStream]) -> None:
    """Start each kind of bad client against ``address``."""
    for _ in range(3):
        stream, ws = await ws_open(address)
        streams.append(stream)
        tg.start_soon(flood, stream, ws)
    slow = await anyio.connect_tcp(*address)
    streams.append(slow)
    await slow.send(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers that never end
    stuck = await anyio.connect_tcp(*address)
    streams.append(stuck)
    await stuck.send(b"GET /forever HTTP/1.1\r\nHost: x\r\n\r\n")
    await anyio.sleep(0.3)  # let the server take them all in


@asynccontextmanager
async def bad_clients() -> AsyncIterator[tuple[TaskGroup, list[SocketStream]]]:
    streams: list[SocketStream] = []
    try:
        async with anyio.create_task_group() as tg:
            try:
                yield tg, streams
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()


async def test_serve_asgi_stops_in_time_whatever_the_clients_do() -> None:
    shutdown = anyio.Event()
    returned = anyio.Event()

    async def serve(*, task_status: TaskStatus[tuple[str, int]]) -> None:
        try:
            await serve_asgi(
                ws_app, "127.0.0.1", 0, shutdown, graceful_timeout=GRACE, task_status=task_status
            )
        finally:
            returned.set()

    async with bad_clients() as (clients, streams), anyio.create_task_group() as tg:
        address = await tg.start(serve)
        await misbehave(clients, address, streams)
        began = time.monotonic()
        shutdown.set()
        with anyio.fail_after(GRACE + MARGIN):
            await returned.wait()
        took = time.monotonic() - began
    assert took < GRACE + MARGIN


async def test_gateway_with_a_flooding_client_stops_in_time() -> None:
    """The issue's case: a gateway closed a flooding client (rate limit), which keeps
    its connection open and sends on; stopping the gateway still ends in time."""
    cfg = gateway_config(rate=1.0, burst=5)
    async with bad_clients() as (clients, streams):
        began = 0.0
        with anyio.fail_after(30 + MARGIN):  # local_gateway's own bound is 10 s
            async with local_gateway(cfg) as (address, gateway, _):
                for n in range(3):
                    stream, ws = await ws_open(address)
                    streams.append(stream)
                    packet = first_packet(actor_type="EchoClient", actor_id=f"flood{n}")
                    clients.start_soon(flood, stream, ws, json.dumps(packet))
                with anyio.fail_after(10):
                    while gateway.statistics().accepted < 3:
                        await anyio.sleep(0.02)
                began = time.monotonic()
        took = time.monotonic() - began
    # close_all's 2 s for the clients to go, then hypercorn's 3 s graceful timeout
    assert took < 2.0 + 3.0 + MARGIN


def test_koala_dev_with_a_flooding_gateway_client_stops_on_sigterm(tmp_path: Path) -> None:
    """`koala dev examples/chat.py --gateway`, a flooding client, SIGTERM: it exits."""
    gw = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), KOALA_BACKEND="asyncio")
    env["KOALA_GATEWAY_KEY"] = "test-gateway-key"
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "koala.cli", "dev", "examples/chat.py"]
        cmd += ["--gateway", f"127.0.0.1:{gw}"]  # chat.py has no HTTP app
        proc = subprocess.Popen(
            [*cmd, "--shutdown-grace", "2"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "koala dev: examples/chat.py on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)

        async def main() -> float:
            async with bad_clients() as (clients, streams):
                await misbehave(clients, ("127.0.0.1", gw), streams)
                began = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                with anyio.fail_after(60):
                    while proc.poll() is None:
                        await anyio.sleep(0.05)
                return time.monotonic() - began

        took = anyio.run(main)
        # close_all's 2 s, then the gateway's 3 s graceful timeout, then the drain's 2 s
        assert took < 2.0 + 3.0 + 2.0 + MARGIN, log.read_text()
        assert proc.returncode == 0, log.read_text()
        assert "koala dev: stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
