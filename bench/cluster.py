"""Workload 7: first calls to new actors in a 3-host cluster on etcd.

    python -m bench.cluster [--quick] [--loop asyncio|uvloop|trio]

Starts etcd, one `koala pd` and three `koala host` processes (all on loopback), then
asks one host to make first calls to new actors, 100 at a time: each one asks the PD
for a position (one etcd transaction that creates the key if absent), and activates the
actor on the chosen host. Reported: placements/s and p50/p99 latency of a first call
under that load, and p50/p99 of a first call made alone (one at a time, the cluster
otherwise idle). With 100 callers in a closed loop the mean latency is 100 / rate
(Little's law), so the loaded latency says little beyond the rate; the unloaded one is
what one first call costs.

The floor is the consensus write each placement needs, with nothing around it: the same
create-if-absent transaction, sent straight to etcd's JSON gateway with httpx from 100
concurrent tasks (and from one task, one at a time, beside the unloaded latency).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench._measure import concurrent_calls, run_suite
from koala.testing import free_port
from koala.testing.etcd import EtcdProcess

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 100


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def etcd_floor(url: str, count: int, concurrency: int = CONCURRENCY) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def one(i: int) -> None:
            key = _b64(f"/floor/{time.monotonic_ns()}/{i}")
            body = {
                "compare": [{"key": key, "target": "CREATE", "create_revision": "0"}],
                "success": [{"request_put": {"key": key, "value": _b64("host")}}],
                "failure": [{"request_range": {"key": key}}],
            }
            (await client.post("/v3/kv/txn", json=body)).raise_for_status()

        return await concurrent_calls(count, concurrency, one)


def _start(cmd: list[str], log: Path, ready: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[3]} exited:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{cmd[3]} did not start:\n{log.read_text(errors='replace')}")


class BenchCluster:
    """etcd, one `koala pd` and `koala host` processes on loopback for one benchmark run,
    each writing a log in a temporary folder; ``close()`` stops them all."""

    def __init__(self, loop: str) -> None:
        self.etcd = EtcdProcess()
        self.etcd.start()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="koala-bench-"))
        env = dict(os.environ, KOALA_BACKEND=loop, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env.pop("KOALA_CLUSTER_SECRET", None)
        self.env = env
        self.pd_url = ""

    def pd(self) -> str:
        """Start the PD; its URL."""
        port = free_port()
        cmd = [*_KOALA, "pd", "--etcd", self.etcd.url, "--listen", f"127.0.0.1:{port}"]
        self.procs.append(_start(cmd, self.tmp / "pd.log", "koala pd: http://", self.env))
        self.pd_url = f"http://127.0.0.1:{port}"
        return self.pd_url

    def host(self, app: str, *extra: str) -> tuple[int, subprocess.Popen[bytes]]:
        """Start a host of ``app`` on the PD; its HTTP port and process."""
        port = free_port()
        cmd = [*_KOALA, "host", app, "--pd", self.pd_url, "--listen", "127.0.0.1:0"]
        cmd += ["--http", f"127.0.0.1:{port}", "--log-level", "WARNING", *extra]
        log = self.tmp / f"host-{port}.log"
        proc = _start(cmd, log, "koala host: server", self.env)
        self.procs.append(proc)
        return port, proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.etcd.destroy()


_KOALA = [sys.executable, "-m", "koala.cli"]


def measure(loop: str, quick: bool) -> dict[str, Any]:
    count = 500 if quick else 3000
    alone = 100 if quick else 500
    cluster = BenchCluster(loop)
    try:
        cluster.pd()
        http_ports = [cluster.host("bench/_cluster_app.py")[0] for _ in range(3)]
        url = f"http://127.0.0.1:{http_ports[0]}/first_calls"
        params: dict[str, Any] = {"count": 100, "concurrency": CONCURRENCY, "prefix": "warm"}
        httpx.post(url, params=params, timeout=120).raise_for_status()
        params.update(count=count, prefix="run")
        koala_figures: dict[str, float] = httpx.post(url, params=params, timeout=600).json()
        params.update(count=alone, concurrency=1, prefix="alone")
        unloaded: dict[str, float] = httpx.post(url, params=params, timeout=600).json()
        floor = anyio.run(etcd_floor, cluster.etcd.url, count)
        floor_alone = anyio.run(etcd_floor, cluster.etcd.url, alone, 1)
        return {
            "koala": koala_figures,
            "floor": floor,
            "alone": unloaded,
            "floor_alone": floor_alone,
        }
    finally:
        cluster.close()


def report(loop: str, r: dict[str, Any]) -> str:
    k, f, a, fa = r["koala"], r["floor"], r["alone"], r["floor_alone"]
    return (
        f"{loop}:\n  7 first calls, 3 hosts  koala {k['per_s']:7.0f}/s  p50 {k['p50_ms']:6.1f} ms"
        f"  p99 {k['p99_ms']:6.1f} ms | floor (etcd txn) {f['per_s']:7.0f}/s  "
        f"p50 {f['p50_ms']:5.1f} ms  p99 {f['p99_ms']:5.1f} ms | "
        f"ratio {k['per_s'] / f['per_s']:.2f}\n"
        f"  7 first call alone       koala {a['per_s']:7.0f}/s  p50 {a['p50_ms']:6.1f} ms"
        f"  p99 {a['p99_ms']:6.1f} ms | floor (etcd txn) {fa['per_s']:7.0f}/s  "
        f"p50 {fa['p50_ms']:5.1f} ms  p99 {fa['p99_ms']:5.1f} ms"
    )


def main() -> None:
    run_suite(__doc__, measure, report)


if __name__ == "__main__":
    main()
