"""Rebalancing: the spread of actors after a new host joins a loaded cluster.

    python -m bench.rebalance [--quick] [--loop asyncio|uvloop|trio]

Starts etcd, one `koala pd` and two `koala host` processes (TTL 3 s, so a renewal a
second), then calls actors at random from a pool of N (100 at a time, from inside the
first host); actors idle for 20 s are collected, so the pool churns. Once the two hosts
hold the active actors, a third host joins. Reported every few seconds: activations per
host against their mean; then how long until every host was within 20% of the mean, and
the share of calls that paid a re-placement because a host gave its actor up
(rebalancing) beside the share that paid one because the actor had been collected
(churn). Before the rebalancer, actors re-called after going idle went back to their old
host (positions were never given back) and a new host got none of the old actors.
Targets: within 20% of the mean in 5 minutes, at most 1% of calls re-placed by it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from bench._measure import run_suite
from bench.cluster import BenchCluster

APP = "bench/_rebalance_app.py"


def measure(loop: str, quick: bool) -> dict[str, Any]:
    pool = 10_000 if quick else 100_000
    warm = 20.0 if quick else 60.0
    limit = 90.0 if quick else 300.0
    cluster = BenchCluster(loop)
    try:
        cluster.pd()
        ports = [cluster.host(APP, "--ttl", "3")[0] for _ in range(2)]
        result: dict[str, Any] = {}

        def load() -> None:
            params: dict[str, str | float | int] = {
                "pool": pool,
                "seconds": warm + limit,
                "concurrency": 100,
            }
            url = f"http://127.0.0.1:{ports[0]}/churn"
            result.update(httpx.post(url, params=params, timeout=limit + warm + 120).json())

        def counts() -> list[dict[str, int]]:
            return [httpx.get(f"http://127.0.0.1:{p}/counts", timeout=30).json() for p in ports]

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(warm)
        before = counts()
        ports.append(cluster.host(APP, "--ttl", "3")[0])
        joined = time.monotonic()
        timeline: list[tuple[float, list[int]]] = []
        converged = 0.0
        while thread.is_alive():
            time.sleep(2.0)
            now = [c["activations"] for c in counts()]
            elapsed = time.monotonic() - joined
            timeline.append((elapsed, now))
            mean = sum(now) / len(now)
            if not converged and mean and all(abs(x - mean) <= 0.2 * mean for x in now):
                converged = elapsed
        thread.join()
        after = counts()
        return {
            "pool": pool,
            "calls": result.get("calls", 0),
            "failed": result.get("failed", 0),
            "timeline": timeline,
            "converged": converged,
            "shed": sum(c["shed"] for c in after),
            "activated": sum(a["activated"] for a in after) - sum(b["activated"] for b in before),
        }
    finally:
        cluster.close()


def report(loop: str, r: dict[str, Any]) -> str:
    lines = [f"{loop}: a third host joins two serving a churning pool of {r['pool']:,} actors"]
    for elapsed, now in r["timeline"][:: max(1, len(r["timeline"]) // 8)]:
        mean = sum(now) / len(now)
        spread = " / ".join(f"{x:,}" for x in now)
        lines.append(f"  +{elapsed:5.0f} s  activations {spread}  (mean {mean:,.0f})")
    calls = max(1, r["calls"])
    when = f"{r['converged']:.0f} s" if r["converged"] else "not within the run"
    lines.append(
        f"  every host within 20% of the mean after {when} (target 300 s); "
        f"{r['calls']:,} calls, {r['failed']} failed"
    )
    lines.append(
        f"  re-placed by rebalancing: {r['shed']:,} ({100 * r['shed'] / calls:.2f}% of calls, "
        f"target <= 1%); activations after the join in all: {r['activated']:,} "
        f"({100 * r['activated'] / calls:.2f}% of calls, churn included)"
    )
    return "\n".join(lines)


def main() -> None:
    run_suite(__doc__, measure, report)


if __name__ == "__main__":
    main()
