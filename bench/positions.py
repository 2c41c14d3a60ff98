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

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.cluster import _b64, _start
from koala.testing import free_port
from koala.testing.etcd import EtcdProcess

ROOT = Path(__file__).resolve().parent.parent
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
    etcd = EtcdProcess()
    etcd.start()
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="koala-bench-positions-"))
    env = dict(os.environ, KOALA_BACKEND=loop, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("KOALA_CLUSTER_SECRET", None)
    koala = [sys.executable, "-m", "koala.cli"]
    prefix = "/koala/placement/"
    try:
        pd_port = free_port()
        pd = [*koala, "pd", "--etcd", etcd.url, "--listen", f"127.0.0.1:{pd_port}"]
        procs.append(_start(pd, tmp / "pd.log", "koala pd: http://", env))
        ports = []
        for n in range(2):
            port = free_port()
            ports.append(port)
            host = [*koala, "host", "bench/_positions_app.py"]
            host += ["--pd", f"http://127.0.0.1:{pd_port}", "--listen", "127.0.0.1:0"]
            host += ["--http", f"127.0.0.1:{port}", "--log-level", "WARNING"]
            procs.append(_start(host, tmp / f"host{n}.log", "koala host: server", env))
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
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except Exception:
                proc.kill()
        etcd.destroy()


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    args = parser.parse_args()
    print(report(args.loop, measure(args.loop, args.quick)), flush=True)


if __name__ == "__main__":
    main()
