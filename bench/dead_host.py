"""A dead host does not stall the others: placement latency on the surviving hosts while
a host holding N positions dies.

    python -m bench.dead_host [--quick] [--loop asyncio|uvloop|trio]

Starts etcd, one `koala pd` and a host alone, places N actors on it (they stay active),
then starts two more hosts. One of them makes first calls to new actors from 10 tasks
for the rest of the run while the loaded host is SIGKILLed: its lease expires after the
TTL (8 s) and etcd deletes its N positions. Reported: the survivors' first-call latency
(p50, p99, max) before the kill and in the seconds after it, once with the positions on
one lease (how Koala kept them before) and once spread over position leases of 4,096
keys (the default). A first call the PD placed on the dead host before its lease ran out
fails fast; those are counted apart. The target is p99 under 50 ms while the host dies.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from typing import Any

import httpx

from bench.cluster import BenchCluster

TTL = 8  # short, so the lease expires soon after the kill; not so short that a host
# placing hundreds of thousands of actors at once misses a renewal and fences itself
BEFORE = 3.0  # seconds of probe before the kill
AFTER = TTL + 9.0  # and after it


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def measure(loop: str, count: int, per_lease: int, rate: float = 0.0) -> dict[str, Any]:
    cluster = BenchCluster(loop)
    flags = ("--ttl", str(TTL), "--positions-per-lease", str(per_lease))
    app = "bench/_cluster_app.py"
    try:
        cluster.pd()
        heavy_port, heavy = cluster.host(app, *flags)
        placed = time.monotonic()
        httpx.post(
            f"http://127.0.0.1:{heavy_port}/first_calls",
            params={"count": count, "concurrency": 100, "prefix": "heavy"},
            timeout=3600,
        ).raise_for_status()
        placed = time.monotonic() - placed
        time.sleep(2 * TTL)  # a renewal or two: the host asks for its position leases
        ports = [cluster.host(app, *flags)[0] for _ in range(2)]
        result: dict[str, Any] = {}

        def run_probe() -> None:
            params: dict[str, str | float | int] = {
                "prefix": "probe",
                "seconds": BEFORE + AFTER,
                "concurrency": 10 if not rate else 100,
                "rate": rate,
            }
            url = f"http://127.0.0.1:{ports[0]}/probe"
            result.update(httpx.post(url, params=params, timeout=600).json())

        thread = threading.Thread(target=run_probe)
        thread.start()
        time.sleep(BEFORE)
        heavy.send_signal(signal.SIGKILL)
        heavy.wait()
        thread.join()
        samples: list[tuple[float, float]] = result["samples"]
        before = [ms for t, ms in samples if t < BEFORE]
        after = [ms for t, ms in samples if t >= BEFORE]
        return {
            "count": count,
            "rate": rate,
            "per_lease": per_lease,
            "place_s": placed,
            "before": before,
            "after": after,
            "errors": len(result["errors"]),
        }
    finally:
        cluster.close()


def report(loop: str, runs: list[dict[str, Any]]) -> str:
    lines = [f"{loop}: first calls on the survivors while a host holding positions dies"]
    for r in runs:
        how = "one lease" if not r["per_lease"] else f"leases of {r['per_lease']:,} keys"
        how += f", {r['rate']:g}/s paced" if r["rate"] else ", 10 callers"
        b, a = r["before"], r["after"]
        lines.append(
            f"  {r['count']:>9,} positions, {how:22} before p50 {_pct(b, 0.5):6.1f} p99 "
            f"{_pct(b, 0.99):7.1f} ms | after the kill p50 {_pct(a, 0.5):6.1f} p99 "
            f"{_pct(a, 0.99):7.1f} max {max(a, default=0):7.1f} ms | "
            f"{r['errors']} fast failures (placed on the dead host)"
        )
    last = runs[-1]["after"]
    lines.append(f"  target p99 < 50 ms with position leases: {_pct(last, 0.99):.1f} ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--count", type=int, default=0, help="positions on the host that dies")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="first calls per second, paced (an open loop); default: 10 callers back to back, "
        "which keeps the PD saturated",
    )
    args = parser.parse_args()
    count = args.count or (20_000 if args.quick else 200_000)
    runs = [measure(args.loop, count, per_lease, args.rate) for per_lease in (0, 4096)]
    print(report(args.loop, runs), flush=True)


if __name__ == "__main__":
    main()
