"""koala._loop: every use of a dependency's internals, found on the installed versions.

``test_every_loop_hook_is_available`` is the loud one: when a release of anyio, trio or
Python moves an internal a hook reaches, it fails naming the hook, the version and the
cost, where the behavioural tests would pass on the slower public fallback.
"""

from __future__ import annotations

import logging
import math
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from anyio.streams.tls import TLSStream

from koala import _loop
from koala._tls import TLSConfig
from koala.testing import local_runtime
from koala.testing.tls import TestCA

pytestmark = pytest.mark.anyio


@pytest.fixture
def fresh_warnings() -> Iterator[None]:
    saved = set(_loop._warned)
    _loop._warned.clear()
    yield
    _loop._warned.clear()
    _loop._warned.update(saved)


@pytest.fixture
def forced_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_loop, "_forced_off", True)


def test_every_loop_hook_is_available() -> None:
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    record, problems = _loop.hooks(), _loop.problems()
    missing = [
        f"{name} ({hook.version()}): {problems.get(name, '?')}; it reaches {hook.reaches}; "
        f"without it {hook.fallback}"
        for name, hook in _loop.BY_NAME.items()
        if name in record and not record[name]
    ]
    assert not missing, "loop hooks missing on the installed versions:\n" + "\n".join(missing)


def test_the_record_covers_each_hook_that_applies_here() -> None:
    backends = _loop.installed_backends()
    expected = {
        hook.name
        for hook in _loop.HOOKS
        if hook.applies() and any(b in backends for b in hook.backends)
    }
    assert set(_loop.hooks()) == expected
    assert ("asyncio_current_task" in expected) == (sys.version_info < (3, 12))
    for backend in backends:
        assert set(_loop.hooks(backend)) <= expected


def test_every_hook_says_what_it_reaches_and_costs() -> None:
    assert len(_loop.BY_NAME) == len(_loop.HOOKS)
    for hook in _loop.HOOKS:
        assert hook.reaches
        assert hook.fallback
        assert hook.backends
        assert set(hook.backends) <= {"asyncio", "uvloop", "trio"}
        assert hook.version().split()[0] in ("Python", hook.dependency)


async def test_the_runtime_finds_the_scope_marker_and_fast_clock() -> None:
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    async with local_runtime() as rt:
        assert rt.scope_marker is not None
        outer = rt.scope_marker()
        with anyio.CancelScope():  # noqa: ASYNC100
            assert rt.scope_marker() is not outer
        assert rt.scope_marker() is outer
        if _loop.running_backend() != "trio":
            assert rt.effective_deadline is not anyio.current_effective_deadline
        with anyio.CancelScope(deadline=rt.clock() + 100) as scope:  # noqa: ASYNC100
            assert rt.effective_deadline() == scope.deadline


async def test_the_asyncio_marker_works_through_the_public_current_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # what runs on Python 3.12 and later, or where asyncio's task table is not found
    if _loop.running_backend() == "trio" or _loop.forced_off():
        pytest.skip("the asyncio marker, with its hooks on")
    monkeypatch.setattr(_loop, "_current_tasks", lambda loop: None)
    marker = _loop.scope_marker()
    assert marker is not None
    outer = marker()
    with anyio.CancelScope() as scope:  # noqa: ASYNC100
        assert marker() is scope
    assert marker() is outer


async def test_the_hooks_are_found_inside_a_callers_deadline(fresh_warnings: None) -> None:
    """A host starts its runtime inside scopes of its own (a start-up deadline): the
    probes compare with anyio's answer there, not with a deadline of their own."""
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    with anyio.fail_after(5):  # noqa: ASYNC100  (a scope to be inside of, not a timeout)
        _, deadline = _loop.fast_clock()
        if _loop.running_backend() != "trio":
            assert deadline is not anyio.current_effective_deadline
        assert deadline() == anyio.current_effective_deadline()
    assert not _loop._warned


@pytest.mark.parametrize("public_task", [False, True], ids=["task-table", "current_task"])
async def test_the_asyncio_deadline_reader_agrees_with_anyio(
    monkeypatch: pytest.MonkeyPatch, public_task: bool
) -> None:
    """Nested, shielded and cancelled scopes, in every order: the reader's answer is
    anyio's (the reader walks the same scopes without its backend lookup)."""
    if _loop.running_backend() == "trio" or _loop.forced_off():
        pytest.skip("the asyncio deadline reader, with its hooks on")
    if public_task:
        monkeypatch.setattr(_loop, "_current_tasks", lambda loop: None)
    deadline = _loop._asyncio_deadline_reader()
    now = anyio.current_time()
    kinds = ("near", "far", "none", "shield", "cancelled")

    def scope_of(kind: str) -> anyio.CancelScope:
        if kind == "shield":
            return anyio.CancelScope(shield=True)
        scope = anyio.CancelScope(deadline={"near": now + 50, "far": now + 500}.get(kind, math.inf))
        if kind == "cancelled":
            scope.cancel()
        return scope

    checked = 0
    for outer in kinds:
        for middle in kinds:
            for inner in kinds:
                assert deadline() == anyio.current_effective_deadline()
                with scope_of(outer), scope_of(middle), scope_of(inner):
                    assert deadline() == anyio.current_effective_deadline(), (outer, middle, inner)
                    checked += 1
    assert checked == len(kinds) ** 3


