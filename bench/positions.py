"""etcd holds live actors only: keys in etcd against live activations, before and after
the actors are collected.

    python -m bench.positions [--quick] [--loop asyncio|uvloop|trio]

Starts etcd, one `koala pd` and two `koala host` processes (loopback), calls N new
actors once each (100 at a time, from inside a host), then lets them be collected (an
idle timeout of 2 s). Reported: placement keys in etcd and live activations after the
calls and after the collection, how long the positions took to be given back and at what
rate, and etcd's database size at each point. The comparison is what Koala did before
positions were released: every actor ever placed kept its key (N keys, about 197 B of
database each) until its host's lease ended; the target is keys = live activations.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from bench._measure import run_suite
from bench.cluster import BenchCluster, _b64

OLD_BYTES_PER_KEY = 197  # measured on etcd 3.4 before positions were released


def _keys(etcd: str, prefix: str) -> int:
    body = {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + chr(ord(prefix[-1]) + 1))}
    body["count_only"] = True  # type: ignore[assignment]
    data = httpx.post(f"{etcd}/v3/kv/range", json=body, timeout=30).json()
    return int(data.get("count", 0))


def _db_size(etcd: str) -> int:
    data = httpx.post(f"{etcd}/v3/maintenance/status", json={}, timeout=30).json()
    return int(data.get("dbSize", 0))


def measure(loop: str, quick: bool) -> dict[str, Any]:
    count = 5_000 if quick else 100_000
    cluster = BenchCluster(loop)
    etcd = cluster.etcd
    prefix = "/koala/placement/"
    try:
        cluster.pd()
        ports = [cluster.host("bench/_positions_app.py")[0] for _ in range(2)]
        db_start = _db_size(etcd.url)
        url = f"http://127.0.0.1:{ports[0]}/visit"
        params: dict[str, str | int] = {"count": count, "concurrency": 100, "prefix": "once"}
        calls = httpx.post(url, params=params, timeout=1800).json()

        def counts() -> list[dict[str, int]]:
            return [httpx.get(f"http://127.0.0.1:{p}/counts", timeout=30).json() for p in ports]

        after_calls = {"keys": _keys(etcd.url, prefix), "db": _db_size(etcd.url)}
        after_calls["live"] = sum(c["activations"] for c in counts())
        started = time.monotonic()
        first_release = 0.0
        while True:
            c = counts()
            live = sum(x["activations"] for x in c)
            keys = _keys(etcd.url, prefix)
            if keys < after_calls["keys"] and not first_release:
                first_release = time.monotonic()
            if live == 0 and keys == 0:
                break
            if time.monotonic() - started > 600:
                break
            time.sleep(0.2)
        done = time.monotonic()
        return {
            "count": count,
            "calls": calls,
            "after_calls": after_calls,
            "after": {"keys": keys, "live": live, "db": _db_size(etcd.url)},
            "db_start": db_start,
            "collect_s": done - started,
            "release_s": done - (first_release or done),
            "releases": sum(x["releases"] for x in c),
            "batches": sum(x["release_batches"] for x in c),
        }
    finally:
        cluster.close()


def report(loop: str, r: dict[str, Any]) -> str:
    n, a, z = r["count"], r["after_calls"], r["after"]
    rate = r["releases"] / r["release_s"] if r["release_s"] else 0.0
    return (
        f"{loop}: {n:,} actors called once ({r['calls']['per_s']:,.0f} first calls/s)\n"
        f"  after the calls      keys {a['keys']:>9,}  live {a['live']:>9,}  "
        f"etcd db {a['db'] / 1e6:7.1f} MB\n"
        f"  after collection     keys {z['keys']:>9,}  live {z['live']:>9,}  "
        f"etcd db {z['db'] / 1e6:7.1f} MB (freed pages are reused; compaction reclaims)\n"
        f"  before this change   keys {n:>9,}  live {0:>9,}  "
        f"(~{n * OLD_BYTES_PER_KEY / 1e6:.1f} MB of keys kept until the lease ends)\n"
        f"  target keys = live: {'met' if z['keys'] == z['live'] else 'MISSED'}; "
        f"{r['releases']:,} positions given back in {r['batches']:,} requests, "
        f"{rate:,.0f}/s once collection began ({r['collect_s']:.1f} s from the end of the calls)"
    )


def main() -> None:
    run_suite(__doc__, measure, report)


if __name__ == "__main__":
    main()
