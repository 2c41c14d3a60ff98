"""In-process workloads, each beside its floor measured in the same run.

    python -m bench.inprocess [--quick] [--loop asyncio|uvloop|trio]

1. one caller awaiting one actor, sequential calls/s (a caller without a deadline pays
   the 30 s default's cancel scope; "1b" is the same caller inside `fail_after`);
2. 100 callers on 100 actors, calls/s;
6. activations: 100,000 actors activated with one call each (activations/s), and the
   memory of an idle activation (RSS growth / count, after a GC).

The floor of 1 and 2 is the same work with no framework: two tasks ping-ponging a short
string over anyio memory object streams (`send_nowait` + `await receive()`), one pair
(1) or 100 pairs (2). Every Koala call validates and copies its argument and result.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from abc import abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from koala import ActorBase, ActorInterface, HostConfig, Runtime, get_rpc_proxy


@dataclass
class Row:
    workload: str
    koala: float
    floor: float | None
    unit: str
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return None if not self.floor else self.koala / self.floor


class IEcho(ActorInterface):
    @abstractmethod
    async def echo(self, msg: str) -> str: ...


class Echo(IEcho, ActorBase):
    async def echo(self, msg: str) -> str:
        return msg


# ------------------------------------------------------------------ floors


async def _pingpong_pairs(pairs: int, calls_per_pair: int) -> float:
    """calls/s of `pairs` caller/server task pairs over memory object streams."""

    async def server(rx: MemoryObjectReceiveStream[str], tx: MemoryObjectSendStream[str]) -> None:
        async for msg in rx:
            tx.send_nowait(msg)

    async def caller(tx: MemoryObjectSendStream[str], rx: MemoryObjectReceiveStream[str]) -> None:
        for _ in range(calls_per_pair):
            tx.send_nowait("hello")
            await rx.receive()

    async with anyio.create_task_group() as tg:
        links = []
        for _ in range(pairs):
            to_server, server_rx = anyio.create_memory_object_stream[str](1)
            to_caller, caller_rx = anyio.create_memory_object_stream[str](1)
            tg.start_soon(server, server_rx, to_caller)
            links.append((to_server, caller_rx))
        start = time.perf_counter()
        async with anyio.create_task_group() as callers:
            for tx, rx in links:
                callers.start_soon(caller, tx, rx)
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    return pairs * calls_per_pair / elapsed


# ------------------------------------------------------------------ workloads


async def sequential(n: int, with_deadline: bool) -> float:
    proxy = get_rpc_proxy(IEcho, "1")
    await proxy.echo("warm")
    start = time.perf_counter()
    if with_deadline:
        with anyio.fail_after(3600):
            for _ in range(n):
                await proxy.echo("hello")
    else:
        for _ in range(n):
            await proxy.echo("hello")
    return n / (time.perf_counter() - start)


async def fan(callers: int, per_caller: int) -> float:
    proxies = [get_rpc_proxy(IEcho, f"fan-{i}") for i in range(callers)]
    for p in proxies:
        await p.echo("warm")

    async def run(p: IEcho) -> None:
        for _ in range(per_caller):
            await p.echo("hello")

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for p in proxies:
            tg.start_soon(run, p)
    return callers * per_caller / (time.perf_counter() - start)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


async def activations(count: int, rt: Runtime, quantum: float) -> tuple[float, float]:
    """(activations/s, bytes per idle activation)."""
    gc.collect()
    before = _rss_bytes()
    callers = 100

    async def run(offset: int) -> None:
        for i in range(offset, count, callers):
            await get_rpc_proxy(IEcho, i).echo("x")

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for c in range(callers):
            tg.start_soon(run, c)
    rate = count / (time.perf_counter() - start)
    await anyio.sleep(quantum * 3)  # idle pumps go away: what remains is idle state
    gc.collect()
    assert rt.statistics().activations >= count
    return rate, (_rss_bytes() - before) / count


async def main(quick: bool) -> list[Row]:
    n = 20_000 if quick else 200_000
    fan_calls = 200 if quick else 2_000
    acts = 20_000 if quick else 100_000
    quantum = 0.2
    config = HostConfig(collection_interval=quantum, idle_timeout=3600, max_queued=1_000_000)
    rows: list[Row] = []
    async with Runtime(config, actors=[Echo]) as rt:
        floor1 = await _pingpong_pairs(1, n)
        rows.append(Row("1 in-process sequential", await sequential(n, False), floor1, "calls/s"))
        rows.append(
            Row(
                "1b same, caller under fail_after",
                await sequential(n, True),
                floor1,
                "calls/s",
                "no default-deadline scope per call",
            )
        )
        floor2 = await _pingpong_pairs(100, fan_calls)
        rows.append(
            Row("2 in-process 100 callers/100 actors", await fan(100, fan_calls), floor2, "calls/s")
        )
        rate, per_activation = await activations(acts, rt, quantum)
        rows.append(Row(f"6 activations ({acts:,})", rate, None, "activations/s"))
        rows.append(Row("6 memory per idle activation", per_activation, None, "bytes"))
    return rows


def run(loop: str, quick: bool) -> list[Row]:
    backend = "trio" if loop == "trio" else "asyncio"
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    rows: list[Row] = anyio.run(main, quick, backend=backend, backend_options=options)
    return rows


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    args = parser.parse_args(argv)
    rows = run(args.loop, args.quick)
    if args.json:
        out: list[dict[str, Any]] = [{**asdict(r), "ratio": r.ratio} for r in rows]
        json.dump(out, sys.stdout)
        return
    for r in rows:
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else "-"
        floor = f"{r.floor:,.0f}" if r.floor is not None else "-"
        print(f"{r.workload:42} {r.koala:>12,.0f} {floor:>12} {ratio:>6}  {r.unit} {r.note}")


if __name__ == "__main__":
    cli()
