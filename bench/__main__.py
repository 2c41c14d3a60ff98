"""`make bench`: every benchmark, each figure beside the floor measured in the same run.

    python -m bench [--quick] [--loop asyncio|uvloop|trio ...] [--skip storage ...]

Runs, per event-loop backend, the in-process workloads (bench.inprocess), the
cross-process ones (bench.transport), storage (bench.storage), placement on a 3-host
etcd cluster (bench.cluster), positions given back (bench.positions), placement while a
loaded host dies (bench.dead_host), the spread after a host joins (bench.rebalance), the
WebSocket gateway (bench.gateway), a host with a million actors (bench.scale) and what
tracing costs, off and on (bench.tracing), each suite in its own process so one does
not warm or bloat another; then draws docs/throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

LOOPS = ("asyncio", "uvloop", "trio")
RESULTS = Path("bench/results")


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, check=False, timeout=1800
    )


def inprocess(loop: str, quick: bool) -> str:
    args = ["bench.inprocess", "--loop", loop, "--json"] + (["--quick"] if quick else [])
    proc = _python(*args)
    if proc.returncode:
        return f"  in-process suite failed:\n{proc.stderr}"
    rows: list[dict[str, Any]] = json.loads(proc.stdout)
    lines = [f"  {'workload':42} {'koala':>12} {'floor':>12} {'ratio':>6}  unit"]
    for r in rows:
        floor = f"{r['floor']:,.0f}" if r["floor"] else "-"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        lines.append(
            f"  {r['workload']:42} {r['koala']:>12,.0f} {floor:>12} {ratio:>6}  {r['unit']}"
        )
    return "\n".join(lines)


def passthrough(module: str, loop: str, quick: bool, flag: str, *extra: str) -> str:
    proc = _python(module, flag, loop, *(["--quick"] if quick else []), *extra)
    out = proc.stdout.strip() or proc.stderr.strip()
    return "\n".join("  " + line for line in out.splitlines())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations: a smoke run")
    parser.add_argument("--loop", action="append", choices=LOOPS)
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=[
            "transport",
            "storage",
            "cluster",
            "positions",
            "dead_host",
            "rebalance",
            "gateway",
            "scale",
            "tracing",
        ],
    )
    args = parser.parse_args()
    print(f"Koala benchmarks on {os.cpu_count()} cores; figures beside floors from the same run")
    RESULTS.mkdir(exist_ok=True)
    sweeps = []
    for loop in args.loop or LOOPS:
        print(f"\n=== {loop}")
        print(inprocess(loop, args.quick), flush=True)
        if "transport" not in args.skip:
            sweep = RESULTS / f"transport-{loop}.json"
            out = passthrough(
                "bench.transport", loop, args.quick, "--backend", "--json", str(sweep)
            )
            print(out, flush=True)
            sweeps.append(str(sweep))
        if "storage" not in args.skip:
            print(passthrough("bench.storage", loop, args.quick, "--loop"), flush=True)
        if "cluster" not in args.skip:
            print(passthrough("bench.cluster", loop, args.quick, "--loop"), flush=True)
        if "positions" not in args.skip:
            print(passthrough("bench.positions", loop, args.quick, "--loop"), flush=True)
        if "dead_host" not in args.skip:
            print(passthrough("bench.dead_host", loop, args.quick, "--loop"), flush=True)
        if "rebalance" not in args.skip:
            print(passthrough("bench.rebalance", loop, args.quick, "--loop"), flush=True)
        if "gateway" not in args.skip:
            print(passthrough("bench.gateway", loop, args.quick, "--loop"), flush=True)
        if "scale" not in args.skip:
            print(passthrough("bench.scale", loop, args.quick, "--loop"), flush=True)
        if "tracing" not in args.skip:
            print(passthrough("bench.tracing", loop, args.quick, "--loop"), flush=True)
    if sweeps:
        proc = _python("bench.chart", *sweeps, "-o", "docs/throughput.png")
        print(proc.stdout.strip() or f"chart not drawn (pip install 'koala[bench]'): {proc.stderr}")


if __name__ == "__main__":
    main()
