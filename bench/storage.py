"""Storage throughput: saves and loads per second, beside the raw driver (the floor).

    python -m bench.storage [--quick] [--loop asyncio|uvloop|trio] [--postgres-url URL]

For each backend (memory, SQLite, PostgreSQL) and record size (a small record, a
64 KiB one), one task saves (a versioned update) or loads one row in a loop. The floor
is the same SQL statements on the same driver, called directly on one connection in
the main thread, with the CBOR bytes made once in advance: no event loop, no thread
hop, no typing, no encoding. ``ratio`` is Koala's rate over the floor's. (The floor's
statements are written out here, from what the engines in koala/storage/ run, so that
the benchmark needs no private name; a change of the table fails the floor loudly.)

PostgreSQL: a private server is started (as in the tests) unless --postgres-url is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import cbor2

from koala.storage import Storage


@dataclasses.dataclass
class SmallRecord:
    name: str
    level: int
    gold: int
    items: list[str]


@dataclasses.dataclass
class BigRecord:
    name: str
    blob: bytes


def record_bytes(record: str) -> bytes:
    """A record as the engines store it: the CBOR of its fields by name."""
    _, make = RECORDS[record]
    return cbor2.dumps(dataclasses.asdict(make(1)))


def small(i: int) -> SmallRecord:
    return SmallRecord("player", 7, i, ["sword", "shield"])


def big(i: int) -> BigRecord:
    return BigRecord(f"player{i}", bytes(64 * 1024))


RECORDS: dict[str, tuple[type[Any], Callable[[int], Any]]] = {
    "small": (SmallRecord, small),
    "64KiB": (BigRecord, big),
}


@dataclasses.dataclass(frozen=True)
class Figure:
    backend: str
    record: str
    op: str
    koala: float
    floor: float | None


def rate(fn: Callable[[], None], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            fn()
        n += 20
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


async def arate(fn: Callable[[], Awaitable[None]], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while True:
        for _ in range(20):
            await fn()
        n += 20
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def median(samples: list[float]) -> float:
    return statistics.median(samples)


# ---------------------------------------------------------------- Koala


async def koala_rates(url: str, record: str, seconds: float, repeat: int) -> tuple[float, float]:
    tp, make = RECORDS[record]
    async with Storage(url) as storage:
        store = storage.store(f"bench_{record}", tp)
        found = await store.load("p1")
        version = found.version if found else None
        version = await store.save("p1", make(0), version=version)
        i = 0

        async def save() -> None:
            nonlocal version, i
            i += 1
            version = await store.save("p1", make(i), version=version)

        async def load() -> None:
            await store.load("p1")

        saves = [await arate(save, seconds) for _ in range(repeat)]
        loads = [await arate(load, seconds) for _ in range(repeat)]
    return median(saves), median(loads)


async def koala_parallel_loads(url: str, tasks: int, seconds: float, repeat: int) -> float:
    """Loads per second with ``tasks`` tasks loading at once (the pool's parallelism)."""
    async with Storage(url) as storage:
        store = storage.store("bench_small", SmallRecord)
        if await store.load("p1") is None:
            await store.save("p1", small(0), version=None)
        samples = []
        for _ in range(repeat):
            counts = [0] * tasks
            start = time.perf_counter()
            deadline = start + seconds

            async def worker(n: int, counts: list[int], deadline: float) -> None:
                while time.perf_counter() < deadline:
                    await store.load("p1")
                    counts[n] += 1

            async with anyio.create_task_group() as tg:
                for n in range(tasks):
                    tg.start_soon(worker, n, counts, deadline)
            samples.append(sum(counts) / (time.perf_counter() - start))
    return median(samples)


async def thread_hop(seconds: float, repeat: int) -> float:
    """``anyio.to_thread.run_sync`` of a function that does nothing: the cost of a hop."""

    async def hop() -> None:
        await anyio.to_thread.run_sync(_noop)

    return median([await arate(hop, seconds) for _ in range(repeat)])


def _noop() -> None:
    return None


# ---------------------------------------------------------------- floors


SQLITE_LOAD = "SELECT version, value FROM koala_records WHERE store = ? AND key1 = ? AND key2 = ?"
SQLITE_NEXT_VERSION = (
    "UPDATE koala_meta SET value = value + 1 WHERE name = 'version' RETURNING value"
)
SQLITE_INSERT = (
    "INSERT INTO koala_records (store, key1, key2, version, value) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
SQLITE_UPDATE = (
    "UPDATE koala_records SET version = ?, value = ? "
    "WHERE store = ? AND key1 = ? AND key2 = ? AND version = ?"
)


def sqlite_floor(path: str, record: str, seconds: float, repeat: int) -> tuple[float, float]:
    import sqlite3

    data = record_bytes(record)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    key = ("floor", "p1", "")
    conn.execute("DELETE FROM koala_records WHERE store = ? AND key1 = ? AND key2 = ?", key)
    conn.execute(SQLITE_INSERT, (*key, 1, data))
    version = 1

    def save() -> None:
        nonlocal version
        conn.execute("BEGIN IMMEDIATE")
        new = conn.execute(SQLITE_NEXT_VERSION).fetchone()[0]
        cur = conn.execute(SQLITE_UPDATE, (new, data, *key, version))
        assert cur.rowcount == 1
        conn.execute("COMMIT")
        version = new

    def load() -> None:
        conn.execute(SQLITE_LOAD, key).fetchone()

    saves = [rate(save, seconds) for _ in range(repeat)]
    loads = [rate(load, seconds) for _ in range(repeat)]
    conn.close()
    return median(saves), median(loads)


POSTGRES_LOAD = (
    "SELECT version, value FROM koala_records WHERE store = %s AND key1 = %s AND key2 = %s"
)
POSTGRES_INSERT = (
    "INSERT INTO koala_records (store, key1, key2, version, value) "
    "VALUES (%s, %s, %s, nextval('koala_record_version'), %s) "
    "ON CONFLICT DO NOTHING RETURNING version"
)
POSTGRES_UPDATE = (
    "UPDATE koala_records SET version = nextval('koala_record_version'), value = %s "
    "WHERE store = %s AND key1 = %s AND key2 = %s AND version = %s RETURNING version"
)


def postgres_floor(url: str, record: str, seconds: float, repeat: int) -> tuple[float, float]:
    import psycopg

    data = record_bytes(record)
    conn = psycopg.connect(url, autocommit=True)
    key = ("floor", "p1", "")
    conn.execute("DELETE FROM koala_records WHERE store = %s AND key1 = %s AND key2 = %s", key)
    row = conn.execute(POSTGRES_INSERT, (*key, data)).fetchone()
    assert row is not None
    version = row[0]

    def save() -> None:
        nonlocal version
        found = conn.execute(POSTGRES_UPDATE, (data, *key, version)).fetchone()
        assert found is not None
        version = found[0]

    def load() -> None:
        conn.execute(POSTGRES_LOAD, key, binary=True).fetchone()

    saves = [rate(save, seconds) for _ in range(repeat)]
    loads = [rate(load, seconds) for _ in range(repeat)]
    conn.close()
    return median(saves), median(loads)


# ---------------------------------------------------------------- main


def run_backend(
    backend: str, url: str, loop: str, seconds: float, repeat: int, floor: Any
) -> list[Figure]:
    anyio_backend, options = ("trio", {}) if loop == "trio" else ("asyncio", {})
    if loop == "uvloop":
        options = {"use_uvloop": True}
    out = []
    for record in RECORDS:
        k_save, k_load = anyio.run(
            koala_rates,
            url,
            record,
            seconds,
            repeat,
            backend=anyio_backend,
            backend_options=options,
        )
        f_save, f_load = floor(record) if floor else (None, None)
        out.append(Figure(backend, record, "save", k_save, f_save))
        out.append(Figure(backend, record, "load", k_load, f_load))
        print(f"  {backend} {record}: done", file=sys.stderr, flush=True)
    if backend != "memory":
        par = anyio.run(
            koala_parallel_loads,
            url,
            8,
            seconds,
            repeat,
            backend=anyio_backend,
            backend_options=options,
        )
        out.append(Figure(backend, "small", "load, 8 tasks", par, None))
    return out


def table(figures: list[Figure]) -> str:
    lines = [
        "| backend | record | op | Koala ops/s | raw driver ops/s | ratio |",
        "|---|---|---|---:|---:|---:|",
    ]
    for f in figures:
        floor = f"{f.floor:,.0f}" if f.floor else "-"
        ratio = f"{f.koala / f.floor:.2f}" if f.floor else "-"
        lines.append(f"| {f.backend} | {f.record} | {f.op} | {f.koala:,.0f} | {floor} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--postgres-url", help="use this server instead of a private one")
    parser.add_argument(
        "--backends", default="memory,sqlite,postgresql", help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    seconds, repeat = (0.3, 1) if args.quick else (1.0, 3)
    wanted = args.backends.split(",")
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="koala-bench-") as tmp:
        if "memory" in wanted:
            figures += run_backend("memory", "memory://", args.loop, seconds, repeat, None)
        if "sqlite" in wanted:
            path = str(Path(tmp) / "bench.db")
            url = f"sqlite:///{path}"

            def sqlite(record: str) -> tuple[float, float]:
                return sqlite_floor(path, record, seconds, repeat)

            figures += run_backend("sqlite", url, args.loop, seconds, repeat, sqlite)
        if "postgresql" in wanted:
            pg_url = args.postgres_url
            if pg_url is None:
                from koala.testing.postgres import start_server

                pg_url = start_server().url

            def postgres(record: str) -> tuple[float, float]:
                return postgres_floor(pg_url, record, seconds, repeat)

            figures += run_backend("postgresql", pg_url, args.loop, seconds, repeat, postgres)
    anyio_backend, options = ("trio", {}) if args.loop == "trio" else ("asyncio", {})
    if args.loop == "uvloop":
        options = {"use_uvloop": True}
    hop = anyio.run(thread_hop, seconds, repeat, backend=anyio_backend, backend_options=options)
    print(f"storage on {args.loop}{' (quick)' if args.quick else ''}; one task unless noted")
    print(table(figures))
    print(f"\nfor scale: anyio.to_thread.run_sync(noop) {hop:,.0f}/s on {args.loop}")


if __name__ == "__main__":
    main()
