"""etcd under a soak of renewals and churn: its database size over time, before and now.

    python -m bench.etcd_soak [--quick] [--loop asyncio|uvloop|trio] [--renewals N] [--json]

Two runs of the same workload, each on a fresh private etcd (``koala.testing.etcd``),
driving a ``PlacementDriver`` over ``EtcdStore`` in this process (no HTTP: the store
is what is measured). ``hosts`` hosts renew their leases round-robin from a few tasks;
every ``churn`` renewals one host leaves (its lease revoked, its positions with it), a
new one registers, and a batch of new actors is placed.

- ``before``: each renewal also rewrites the host record, as the PD did until now
  (read, then compare-and-swap the record with the new load), and nothing compacts.
- ``now``: a renewal is a lease keep-alive only, and the PD compacts on a schedule
  (every second here, keeping two seconds of history; ``koala pd`` defaults to 60 s
  and 300 s).

Printed: etcd's database size (``dbSize``, the file etcd's quota is checked against)
and its revision every ``--sample`` renewals, for both runs side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import anyio

from koala.pd.server import EtcdStore, HostInfo, MaintenanceConfig, PDError, PlacementDriver
from koala.testing.etcd import EtcdProcess

WORKERS = 8  # tasks renewing at once
ACTORS_PER_CHURN = 20


@dataclass
class Sample:
    renewals: int
    seconds: float
    db_size: int
    db_in_use: int
    revision: int


@dataclass
class _Host:
    server_id: int
    lease: int


async def _register(pd: PlacementDriver, n: int) -> _Host:
    server_id = await pd.new_server_id()
    info = HostInfo(server_id=server_id, address=f"127.0.0.1:{10000 + n}", ttl=60)
    info.services = {"Player": "bench.Player"}
    return _Host(server_id, await pd.register(info))


async def _rewrite_record(pd: PlacementDriver, host: _Host, load: int) -> None:
    """What a renewal wrote until now: the host record again, with the new load."""
    key = f"{pd.prefix}hosts/{host.server_id}"
    kv = await pd.store.get(key)
    if kv is None:
        return
    info = HostInfo.from_json(json.loads(kv.value))
    info.load = load
    info.renew_time = int(time.time() * 1000)
    await pd.store.replace(
        key, json.dumps(info.to_json()).encode(), mod_revision=kv.mod_revision, lease=host.lease
    )


async def soak(
    mode: str, renewals: int, hosts: int, churn: int, sample: int
) -> tuple[list[Sample], float]:
    """One run on a fresh etcd; the samples, and renewals per second."""
    etcd = EtcdProcess()
    etcd.start()
    store = EtcdStore(etcd.url)
    maintenance = MaintenanceConfig(compact_interval=1.0, history=2.0, check_interval=0.5)
    pd = PlacementDriver(store, maintenance=maintenance)
    samples: list[Sample] = []
    try:
        members = [await _register(pd, n) for n in range(hosts)]
        done = 0
        joined = hosts
        actors = 0
        started = time.perf_counter()

        async def record(count: int | None = None) -> None:
            count = done if count is None else count
            seconds = time.perf_counter() - started
            status = await store.status()
            samples.append(
                Sample(
                    count,
                    seconds,
                    status.db_size,
                    status.db_size_in_use,
                    status.revision,
                )
            )

        async def worker(first: int) -> None:
            nonlocal done, joined, actors
            n = first
            while done < renewals:
                host = members[n % len(members)]
                n += WORKERS
                try:
                    await pd.keep_alive(host.server_id, host.lease, load=n % 100)
                except PDError:
                    continue  # it left meanwhile (churn)
                if mode == "before":
                    await _rewrite_record(pd, host, n % 100)
                done += 1
                count = done  # `done` moves on while this task awaits below
                if count % churn == 0:  # a host leaves, another joins, new actors arrive
                    gone = members.pop(0)
                    await pd.delete(gone.server_id)
                    members.append(await _register(pd, joined))
                    joined += 1
                    batch = [("Player", str(actors + i)) for i in range(ACTORS_PER_CHURN)]
                    actors += ACTORS_PER_CHURN
                    await pd.find_positions(batch)
                if count % sample == 0 and count < renewals:
                    await record(count)

        await record()
        async with anyio.create_task_group() as tg:
            if mode == "now":
                await tg.start(pd.maintain)
            async with anyio.create_task_group() as workers:
                for first in range(WORKERS):
                    workers.start_soon(worker, first)
            rate = done / (time.perf_counter() - started)
            await record()
            if mode == "now":
                await anyio.sleep(2.5)  # one more compaction past the history kept
                await record()
                tg.cancel_scope.cancel()
        return samples, rate
    finally:
        await store.aclose()
        etcd.destroy()


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def report(results: dict[str, tuple[list[Sample], float]]) -> str:
    before, rate_before = results["before"]
    now, rate_now = results["now"]
    lines = [
        f"{'renewals':>9}  {'before: dbSize MB':>18} {'revision':>9}  "
        f"{'now: dbSize MB':>15} {'in use MB':>10} {'revision':>9}"
    ]
    for i in range(max(len(before), len(now))):
        b = before[i] if i < len(before) else None
        n = now[i] if i < len(now) else None
        label = f"{b.renewals:>9,}" if b else f"{'+2.5 s':>9}"  # now's last: after a pause
        lines.append(
            f"{label}  {_mb(b.db_size) if b else '':>18} {b.revision if b else '':>9}  "
            f"{_mb(n.db_size) if n else '':>15} {_mb(n.db_in_use) if n else '':>10} "
            f"{n.revision if n else '':>9}"
        )
    growth_before = before[-1].db_size - before[0].db_size
    growth_now = now[-1].db_size - now[0].db_size
    count = before[-1].renewals
    lines.append(
        f"growth over {count:,} renewals: before {_mb(growth_before)} MB "
        f"({growth_before / max(1, count) * 20_000 / 1e6:.1f} MB per 20k), "
        f"now {_mb(growth_now)} MB; renewals/s before {rate_before:,.0f}, now {rate_now:,.0f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.etcd_soak", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="2 000 renewals, churn every 200 (not 20 000, 500)"
    )
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--renewals", type=int, default=0, help="renewals per run")
    parser.add_argument("--hosts", type=int, default=20, help="hosts renewing (default 20)")
    parser.add_argument("--churn", type=int, default=0, help="renewals between two churns")
    parser.add_argument("--json", action="store_true", help="print the samples as JSON")
    args = parser.parse_args(argv)
    renewals = args.renewals or (2_000 if args.quick else 20_000)
    churn = args.churn or (200 if args.quick else 500)
    if renewals < 1 or args.hosts < 2 or churn < 1:
        parser.error("--renewals >= 1, --hosts >= 2 and --churn >= 1")
    sample = max(1, renewals // 10)
    backend = "trio" if args.loop == "trio" else "asyncio"
    options: dict[str, Any] = {"use_uvloop": True} if args.loop == "uvloop" else {}
    results = {
        mode: anyio.run(
            soak,
            mode,
            renewals,
            args.hosts,
            churn,
            sample,
            backend=backend,
            backend_options=options,
        )
        for mode in ("before", "now")
    }
    if args.json:
        out = {
            mode: {"renewals_per_s": rate, "samples": [s.__dict__ for s in samples]}
            for mode, (samples, rate) in results.items()
        }
        print(json.dumps(out, indent=1))
    else:
        print(f"etcd soak ({args.loop}): {args.hosts} hosts, churn every {churn} renewals")
        print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
