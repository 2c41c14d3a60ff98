"""Scale: one host holding very many actors, and what that costs the calls it serves.

    python -m bench.scale [--quick] [--loop asyncio|uvloop|trio] [--section NAME ...]

Sections (functions named in SECTIONS; a new one is a function taking the scale flag
and returning its figures, added to the dict):

- ``collection``: activate N idle actors (1,000,000; 20,000 with --quick) on one
  in-process runtime, all set to expire at the same moment; then, while the collector
  deactivates them, call a hot actor every millisecond from another task. Reported: the
  activation rate, the collection rate, the hot calls' latency (p50/p99/max, counted
  from the moment each call was due, so a stalled event loop shows in full), and RSS
  before the actors, at the peak and after they are gone.
- ``local_loop``: one task makes 100,000 local calls that never suspend (the local fast
  path runs each turn in the caller's task) while a ticker task sleeps 1 ms at a time;
  reported: the longest gap the ticker saw, and the loop's calls/s.

Each figure is printed beside its target and the ratio of the two.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from abc import abstractmethod
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import anyio

from koala import ActorBase, ActorInterface, HostConfig, Runtime, get_rpc_proxy


@dataclass
class Figure:
    """One measured figure; ``target`` is a bound it should stay under (``lower``) or
    reach (not ``lower``), None when there is none; or ``floor``, the same work without
    what is measured, from the same run."""

    section: str
    name: str
    value: float
    unit: str
    target: float | None = None
    lower: bool = True
    floor: float | None = None

    @property
    def ratio(self) -> float | None:
        bound = self.target or self.floor
        return None if not bound else self.value / bound

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value <= self.target if self.lower else self.value >= self.target


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _ms(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile of sorted seconds, in ms."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))] * 1e3


class GcWatch:
    """The longest pause of the cyclic garbage collector since the last ``take()``: what
    is left of a stall when the runtime itself lets others run."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._start = 0.0

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.longest = max(self.longest, time.perf_counter() - self._start)

    def take(self) -> float:
        longest, self.longest = self.longest, 0.0
        return longest


# ------------------------------------------------------------------ actors


class IIdle(ActorInterface):
    @abstractmethod
    async def touch(self) -> None: ...


N_FULL = int(os.environ.get("KOALA_SCALE_N", "1000000"))
_release_at = 0.0  # when every idle actor of the collection section expires


class Idle(IIdle, ActorBase):
    idle_timeout = 0.5

    async def on_activate(self) -> None:
        # all expire at one moment, however long activating them took
        self.delay_deactivation(max(0.0, _release_at - anyio.current_time()))

    async def touch(self) -> None:
        pass


class IPilot(ActorInterface):
    @abstractmethod
    async def touch(self) -> None: ...


class Pilot(IPilot, ActorBase):
    idle_timeout = 0.1

    async def touch(self) -> None:
        pass


class IHot(ActorInterface):
    @abstractmethod
    async def ping(self, n: int) -> int: ...


class Hot(IHot, ActorBase):
    idle_timeout = 3600

    async def ping(self, n: int) -> int:
        return n


class Ticker:
    """Calls ``one()`` every ``interval`` seconds. While recording, a call's latency runs
    from when it was due and due times do not slip: after a stall the calls it held up
    are made at once, each with the latency it had, so a stall counts in full."""

    def __init__(self, one: Callable[[], Awaitable[object]], interval: float = 0.001) -> None:
        self.one = one
        self.interval = interval
        # doubles in one buffer: float objects kept from the whole run would sit among the
        # actors' objects and keep their memory pages from being given back
        self.latencies = array("d")
        self.longest_gap = 0.0  # between two calls, while recording
        # the same in CPU time of this thread: what the process itself spent between two
        # calls, without the time the machine's other processes had it wait
        self.longest_cpu_gap = 0.0
        self.last_cpu = 0.0
        self.recording = False
        self.stop = False
        self.due = self.last = 0.0

    async def run(self) -> None:
        self.due = anyio.current_time()
        while not self.stop:
            self.due += self.interval
            if not self.recording:
                self.due = max(self.due, anyio.current_time())
            await anyio.sleep_until(self.due)
            await self.one()
            now, cpu = anyio.current_time(), time.thread_time()
            if self.recording:
                self.latencies.append(max(0.0, now - self.due))
                self.longest_gap = max(self.longest_gap, now - self.last)
                self.longest_cpu_gap = max(self.longest_cpu_gap, cpu - self.last_cpu)
            self.last, self.last_cpu = now, cpu

    def record(self) -> None:
        """Start recording, from now."""
        self.due = self.last = anyio.current_time()
        self.last_cpu = time.thread_time()
        self.longest_gap = self.longest_cpu_gap = 0.0
        self.recording = True

    def take(self) -> array[float]:
        """Stop recording; the latencies recorded, sorted. Calls that were due but not
        made yet (the ticker is held up right now) count with their wait so far.

        An array of doubles, not a list: tens of thousands of float objects, made just
        after a mass collection, would land in the freed memory and pin it (the RSS
        measured next would be the bench's own samples, not the host's)."""
        self.recording = False
        now = anyio.current_time()
        self.longest_gap = max(self.longest_gap, now - self.last)
        self.longest_cpu_gap = max(self.longest_cpu_gap, time.thread_time() - self.last_cpu)
        due = self.due + self.interval
        while due <= now:
            self.latencies.append(now - due)
            due += self.interval
        taken, self.latencies = array("d", sorted(self.latencies)), array("d")
        return taken