async def test_forced_off_every_hook_takes_its_public_fallback(forced_off: None) -> None:
    assert _loop.scope_marker() is None
    clock, deadline = _loop.fast_clock()
    if _loop.running_backend() != "trio":  # trio's own functions are public
        assert deadline is anyio.current_effective_deadline
    assert abs(clock() - anyio.current_time()) < 1
    async with tcp_pair() as stream:
        assert _loop.take_transport(stream) is None
        assert _loop.trio_socket(stream) is None
        _loop.hold_reads(stream)  # does nothing
        await stream.send(b"still a plain stream")


async def test_trio_lone_writes_get_the_socket_of_a_plain_trio_stream_only() -> None:
    if _loop.running_backend() != "trio":
        async with tcp_pair() as stream:
            assert _loop.trio_socket(stream) is None
        return
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    async with tcp_pair() as stream:
        raw = _loop.trio_socket(stream)
        assert isinstance(raw, socket.socket)
        assert raw is stream.extra(SocketAttribute.raw_socket)


async def test_a_tls_stream_never_gives_its_socket_away() -> None:
    with TestCA() as ca:
        async with tcp_pair(tls=ca.issue("here")) as stream:
            assert isinstance(stream, TLSStream)
            assert stream.extra(SocketAttribute.raw_socket) is not None  # it is there...
            assert _loop.trio_socket(stream) is None  # ...but bytes must go through TLS
            assert _loop.take_transport(stream) is None


async def test_a_taken_transport_hands_over_what_anyio_had_read() -> None:
    if _loop.running_backend() == "trio":
        async with tcp_pair() as stream:
            assert _loop.take_transport(stream) is None  # trio reads only when asked
        return
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    async with tcp_pair(greeting=b"hello") as stream:
        with anyio.fail_after(5):
            assert await stream.receive(1) == b"h"  # anyio has read the rest meanwhile
        taken = _loop.take_transport(stream)
        assert taken is not None
        transport, leftover = taken
        assert leftover == b"ello"
        assert not transport.is_closing()


async def test_a_missing_hook_is_logged_once_with_its_cost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, fresh_warnings: None
) -> None:
    if _loop.forced_off():
        pytest.skip(f"{_loop.ENV_VAR} turned every loop hook off")
    trio = _loop.running_backend() == "trio"
    if trio:
        from trio import lowlevel

        monkeypatch.setattr(lowlevel, "current_task", lambda: object())  # no _cancel_status
    else:
        from anyio._backends import _asyncio

        monkeypatch.delattr(_asyncio, "_task_states")
    name = "trio_scope_marker" if trio else "asyncio_scope_marker"
    with caplog.at_level(logging.WARNING, logger="koala.loop"):
        assert _loop.scope_marker() is None
        assert _loop.scope_marker() is None
    (record,) = caplog.records
    text = record.getMessage()
    assert name in text
    assert _loop.BY_NAME[name].version() in text
    assert "5-13 us more per call" in text


# ---------------------------------------------------------------- helpers


@asynccontextmanager
async def tcp_pair(
    greeting: bytes = b"", tls: TLSConfig | None = None
) -> AsyncIterator[ByteStream]:
    """A connected loopback TCP stream (anyio's, or TLS over it with ``tls``); the far
    end sends ``greeting``, then waits for the test to finish."""
    done = anyio.Event()

    async def serve(peer: SocketStream) -> None:
        async with peer:
            inner: ByteStream = peer
            if tls is not None:
                context = tls.server_context()
                inner = await TLSStream.wrap(peer, server_side=True, ssl_context=context)
            if greeting:
                await inner.send(greeting)
            await done.wait()

    async with (
        await anyio.create_tcp_listener(local_host="127.0.0.1") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, serve)
        port = listener.extra(SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as raw:
            stream: ByteStream = raw
            if tls is not None:
                stream = await TLSStream.wrap(
                    raw, hostname="127.0.0.1", ssl_context=tls.client_context()
                )
            if greeting:
                await anyio.sleep(0.05)  # the greeting arrives, and anyio reads it
            yield stream
        done.set()
        tg.cancel_scope.cancel()
