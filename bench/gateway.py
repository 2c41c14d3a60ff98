"""The gateway beside a bare hypercorn WebSocket echo (the floor), measured in one run.

    python -m bench.gateway [--quick] [--loop asyncio|uvloop|trio]

Each server runs in its own process on the chosen loop: the floor is an ASGI app that
sends every frame back; Koala's is ``koala dev``'s in-process gateway with an echo actor
(first packet checked, each frame a turn of the bound actor, the answer pushed back).
The driver (this process) runs C clients at once, each sending N frames one after the
other and timing each round trip. Reported: messages/s, p50/p99 latency, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import anyio

from koala import ActorBase, HostConfig, Runtime
from koala.gateway import ClientHandler, ClientSession, Gateway, GatewayConfig, LocalLink
from koala.http import serve_asgi
from koala.testing.websocket import KEY, WSClient, connect, first_packet

LOOPS = {
    "asyncio": ("asyncio", {}),
    "uvloop": ("asyncio", {"use_uvloop": True}),
    "trio": ("trio", {}),
}


class BenchEcho(ClientHandler, ActorBase):
    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        await session.push(data)


async def _floor_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (msg := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        msg = await receive()
        if msg["type"] != "websocket.receive":
            return
        key = "text" if msg.get("text") is not None else "bytes"
        await send({"type": "websocket.send", key: msg[key]})


async def _serve(kind: str) -> None:
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        if kind == "floor":
            bound = await tg.start(serve_asgi, _floor_app, "127.0.0.1", 0, shutdown)
            print("READY", bound[1], flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            shutdown.set()
            return
    cfg = GatewayConfig(private_key=KEY, rate=1e6, burst=1_000_000)
    async with Runtime(HostConfig(), [BenchEcho]) as rt, anyio.create_task_group() as tg:
        gateway = Gateway(cfg, LocalLink(rt))
        bound = await tg.start(gateway.serve, "127.0.0.1", 0, shutdown)
        print("READY", bound[1], flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        shutdown.set()


async def _client(port: int, kind: str, index: int, n: int, lat: list[float]) -> None:
    async with connect(("127.0.0.1", port)) as c:
        if kind == "koala":
            await c.send_json(first_packet(actor_type="BenchEcho", actor_id=f"b{index}"))
        await _round_trips(c, n, lat)


async def _round_trips(c: WSClient, n: int, lat: list[float]) -> None:
    payload = "x" * 32
    for _ in range(n):
        t0 = time.perf_counter()
        await c.send(payload)
        got = await c.receive()
        lat.append(time.perf_counter() - t0)
        assert got == payload, got


async def _drive(port: int, kind: str, clients: int, n: int) -> dict[str, float]:
    lat: list[float] = []
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(_client, port, kind, i, n, lat)
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {
        "rate": len(lat) / elapsed,
        "p50": lat[len(lat) // 2] * 1e3,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3,
    }


def _measure(kind: str, loop: str, clients: int, n: int) -> dict[str, float]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gateway", "--serve", kind, "--loop", loop],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"the {kind} server did not start: {line!r}")
        port = int(line.split()[1])
        backend, options = LOOPS[loop]
        anyio.run(
            _drive, port, kind, max(1, clients // 10), 20, backend=backend, backend_options=options
        )  # warm-up
        return anyio.run(_drive, port, kind, clients, n, backend=backend, backend_options=options)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default=os.environ.get("KOALA_BACKEND", "asyncio"), choices=LOOPS)
    parser.add_argument("--serve", choices=["floor", "koala"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        backend, options = LOOPS[args.loop]
        anyio.run(_serve, args.serve, backend=backend, backend_options=options)
        return
    clients, n = (20, 100) if args.quick else (100, 300)
    floor = _measure("floor", args.loop, clients, n)
    koala = _measure("koala", args.loop, clients, n)
    print(f"gateway echo on {args.loop}: {clients} clients x {n} round trips, 32-byte text")
    print(f"  {'':28} {'msgs/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in (("bare hypercorn echo (floor)", floor), ("koala gateway + actor", koala)):
        print(f"  {name:28} {r['rate']:>9,.0f} {r['p50']:>8.2f} {r['p99']:>8.2f}")
    print(f"  ratio koala/floor: {koala['rate'] / floor['rate']:.2f}")


if __name__ == "__main__":
    main()
