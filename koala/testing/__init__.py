"""Test kit: run actors in-process inside a test, and property-test them.

```python
from koala.testing import local_runtime, args_strategy

@pytest.mark.anyio
async def test_echo():
    async with local_runtime(PlayerImpl):
        assert await get_rpc_proxy(IPlayer, "1").echo("hi") == "hi"

@given(args=args_strategy(IPlayer.echo))
def test_echo_any(args): ...
```

``local_runtime`` is the same runtime ``koala dev`` runs (same mailboxes, reentrancy,
deadlines, lifecycle), with settings suited to tests: short collection interval and
shutdown grace. Nothing in ``koala`` imports this module.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import random
import socket
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import anyio

from .._actor import ActorBase
from .._annotations import (
    Alias,
    Choice,
    Duration,
    Enumeration,
    Fixed,
    Items,
    Map,
    Model,
    OneOf,
    Plain,
    Record,
    Text,
    shape_of,
)
from .._config import HostConfig
from .._errors import ArgumentTypeError
from ..host import Runtime

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "args_strategy",
    "fail_if_hangs",
    "free_port",
    "local_runtime",
    "test_config",
    "value_strategy",
    "wait_until",
]


def test_config(**overrides: Any) -> HostConfig:
    """A HostConfig for tests: quick collection and shutdown; override any field."""
    values: dict[str, Any] = {
        "default_timeout": 10.0,
        "collection_interval": 0.05,
        "shutdown_grace": 2.0,
    }
    values.update(overrides)
    return HostConfig(**values)


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@asynccontextmanager
async def local_runtime(
    *actors: type[ActorBase], config: HostConfig | None = None, **overrides: Any
) -> AsyncIterator[Runtime]:
    """Run an in-process host for the duration of the block.

    Pass the implementations it serves (default: every implementation defined so
    far) and a config or config overrides (``idle_timeout=0.2``). Inside the block
    ``get_rpc_proxy`` reaches this runtime. On exit it drains like a real host.
    """
    if config is not None and overrides:
        raise TypeError("pass either config= or config overrides, not both")
    cfg = config or test_config(**overrides)
    async with Runtime(cfg, actors=list(actors) if actors else None) as rt:
        yield rt


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server a test starts in another process.

    It is chosen *below* the kernel's ephemeral range: a port from that range (what
    binding port 0 gives) can be taken by any outgoing connection between the moment it
    is chosen and the moment the server binds it; one below it can only be taken by
    another explicit bind. (For servers in this process, bind port 0 and read it back.)
    """
    low, _ = _ephemeral_range()
    top = max(1024 + 1000, low)
    for _ in range(200):
        port = random.randrange(max(1024, top - 12000), top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port found on {host} below the ephemeral range")


async def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - a test helper's own bound
    interval: float = 0.005,
) -> None:
    """Wait until ``predicate()`` is true, checking every ``interval``; TimeoutError after
    ``timeout``. For tests that wait for an actor to reach a state."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polls state owned by others
            await anyio.sleep(interval)


@asynccontextmanager
async def fail_if_hangs(seconds: float = 10.0) -> AsyncIterator[None]:
    """Fail (AssertionError) if the block runs longer than ``seconds``, without giving
    the calls in it a deadline: for tests of what happens to calls that have none (the
    default deadline). The bound is a cancel scope with no deadline, which a watchdog
    task cancels."""
    async with anyio.create_task_group() as tg:
        with anyio.CancelScope() as guard:

            async def watchdog() -> None:
                await anyio.sleep(seconds)
                guard.cancel()

            tg.start_soon(watchdog)
            yield
        tg.cancel_scope.cancel()
    if guard.cancelled_caught:
        raise AssertionError(f"the block did not finish within {seconds} s")


def value_strategy(annotation: Any) -> SearchStrategy[Any]:
    """A hypothesis strategy of values that fit an annotation Koala can encode.

    It follows the same rules as the typed encoding (so every value drawn is accepted by
    a call); floats exclude NaN so that round trips compare equal.
    """
    from hypothesis import strategies as st

    strategy: SearchStrategy[Any] = _strategy(annotation, st)
    return strategy


def args_strategy(method: Callable[..., Any]) -> SearchStrategy[tuple[Any, ...]]:
    """A hypothesis strategy of argument tuples for an interface method."""
    from hypothesis import strategies as st

    hints = typing.get_type_hints(method, include_extras=True)
    params = list(inspect.signature(method).parameters)[1:]
    return st.tuples(*(_strategy(hints[n], st) for n in params))


_MAX_DEPTH = 3  # containers inside this many records are empty: recursive types end


_PLAIN = {
    type(None): "none",
    bool: "booleans",
    int: "integers",
    str: "text",
    bytes: "binary",
}
_TEXT = {
    dt.datetime: "datetimes",
    dt.date: "dates",
    dt.time: "times",
    uuid.UUID: "uuids",
}


def _strategy(tp: Any, st: Any, depth: int = 0) -> Any:
    """Values of ``tp``, read by the same grammar as the codec (koala._annotations)."""
    try:
        shape = shape_of(tp)
    except ArgumentTypeError as exc:
        raise TypeError(f"no strategy for {tp!r}: {exc}") from None

    def sub(annotation: Any) -> Any:
        return _strategy(annotation, st, depth)

    match shape:
        case Plain(tp=plain) if plain in _PLAIN:
            return getattr(st, _PLAIN[plain])()
        case Plain(tp=plain) if plain is float:
            return st.floats(allow_nan=False)
        case Plain():  # Any: plain data
            return st.none() | st.booleans() | st.integers() | st.text()
        case Text(tp=text) if text is Decimal:
            return st.decimals(allow_nan=False, allow_infinity=False)
        case Text(tp=text):
            return getattr(st, _TEXT[text])()
        case Duration():
            return st.timedeltas()
        case Alias(inner=inner):
            return sub(inner)
        case OneOf(members=members):
            return st.one_of(*(sub(m) for m in members))
        case Choice(values=values):
            return st.sampled_from(values)
        case Items(kind=kind) if depth >= _MAX_DEPTH:  # recursive types end here
            return st.builds(kind)
        case Map() if depth >= _MAX_DEPTH:
            return st.builds(dict)
        case Items(kind=kind, item=item):
            if kind is set:
                return st.sets(sub(item), max_size=5)
            if kind is frozenset:
                return st.frozensets(sub(item), max_size=5)
            items = st.lists(sub(item), max_size=5)
            return items if kind is list else items.map(tuple)
        case Fixed(items=items):
            return st.tuples(*(sub(i) for i in items))
        case Map(key=key, value=value):
            return st.dictionaries(sub(key), sub(value), max_size=5)
        case Enumeration(tp=members):
            return st.sampled_from(list(members))
        case Record(tp=record):
            hints = typing.get_type_hints(record, include_extras=True)
            return st.builds(
                record,
                **{
                    f.name: _strategy(hints[f.name], st, depth + 1)
                    for f in dataclasses.fields(record)
                    if f.init
                },
            )
        case Model(tp=model):
            hints = typing.get_type_hints(model, include_extras=True)
            fields = model.model_fields  # type: ignore[attr-defined]
            return st.builds(model, **{n: _strategy(hints[n], st, depth + 1) for n in fields})
    raise AssertionError(f"unhandled shape {shape!r}")
