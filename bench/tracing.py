"""What tracing costs: workloads 1 and 3 with no tracer configured, and with one.

    python -m bench.tracing [--quick] [--loop asyncio|uvloop|trio]

Issue #13 asks that with no tracer configured the cost stays within 2% of workloads 1
and 3. Koala has no build without its tracing code to run beside, so the off cost is
measured two ways in this run:

- **the work it adds**: with no tracer provider set, a local call runs no tracing code
  at all (the runtime swaps in its traced ``invoke`` only when a provider is set, which
  this checks), and a remote call runs two module-attribute tests, one field test as
  the request is encoded and one as it is decoded, and one coroutine frame more on the
  serving side. Those statements are timed here (timeit, best of 7) and set beside the
  time of one call of workload 1 and of workload 3, measured in the same run;
- **tracing on**: the same workloads with an OpenTelemetry SDK provider recording every
  span (into an exporter that drops them), alternated with the off runs, so the figure
  of what a configured tracer costs sits beside the off figure it is compared with.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Sequence
from typing import Any

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from koala import HostConfig, Runtime, get_rpc_proxy
from koala.transport import Transport, TransportConfig

from .inprocess import Echo, IEcho
from .transport import BenchEcho, IBenchEcho, _Split, _with_server

LOOPS = ("asyncio", "uvloop", "trio")
TARGET = 0.02


class _Dropped(SpanExporter):
    """Spans are made, recorded and ended, then dropped: the cost of tracing, not of an
    exporter's I/O."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _set_tracing(on: bool) -> None:
    """What an application does (once per process, before its runtime starts)."""
    if on:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_Dropped()))
        trace.set_tracer_provider(provider)


