"""Cross-process echo calls through Koala's transport, beside the bare-stream floor.

``python -m bench.transport [--quick] [--backend asyncio|uvloop|trio]``

For each backend, a server process and this process measure:

- floor: a 4-byte length + CBOR echo over bare anyio TCP streams (one request at a time,
  then a window of 100 in flight on one connection);
- koala: ``await proxy.echo(text)`` on an actor in the other process (one at a time,
  then 100 tasks calling at once over the node's one connection).

Each Koala figure is printed beside its floor, measured in the same run, with the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import cbor2
from anyio.abc import SocketStream

from koala import LOCAL, ActorBase, ActorInterface, HostConfig, Key, Runtime, get_rpc_proxy
from koala.transport import Transport, TransportConfig

HEADER = struct.Struct(">I")
BACKENDS = ("asyncio", "uvloop", "trio")


class IBenchEcho(ActorInterface):
    @abstractmethod
    async def echo(self, text: str) -> str: ...


class BenchEcho(IBenchEcho, ActorBase):
    async def echo(self, text: str) -> str:
        return text


class _Directory:
    def __init__(self, address: str) -> None:
        self.address = address

    def lookup(self, actor_type: str, key: Key) -> str | None:
        return self.address

    async def resolve(self, actor_type: str, key: Key) -> str:
        return self.address

    def forget(self, actor_type: str, key: Key) -> None:
        pass

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return False

    def released(self, actor_type: str, key: Key) -> None:
        pass


def _run(func: Callable[..., Awaitable[Any]], backend: str, *args: Any) -> Any:
    name = "trio" if backend == "trio" else "asyncio"
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    return anyio.run(func, *args, backend=name, backend_options=options)


# ---------------------------------------------------------------- servers (other process)


async def _read_frame(stream: SocketStream, buf: bytearray) -> bytes:
    while True:
        if len(buf) >= 4:
            (size,) = HEADER.unpack_from(buf)
            if len(buf) >= 4 + size:
                body = bytes(buf[4 : 4 + size])
                del buf[: 4 + size]
                return body
        buf += await stream.receive(65536)


async def _floor_connection(stream: SocketStream) -> None:
    buf = bytearray()
    async with stream:
        try:
            while True:
                while len(buf) < 4 or len(buf) < 4 + HEADER.unpack_from(buf)[0]:
                    buf += await stream.receive(65536)
                out = []
                while len(buf) >= 4 and len(buf) >= 4 + HEADER.unpack_from(buf)[0]:
                    size = HEADER.unpack_from(buf)[0]
                    body = cbor2.dumps(cbor2.loads(bytes(buf[4 : 4 + size])))
                    del buf[: 4 + size]
                    out.append(HEADER.pack(len(body)) + body)
                await stream.send(b"".join(out))
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            pass


async def _serve_floor() -> None:
    async with await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0) as lst:
        port = lst.extra(anyio.abc.SocketAttribute.local_port)
        print("READY", port, flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(lst.serve, _floor_connection)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            tg.cancel_scope.cancel()


class _Callers:
    """The server's directory: ChainA lives in whichever client dialled us."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def lookup(self, actor_type: str, key: Key) -> str | None:
        if actor_type != "ChainA":
            return LOCAL
        peers = self.transport.peers()
        return peers[0] if peers else None

    async def resolve(self, actor_type: str, key: Key) -> str:
        found = self.lookup(actor_type, key)
        if found is None:
            raise LookupError("no client is connected")
        return found

    def forget(self, actor_type: str, key: Key) -> None:
        pass

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return False

    def released(self, actor_type: str, key: Key) -> None:
        pass