# ------------------------------------------------------------------ sections


async def collection(quick: bool) -> list[Figure]:
    """N idle actors activated, then collected while a hot actor is called every ms."""
    n = 20_000 if quick else N_FULL
    quantum = 0.2
    config = HostConfig(collection_interval=quantum, max_queued=1_000_000)
    with GcWatch() as gcw:
        return await _collection(n, quantum, config, gcw)


async def _collection(n: int, quantum: float, config: HostConfig, gcw: GcWatch) -> list[Figure]:
    global _release_at
    section = f"collection ({n:,} idle actors)"
    figures: list[Figure] = []
    gc.collect()
    rss_before = _rss_mb()
    async with Runtime(config, actors=[Idle, Pilot, Hot]) as rt:
        hot = get_rpc_proxy(IHot, "hot")
        await hot.ping(0)
        ticker = Ticker(lambda: hot.ping(1))
        # a pilot of actors that expire soon tells how long activating all will take;
        # every actor of the run then expires after that (with a margin)
        pilot = max(1_000, n // 50)
        t0 = anyio.current_time()
        for i in range(pilot):
            await get_rpc_proxy(IPilot, i).touch()
        start = anyio.current_time()
        _release_at = start + (start - t0) * n / pilot * 2.0 + 1.0
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            ticker.record()
            callers = 4

            async def activate(offset: int) -> None:
                for i in range(offset, n, callers):
                    await get_rpc_proxy(IIdle, i).touch()

            async with anyio.create_task_group() as acts:
                for c in range(callers):
                    acts.start_soon(activate, c)
            activated = anyio.current_time()
            ticker.take()
            activation_gap, activation_cpu = ticker.longest_gap, ticker.longest_cpu_gap
            activation_gc = gcw.take()
            rss_peak = _rss_mb()
            await anyio.sleep_until(_release_at - 0.05)
            early = max(0, n + 1 - rt.statistics().activations)  # pilots are gone by now
            ticker.record()
            gcw.take()
            first = last = 0.0
            while True:
                left = rt.statistics().activations
                if left >= n + 1 - early:
                    first = anyio.current_time()  # the last look before any went
                elif left <= 1:
                    last = anyio.current_time()
                    break
                await anyio.sleep(0.001)
            during_collection = ticker.take()
            collection_gap, collection_cpu = ticker.longest_gap, ticker.longest_cpu_gap
            collection_gc = gcw.take()
            await anyio.sleep(quantum * 3)  # whatever runs after a large collection
            gc.collect()
            rss_after = _rss_mb()  # the host runs on: what it holds now
            ticker.stop = True

    figures.append(Figure(section, "activations/s", n / (activated - start), "/s"))
    if early:
        figures.append(Figure(section, "collected before the release (too slow)", early, ""))
    figures.append(
        Figure(
            section, "collection rate", (n - early) / max(last - first, 1e-9), "/s", 100_000, False
        )
    )
    lat = during_collection
    figures.append(Figure(section, "hot call p50 during collection", _ms(lat, 0.5), "ms"))
    figures.append(Figure(section, "hot call p99 during collection", _ms(lat, 0.99), "ms", 20.0))
    figures.append(Figure(section, "hot call max during collection", _ms(lat, 1.0), "ms"))
    figures.append(Figure(section, "longest hot call gap, collection", collection_gap * 1e3, "ms"))
    figures.append(Figure(section, "  the same in CPU time", collection_cpu * 1e3, "ms"))
    figures.append(Figure(section, "longest GC pause, collection", collection_gc * 1e3, "ms"))
    figures.append(Figure(section, "longest hot call gap, activation", activation_gap * 1e3, "ms"))
    figures.append(Figure(section, "  the same in CPU time", activation_cpu * 1e3, "ms"))
    figures.append(Figure(section, "longest GC pause, activation", activation_gc * 1e3, "ms"))
    figures.append(Figure(section, "RSS before", rss_before, "MB"))
    figures.append(Figure(section, "RSS at peak", rss_peak, "MB"))
    figures.append(Figure(section, "RSS after", rss_after, "MB", rss_before * 1.10))
    returned = (rss_peak - rss_after) / max(rss_peak - rss_before, 1e-9) * 100
    figures.append(Figure(section, "share of the growth given back", returned, "%"))
    return figures


class IEcho(ActorInterface):
    @abstractmethod
    async def echo(self, msg: str) -> str: ...


class Echo(IEcho, ActorBase):
    async def echo(self, msg: str) -> str:
        return msg


async def _loop_rate(proxy: IEcho, n: int) -> float:
    """Calls per second of CPU time (this machine is shared: wall time says more about
    the neighbours than about a difference of a few per cent)."""
    t0 = time.process_time()
    for _ in range(n):
        await proxy.echo("x")
    return n / (time.process_time() - t0)


async def local_loop(quick: bool) -> list[Figure]:
    """A loop of local calls that never suspend, beside a task ticking every 1 ms; then
    the loop's rate alone, with the fast path's yield and without it (alternated)."""
    n = 20_000 if quick else 100_000
    section = f"local_loop ({n:,} calls that never suspend)"
    gaps: list[float] = []
    stop = False

    cpu_gaps: list[float] = []

    async def tick() -> None:
        last, last_cpu = anyio.current_time(), time.thread_time()
        while not stop:
            await anyio.sleep(0.001)
            now, cpu = anyio.current_time(), time.thread_time()
            gaps.append(now - last)
            cpu_gaps.append(cpu - last_cpu)
            last, last_cpu = now, cpu

    async with Runtime(HostConfig(), actors=[Echo]):
        proxy = get_rpc_proxy(IEcho, "loop")
        await proxy.echo("warm")
        async with anyio.create_task_group() as tg:
            tg.start_soon(tick)
            await anyio.sleep(0.01)
            gaps.clear()
            cpu_gaps.clear()
            t0 = time.perf_counter()
            for _ in range(n):
                await proxy.echo("x")
            elapsed = time.perf_counter() - t0
            longest = max(gaps, default=elapsed)
            longest_cpu = max(cpu_gaps, default=elapsed)
            ticks = len(gaps)
            stop = True
    # what the yield costs the loop: the same loop on a runtime whose check never fires
    # (HostConfig.inline_check past the loop's length), alternated with the default
    with_yield: list[float] = []
    without: list[float] = []
    for _ in range(5):
        for config, rates in (
            (HostConfig(), with_yield),
            (HostConfig(inline_check=sys.maxsize), without),
        ):
            async with Runtime(config, actors=[Echo]) as rt:
                rates.append(await _loop_rate(get_rpc_proxy(IEcho, "loop", runtime=rt), n))
    rate, floor = sorted(with_yield)[2], sorted(without)[2]
    return [
        Figure(section, "longest ticker gap", longest * 1e3, "ms"),
        Figure(section, "  the same in CPU time", longest_cpu * 1e3, "ms", 20.0),
        Figure(section, "ticks seen during the loop", ticks, ""),
        Figure(section, "CPU calls/s alone (floor: without the yield)", rate, "/s", floor=floor),
    ]


SECTIONS: dict[str, Callable[[bool], Awaitable[list[Figure]]]] = {
    "collection": collection,
    "local_loop": local_loop,
}


async def main(quick: bool, sections: list[str]) -> list[Figure]:
    figures: list[Figure] = []
    for name in sections:
        figures.extend(await SECTIONS[name](quick))
    return figures


def _format(f: Figure) -> str:
    value = f"{f.value:,.1f}" if f.value < 100 else f"{f.value:,.0f}"
    if f.floor is not None:
        return f"  {f.name:44} {value:>12} {f.unit:3} floor {f.floor:>12,.0f}  ratio {f.ratio:.2f}"
    if f.target is None:
        return f"  {f.name:44} {value:>12} {f.unit}"
    sign = "<=" if f.lower else ">="
    target = f"{f.target:,.1f}" if f.target < 100 else f"{f.target:,.0f}"
    verdict = "met" if f.met else "MISSED"
    return (
        f"  {f.name:44} {value:>12} {f.unit:3} target {sign} {target:>9}"
        f"  ratio {f.ratio:.2f}  {verdict}"
    )


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="far fewer actors: a smoke run")
    parser.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop", "trio"])
    parser.add_argument("--section", action="append", choices=list(SECTIONS))
    parser.add_argument("--json", action="store_true", help="print figures as JSON")
    args = parser.parse_args(argv)
    backend = "trio" if args.loop == "trio" else "asyncio"
    options = {"use_uvloop": True} if args.loop == "uvloop" else {}
    figures: list[Figure] = anyio.run(
        main, args.quick, args.section or list(SECTIONS), backend=backend, backend_options=options
    )
    if args.json:
        out: list[dict[str, Any]] = [{**asdict(f), "ratio": f.ratio} for f in figures]
        json.dump(out, sys.stdout)
        return
    section = ""
    for f in figures:
        if f.section != section:
            section = f.section
            print(f"{section}, {args.loop}")
        print(_format(f))


if __name__ == "__main__":
    cli()