def _run(func: Any, loop: str, *args: Any) -> Any:
    if loop == "uvloop":
        return anyio.run(func, *args, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(func, *args, backend=loop)


# ---------------------------------------------------------------- workload 1


async def _local_rate(calls: int, on: bool) -> float:
    async with Runtime(HostConfig(), [Echo]) as rt:
        traced = getattr(rt.invoke, "__func__", None) is not Runtime.invoke
        assert traced is on, "the runtime picks its invoke by whether a tracer is set"
        return await _rate(get_rpc_proxy(IEcho, "bench", runtime=rt), 1000, calls)


async def _rate(proxy: IEcho | IBenchEcho, warm: int, calls: int) -> float:
    """Sequential calls per second, after ``warm`` calls that are not timed."""
    for _ in range(warm):
        await proxy.echo("hello")
    start = time.perf_counter()
    for _ in range(calls):
        await proxy.echo("hello")
    return calls / (time.perf_counter() - start)


# ---------------------------------------------------------------- workload 3


async def _serve(on: bool) -> None:
    from .transport import _serve_koala

    _set_tracing(on)
    await _serve_koala()


async def _remote_rate(port: int, calls: int) -> float:
    address = f"127.0.0.1:{port}"
    async with Transport(TransportConfig(node_id="bench-tracing")) as transport:
        rt = Runtime(HostConfig(), [BenchEcho], directory=_Split(set(), address), remote=transport)
        async with rt:
            return await _rate(get_rpc_proxy(IBenchEcho, "bench", runtime=rt), 300, calls)


def _remote(loop: str, calls: int, on: bool) -> float:
    rate: float = _with_server(
        "on" if on else "off",
        loop,
        lambda port: _run(_remote_rate, loop, port, calls),
        module="bench.tracing",
    )
    return rate


# ---------------------------------------------------------------- the off path's work


tracer = None  # what koala._tracing holds with no provider set, read the same way


class _Call:
    trace = None


async def _frame() -> None:
    return None


async def _outer() -> None:
    await _frame()


def _drive(coro: Any) -> None:
    with contextlib.suppress(StopIteration):
        coro.send(None)


def _off_path_ns() -> dict[str, float]:
    """Per remote call with no tracer: the statements the tracing code adds, timed."""
    module, call, a, n = sys.modules[__name__], _Call(), [0] * 11, 11
    env = {"m": module, "c": call, "a": a, "n": n, "drive": _drive, "outer": _outer}
    env["frame"] = _frame

    def best(stmt: str, number: int = 200_000) -> float:
        times = timeit.repeat(stmt, globals=env, number=number, repeat=7)
        return min(times) / number * 1e9

    empty = best("pass")
    parts = {
        # the caller: whether to carry a trace context in the REQUEST
        "caller's tracer test": best("None if m.tracer is None else 1") - empty,
        # request_frame: whether to encode the trace field
        "encoding's field test": best("t = c.trace\nif t is not None: pass") - empty,
        # the decoder: a 12th element or not
        "decoding's field test": best("t = a[11] if n > 11 else None") - empty,
        # serve_request: whether to open a server span
        "server's tracer test": best("x = m.tracer\nif x is None: pass") - empty,
        # serve_request awaits _serve: one coroutine frame more than a single function
        "server's extra frame": best("drive(outer())") - best("drive(frame())"),
    }
    return {k: max(0.0, v) for k, v in parts.items()}


# ---------------------------------------------------------------- report


def _one_round(loop: str, on: bool, local_calls: int, remote_calls: int) -> tuple[float, float]:
    """Workloads 1 and 3 in a process of their own (a tracer provider is set once per
    process), with tracing ``on`` or off."""
    mode = "on" if on else "off"
    cmd = [sys.executable, "-m", "bench.tracing", "--round", mode, "--loop", loop]
    cmd += ["--calls", str(local_calls), str(remote_calls)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
    one, three = out.stdout.split()
    return float(one), float(three)


def _round(loop: str, on: bool, local_calls: int, remote_calls: int) -> None:
    _set_tracing(on)
    print(_run(_local_rate, loop, local_calls, on), _remote(loop, remote_calls, on))


def measure(loop: str, quick: bool) -> str:
    rounds = 3 if quick else 5
    local_calls, remote_calls = (20_000, 1_000) if quick else (100_000, 4_000)
    local: dict[bool, list[float]] = {False: [], True: []}
    remote: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):  # alternated, so a drift of the machine hits both alike
        for on in (False, True):
            one, three = _one_round(loop, on, local_calls, remote_calls)
            local[on].append(one)
            remote[on].append(three)
    off1, on1 = statistics.median(local[False]), statistics.median(local[True])
    off3, on3 = statistics.median(remote[False]), statistics.median(remote[True])
    parts = _off_path_ns()
    remote_ns = sum(parts.values())
    lines = [
        f"{loop}: medians of {rounds} alternated rounds",
        f"  1 in-process  tracing off {off1:9,.0f}/s  on {on1:9,.0f}/s  on/off {on1 / off1:.2f}",
        f"  3 remote      tracing off {off3:9,.0f}/s  on {on3:9,.0f}/s  on/off {on3 / off3:.2f}",
        "  the cost with no tracer, per call:",
        f"    workload 1: no tracing code runs (the untraced invoke, checked): 0 ns of "
        f"{1e9 / off1:,.0f} ns = 0.00% (target <= {TARGET:.0%})",
    ]
    for name, ns in parts.items():
        lines.append(f"      remote: {name:24} {ns:6.1f} ns")
    share = remote_ns / (1e9 / off3)
    lines.append(
        f"    workload 3: {remote_ns:.0f} ns of {1e9 / off3:,.0f} ns = {share:.2%} "
        f"(target <= {TARGET:.0%})"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls: a smoke run")
    parser.add_argument("--loop", choices=LOOPS, action="append")
    parser.add_argument("--serve", choices=("off", "on"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=LOOPS, help=argparse.SUPPRESS)  # --serve's
    parser.add_argument("--round", choices=("off", "on"), help=argparse.SUPPRESS)
    parser.add_argument("--calls", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    loop = (args.loop or ["asyncio"])[0]
    if args.serve:
        _run(_serve, args.backend or loop, args.serve == "on")
        return
    if args.round:
        _round(loop, args.round == "on", *args.calls)
        return
    print(f"tracing off and on, workloads 1 and 3 ({os.cpu_count()} cores)")
    for loop in args.loop or LOOPS:
        print(measure(loop, args.quick), flush=True)


if __name__ == "__main__":
    main()