async def _serve_koala() -> None:
    config = TransportConfig(node_id="bench-server")
    async with Transport(config) as transport:
        rt = Runtime(
            HostConfig(), [BenchEcho, ChainB], directory=_Callers(transport), remote=transport
        )
        async with rt:
            transport.handler = rt.serve_request
            address = await transport.listen("127.0.0.1", 0)
            print("READY", address.rpartition(":")[2], flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


# ---------------------------------------------------------------- clients (this process)


def _rates(latencies: list[float], elapsed: float) -> dict[str, float]:
    latencies.sort()
    return {
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
    }


CONCURRENCY = (1, 10, 100, 1000)


async def _floor_window(
    stream: SocketStream, buf: bytearray, window: int, total: int, request: Callable[[int], bytes]
) -> float:
    """calls/s with `window` requests outstanding on one connection."""
    start = time.perf_counter()
    await stream.send(b"".join(request(i) for i in range(min(window, total))))
    sent, received = min(window, total), 0
    while received < total:
        cbor2.loads(await _read_frame(stream, buf))
        received += 1
        if sent < total:
            await stream.send(request(sent))
            sent += 1
    return total / (time.perf_counter() - start)


async def _floor_client(port: int, n_seq: int, n_conc: int) -> dict[str, Any]:
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        buf = bytearray()

        def request(i: int) -> bytes:
            body = cbor2.dumps([10, i, "IBenchEcho", "echo", ["hello"]])
            return HEADER.pack(len(body)) + body

        for i in range(200):  # warm up
            await stream.send(request(i))
            await _read_frame(stream, buf)
        latencies = []
        start = time.perf_counter()
        for i in range(n_seq):
            t0 = time.perf_counter()
            await stream.send(request(i))
            cbor2.loads(await _read_frame(stream, buf))
            latencies.append(time.perf_counter() - t0)
        seq = _rates(latencies, time.perf_counter() - start)
        sweep = {c: await _floor_window(stream, buf, c, n_conc, request) for c in CONCURRENCY}
    return {"sequential": seq, "concurrent": {"calls_per_s": sweep[100]}, "sweep": sweep}


class IChainA(ActorInterface):
    @abstractmethod
    async def start(self, n: int) -> int: ...

    @abstractmethod
    async def back(self, n: int) -> int: ...


class IChainB(ActorInterface):
    @abstractmethod
    async def bounce(self, n: int) -> int: ...


class ChainA(IChainA, ActorBase):
    """Lives in the client process: start -> B (server) -> back (here, same chain)."""

    async def start(self, n: int) -> int:
        return await self.get_proxy(IChainB, self.key).bounce(n)

    async def back(self, n: int) -> int:
        return n + 1


class ChainB(IChainB, ActorBase):
    async def bounce(self, n: int) -> int:
        return await self.get_proxy(IChainA, self.key).back(n)


class _Split:
    """Actor types listed in `here` are local; the rest live at `there`."""

    def __init__(self, here: set[str], there: str) -> None:
        self.here, self.there = here, there

    def lookup(self, actor_type: str, key: Key) -> str | None:
        return LOCAL if actor_type in self.here else self.there

    async def resolve(self, actor_type: str, key: Key) -> str:
        return LOCAL if actor_type in self.here else self.there

    def forget(self, actor_type: str, key: Key) -> None:
        pass

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return False

    def released(self, actor_type: str, key: Key) -> None:
        pass


async def _koala_client(port: int, n_seq: int, n_conc: int) -> dict[str, Any]:
    address = f"127.0.0.1:{port}"
    directory = _Split({"ChainA"}, address)
    async with Transport(TransportConfig(node_id="bench-client")) as transport:
        rt = Runtime(HostConfig(), [BenchEcho, ChainA], directory=directory, remote=transport)
        async with rt:
            transport.handler = rt.serve_request
            await transport.listen("127.0.0.1", 0)
            proxy = get_rpc_proxy(IBenchEcho, "bench", runtime=rt)
            for _ in range(200):
                await proxy.echo("hello")
            latencies = []
            start = time.perf_counter()
            for _ in range(n_seq):
                t0 = time.perf_counter()
                await proxy.echo("hello")
                latencies.append(time.perf_counter() - t0)
            seq = _rates(latencies, time.perf_counter() - start)

            async def worker(actor: int, count: int) -> None:
                p = get_rpc_proxy(IBenchEcho, actor, runtime=rt)
                for _ in range(count):
                    await p.echo("hello")

            sweep: dict[int, float] = {}
            for callers in CONCURRENCY:  # workload 5: callers on as many actors
                per = max(1, n_conc // callers)
                start = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in range(callers):
                        tg.start_soon(worker, i, per)
                sweep[callers] = per * callers / (time.perf_counter() - start)

            chain = get_rpc_proxy(IChainA, "chain", runtime=rt)  # workload 8: A -> B -> A
            await chain.start(0)
            start = time.perf_counter()
            for i in range(n_seq // 2):
                await chain.start(i)
            chains = (n_seq // 2) / (time.perf_counter() - start)
    return {
        "sequential": seq,
        "concurrent": {"calls_per_s": sweep[100]},
        "sweep": sweep,
        "chain": chains,
    }


def _with_server(
    mode: str, backend: str, client: Callable[[int], Any], module: str = "bench.transport"
) -> Any:
    """Start ``python -m module --serve mode --backend backend``, wait for its READY
    line, and return ``client(port)``; the server stops when its stdin closes."""
    cmd = [sys.executable, "-m", module, "--serve", mode, "--backend", backend]
    env = dict(os.environ)
    env.pop("KOALA_CLUSTER_SECRET", None)
    with subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdin is not None
        try:
            line = proc.stdout.readline().split()
            if not line or line[0] != "READY":
                raise RuntimeError(f"the {mode} server did not start: {line!r}")
            return client(int(line[1]))
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def measure(backend: str, quick: bool) -> dict[str, Any]:
    n_seq, n_conc = (1_000, 5_000) if quick else (5_000, 50_000)
    floor = _with_server(
        "floor", backend, lambda port: _run(_floor_client, backend, port, n_seq, n_conc)
    )
    koala = _with_server(
        "koala", backend, lambda port: _run(_koala_client, backend, port, n_seq, n_conc)
    )
    return {"floor": floor, "koala": koala}


def report(backend: str, r: dict[str, Any]) -> str:
    fs, ks = r["floor"]["sequential"], r["koala"]["sequential"]
    fsweep, ksweep = r["floor"]["sweep"], r["koala"]["sweep"]
    lines = [
        f"{backend}:",
        f"  3 sequential          koala {ks['calls_per_s']:8.0f}/s  p50 {ks['p50_us']:5.0f} us  "
        f"p99 {ks['p99_us']:5.0f} us | floor {fs['calls_per_s']:8.0f}/s  "
        f"p50 {fs['p50_us']:5.0f} us  p99 {fs['p99_us']:5.0f} us | "
        f"ratio {ks['calls_per_s'] / fs['calls_per_s']:.2f}",
    ]
    for c in CONCURRENCY:
        label = f"{4 if c == 100 else 5} {c} callers/actors"
        lines.append(
            f"  {label:21} koala {ksweep[c]:8.0f}/s{'':31}| floor {fsweep[c]:8.0f}/s "
            f"({c} in flight){'':>{14 - len(str(c))}}| ratio {ksweep[c] / fsweep[c]:.2f}"
        )
    chain_floor = fs["calls_per_s"] / 2  # a chain is two sequential remote hops
    lines.append(
        f"  8 A->B->A chains      koala {r['koala']['chain']:8.0f}/s{'':31}| floor "
        f"{chain_floor:8.0f}/s (2 hops){'':10}| ratio {r['koala']['chain'] / chain_floor:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    parser.add_argument("--backend", choices=BACKENDS, action="append")
    parser.add_argument("--serve", choices=("floor", "koala"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.serve:
        backend = (args.backend or ["asyncio"])[0]
        _run(_serve_floor if args.serve == "floor" else _serve_koala, backend)
        return
    print(f"cross-process echo over loopback TCP ({os.cpu_count()} cores)")
    results = {}
    for backend in args.backend or BACKENDS:
        results[backend] = measure(backend, args.quick)
        print(report(backend, results[backend]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
