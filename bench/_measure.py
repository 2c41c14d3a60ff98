"""Shared by the benchmarks: run N concurrent callers over a count of operations."""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


async def concurrent_calls(
    count: int, concurrency: int, one: Callable[[int], Awaitable[object]]
) -> dict[str, float]:
    """Run ``one(i)`` for i in range(count) from ``concurrency`` tasks; rate and latency."""
    latencies: list[float] = []
    todo = iter(range(count))

    async def caller() -> None:
        for i in todo:
            t0 = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(caller)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "per_s": count / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1e3,
    }


def run_suite(
    doc: str | None,
    measure: Callable[[str, bool], dict[str, Any]],
    report: Callable[[str, dict[str, Any]], str],
) -> None:
    """The command line of a cluster suite: ``--quick`` and ``--loop``, then the report
    of one measurement."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    args = parser.parse_args()
    print(report(args.loop, measure(args.loop, args.quick)), flush=True)
