"""Every place Koala reaches into anyio's, trio's or asyncio's private internals.

A few fast paths need what no public API gives: the innermost cancel scope of the
running task (to skip a deadline's scope around a turn that never suspends), the
transport under anyio's asyncio stream (to drive a connection from protocol callbacks),
and the socket under anyio's trio stream (to write a lone frame without a checkpoint).
Each such access is a *hook*, listed in :data:`HOOKS` with what it reaches and what
Koala does without it. Every hook has a fallback on public API, so a dependency release
that moves an internal only makes Koala slower, never wrong; the first time a hook is
found missing, a WARNING on the ``koala.loop`` logger names it and its cost.

:func:`hooks` probes every hook on fresh event loops and says which work on the
installed versions (``tests/test_loop.py`` fails by name when one does not).
``KOALA_NO_LOOP_HOOKS=1`` (read once, at import) turns every hook off.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import os
import platform
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any
from weakref import ref

import anyio
import sniffio
from anyio.abc import SocketAttribute, SocketStream

log = logging.getLogger("koala.loop")

ENV_VAR = "KOALA_NO_LOOP_HOOKS"


def _env_forces_off() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() not in ("", "0", "false", "no")


_forced_off = _env_forces_off()  # read once: a hook chosen at start stays chosen

_SCOPE_COST = (
    "every turn under the default deadline enters its cancel scope first, as if it "
    "might suspend: 5-13 us more per call"
)


@dataclass(frozen=True, slots=True)
class Hook:
    """One use of a dependency's internals: where it applies, what it reaches, and what
    Koala does without it (and what that costs)."""

    name: str
    backends: tuple[str, ...]  # the loops it is used on: asyncio, uvloop, trio
    dependency: str  # the distribution whose internals it reaches ("python": the stdlib)
    reaches: str
    fallback: str
    python_below: tuple[int, int] | None = None  # not needed from this version on

    def applies(self) -> bool:
        return self.python_below is None or sys.version_info < self.python_below

    def version(self) -> str:
        """``dependency version`` as installed, for messages."""
        if self.dependency == "python":
            return f"Python {platform.python_version()}"
        try:
            return f"{self.dependency} {importlib.metadata.version(self.dependency)}"
        except importlib.metadata.PackageNotFoundError:
            return f"{self.dependency} (not installed)"


HOOKS: tuple[Hook, ...] = (
    Hook(
        "trio_scope_marker",
        ("trio",),
        "trio",
        "trio.lowlevel.Task._cancel_status (the task's innermost cancel scope)",
        _SCOPE_COST,
    ),
    Hook(
        "asyncio_scope_marker",
        ("asyncio", "uvloop"),
        "anyio",
        "anyio._backends._asyncio._task_states (the task's innermost cancel scope)",
        _SCOPE_COST,
    ),
    Hook(
        "asyncio_current_task",
        ("asyncio", "uvloop"),
        "python",
        "asyncio.tasks._current_tasks (the running task, by loop)",
        "asyncio.current_task(), which makes a getpid() system call on Python 3.11: "
        "about 0.5 us more per scope check",
        python_below=(3, 12),
    ),
    Hook(
        "asyncio_deadline",
        ("asyncio", "uvloop"),
        "anyio",
        "the cancel scopes of anyio's asyncio task states (_deadline, _shield, "
        "_cancel_called, _parent_scope)",
        "anyio.current_effective_deadline(), which looks the backend up and walks the "
        "scopes through properties: about 1 us more per read",
    ),
    Hook(
        "asyncio_pipe",
        ("asyncio", "uvloop"),
        "anyio",
        "SocketStream._transport and ._protocol.read_queue of anyio's asyncio streams",
        "channels keep anyio's stream and a reader task: a trip through the event loop "
        "per send, two epoll changes per receive and a task switch per frame read",
    ),
    Hook(
        "asyncio_hold_reads",
        ("asyncio", "uvloop"),
        "anyio",
        "SocketStream._transport of anyio's asyncio streams (pause_reading)",
        "a dialled node's bytes are read ahead until its WELCOME is checked (memory, "
        "bounded by what it sends before answering the handshake)",
    ),
    Hook(
        "trio_lone_write",
        ("trio",),
        "anyio",
        "anyio's trio SocketStream, known by its module (anyio._backends._trio), whose "
        "socket takes lone frames directly",
        "a lone frame goes out through stream.send: a checkpoint and a shielded scope per frame",
    ),
)
BY_NAME: dict[str, Hook] = {hook.name: hook for hook in HOOKS}

_warned: set[str] = set()
_warn_lock = threading.Lock()


def forced_off() -> bool:
    """Whether ``KOALA_NO_LOOP_HOOKS`` turned every hook off."""
    return _forced_off


def _missing(name: str, why: object) -> None:
    """Log, once per process, that hook ``name`` is not available and what it costs."""
    with _warn_lock:
        if name in _warned:
            return
        _warned.add(name)
    hook = BY_NAME[name]
    log.warning(
        "Koala's fast path %r is not available with %s (%s: %s); Koala works without "
        "it, but %s. Tell Koala's maintainers which versions you run.",
        name,
        hook.version(),
        hook.reaches,
        why,
        hook.fallback,
    )


# ---------------------------------------------------------------- the innermost scope


class _NoState:
    cancel_scope = None


def _trio_marker() -> Callable[[], object]:
    from trio.lowlevel import current_task

    return lambda: current_task()._cancel_status


def _asyncio_marker() -> Callable[[], object]:
    from anyio._backends._asyncio import _task_states

    states: dict[Any, Any] = _task_states.data  # type: ignore[attr-defined]  # by weakref
    no_state = _NoState()
    loop = asyncio.get_running_loop()
    current = _current_tasks(loop)
    if current is None:
        current_task = asyncio.current_task

        def public_marker() -> object:
            return states.get(ref(current_task()), no_state).cancel_scope

        return public_marker

    def marker() -> object:
        return states.get(ref(current[loop]), no_state).cancel_scope

    return marker


def _current_tasks(loop: asyncio.AbstractEventLoop) -> dict[Any, Any] | None:
    """asyncio's loop -> running task table on Python 3.11, where the public
    ``asyncio.current_task()`` makes a getpid() system call on every call; None on
    later versions (the public function is cheap there), or when it is not found."""
    if _forced_off or not BY_NAME["asyncio_current_task"].applies():
        return None
    found = _probe_current_tasks(loop)
    if isinstance(found, str):
        _missing("asyncio_current_task", found)
        return None
    return found


def _probe_current_tasks(loop: asyncio.AbstractEventLoop) -> dict[Any, Any] | str:
    try:
        from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]
    except ImportError as exc:
        return repr(exc)
    if not isinstance(_current_tasks, dict) or _current_tasks.get(loop) is not (
        asyncio.current_task()
    ):
        return "it does not hold the running task"
    return _current_tasks


def _make_marker(backend: str) -> Callable[[], object] | str:
    """The marker function for ``backend``, checked against what it must mean (entering
    a cancel scope changes it, leaving restores it), or why there is none."""
    try:
        marker = _trio_marker() if backend == "trio" else _asyncio_marker()
        outer = marker()
        with anyio.CancelScope():  # noqa: ASYNC100  (entered only to be seen)
            inner = marker()
        if inner is outer or inner is None or marker() is not outer:
            return "it does not follow the cancel scopes the task enters"
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        return repr(exc)
    return marker


def scope_marker() -> Callable[[], object] | None:
    """For the running backend, a function naming the current task's innermost cancel
    scope (an opaque object, compared by identity), or None if it cannot be known."""
    if _forced_off:
        return None
    try:
        backend = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if backend not in ("asyncio", "trio"):
        return None
    found = _make_marker(backend)
    if isinstance(found, str):
        _missing("trio_scope_marker" if backend == "trio" else "asyncio_scope_marker", found)
        return None
    return found


# ---------------------------------------------------------------- clocks


def fast_clock() -> tuple[Callable[[], float], Callable[[], float]]:
    """``(current_time, current_effective_deadline)`` for the running backend, without
    anyio's per-call backend lookup (about 1 µs each, measured); anyio's own functions
    where the backend's are not found."""
    try:
        backend = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return anyio.current_time, anyio.current_effective_deadline
    if backend == "trio":
        import trio  # both public

        return trio.current_time, trio.current_effective_deadline
    if backend != "asyncio":
        return anyio.current_time, anyio.current_effective_deadline
    loop = asyncio.get_running_loop()
    now = loop.time  # what anyio's current_time() reads
    if type(loop).time is asyncio.BaseEventLoop.time:
        now = time.monotonic  # what BaseEventLoop.time() returns, without its frame
    if _forced_off:
        return now, anyio.current_effective_deadline
    found = _asyncio_deadline()
    if isinstance(found, str):
        _missing("asyncio_deadline", found)
        return now, anyio.current_effective_deadline
    return now, found


def _asyncio_deadline() -> Callable[[], float] | str:
    """The current task's effective deadline read from anyio's scopes directly (what
    ``anyio.current_effective_deadline()`` computes), checked against anyio's own answer
    under nested, shielded and cancelled scopes; or why it cannot be."""
    try:
        deadline = _asyncio_deadline_reader()
        # (the caller may be inside scopes of its own, with deadlines of their own:
        # every answer is compared with anyio's, taken at the same place)
        effective = anyio.current_effective_deadline
        seen = [(deadline(), effective())]
        with anyio.CancelScope(deadline=anyio.current_time() + 1e6):  # noqa: ASYNC100
            seen.append((deadline(), effective()))
            with anyio.CancelScope(deadline=anyio.current_time() + 1):  # noqa: ASYNC100
                seen.append((deadline(), effective()))
                with anyio.CancelScope(shield=True):  # noqa: ASYNC100
                    seen.append((deadline(), math.inf))
            with anyio.CancelScope() as cancelled:  # noqa: ASYNC100
                cancelled.cancel()
                seen.append((deadline(), -math.inf))
        seen.append((deadline(), effective()))
        if any(got != want for got, want in seen):
            return f"it does not give the current deadline (read, expected: {seen})"
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        return repr(exc)
    return deadline


def _asyncio_deadline_reader() -> Callable[[], float]:
    from anyio._backends._asyncio import _task_states

    states: dict[Any, Any] = _task_states.data  # type: ignore[attr-defined]  # by weakref
    no_state = _NoState()
    loop = asyncio.get_running_loop()
    current = _current_tasks(loop)
    inf = math.inf
    # the running task, by a C call either way (3.11's public one makes a system call)
    task_of: Callable[[], Any] = (
        asyncio.current_task if current is None else partial(current.__getitem__, loop)
    )

    def deadline() -> float:
        scope = states.get(ref(task_of()), no_state).cancel_scope
        found = inf
        while scope is not None:
            if scope._deadline < found:
                found = scope._deadline
            if scope._cancel_called:
                return -inf
            if scope._shield:
                break
            scope = scope._parent_scope
        return found

    return deadline


# ---------------------------------------------------------------- anyio's streams

_TRANSPORT_METHODS = (
    "write",
    "close",
    "abort",
    "is_closing",
    "set_protocol",
    "pause_reading",
    "resume_reading",
    "get_write_buffer_size",
    "set_write_buffer_limits",
)
_TRIO_STREAMS = "anyio._backends._trio"


def _stream_parts(stream: Any) -> tuple[Any, Any] | str:
    """The transport and protocol under anyio's asyncio ``stream``, or why not."""
    transport: Any = getattr(stream, "_transport", None)
    protocol: Any = getattr(stream, "_protocol", None)
    # (uvloop's transports are not asyncio.Transport subclasses: look for the methods)
    lacking = [name for name in _TRANSPORT_METHODS if not hasattr(transport, name)]
    if lacking:
        return f"no transport at SocketStream._transport (no {', '.join(lacking)})"
    if not isinstance(getattr(protocol, "read_queue", None), deque):
        return "no deque at SocketStream._protocol.read_queue"
    if not (hasattr(protocol, "is_at_eof") and hasattr(protocol, "exception")):
        return "no is_at_eof and exception at SocketStream._protocol"
    return transport, protocol


def _on_asyncio() -> bool:
    try:
        return sniffio.current_async_library() == "asyncio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def take_transport(stream: Any) -> tuple[Any, bytes] | None:
    """The asyncio transport under anyio's socket ``stream``, and the bytes anyio had
    read but not handed out (they are the caller's now: the stream must not be read
    again). None off asyncio, when the connection is ending, or without the hook."""
    if _forced_off or not _on_asyncio():
        return None
    parts = _stream_parts(stream)
    if isinstance(parts, str):
        if isinstance(stream, SocketStream):  # anyio's own stream, but not as expected
            _missing("asyncio_pipe", parts)
        return None
    transport, protocol = parts
    if transport.is_closing() or protocol.is_at_eof or protocol.exception is not None:
        return None
    queue: deque[bytes] = protocol.read_queue
    leftover = b"".join(queue)
    queue.clear()
    return transport, leftover


def hold_reads(stream: Any) -> None:
    """Keep anyio's asyncio ``stream`` from reading ahead of its ``receive()`` calls.

    A stream anyio has just connected reads whatever arrives until a ``receive()``
    finds nothing queued, so the node dialled could have megabytes read before its
    WELCOME is checked. Paused, it reads only inside ``receive()``, which resumes
    reading while it waits. (Inbound connections never get such a stream before they
    are proven: see ``transport._accept``.) Nothing to do on trio, which reads only
    when asked."""
    if _forced_off or not _on_asyncio():
        return
    transport = _pausable(stream)
    if isinstance(transport, str):
        if isinstance(stream, SocketStream):
            _missing("asyncio_hold_reads", transport)
        return
    if not transport.is_closing():
        transport.pause_reading()


def _pausable(stream: Any) -> Any:
    """The transport under anyio's asyncio ``stream`` if it can pause reading, or why not
    (a str)."""
    transport: Any = getattr(stream, "_transport", None)
    if callable(getattr(transport, "pause_reading", None)) and hasattr(transport, "is_closing"):
        return transport
    return "no pause_reading() at SocketStream._transport"


def trio_socket(stream: Any) -> socket.socket | None:
    """On trio, the socket under anyio's plain trio ``SocketStream``, to write a lone
    frame to directly: trio keeps no send buffer, so such bytes stay in order with the
    stream's sends. None for any other stream (a TLS stream above all: its bytes must
    go through TLS), on other backends, or without the hook."""
    if _forced_off or not isinstance(stream, SocketStream):
        return None
    try:
        if sniffio.current_async_library() != "trio":
            return None
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if type(stream).__module__ != _TRIO_STREAMS:
        _missing("trio_lone_write", f"the stream is a {type(stream).__module__} one")
        return None
    raw = stream.extra(SocketAttribute.raw_socket, None)
    return raw if isinstance(raw, socket.socket) else None


# ---------------------------------------------------------------- the record


def running_backend() -> str:
    """The running event loop: "asyncio", "uvloop" or "trio" (or sniffio's name)."""
    name = sniffio.current_async_library()
    if name == "asyncio" and type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        return "uvloop"
    return name


_record: dict[tuple[str, str], str] | None = None  # (hook, backend) -> "" or why not
_record_lock = threading.Lock()


def installed_backends() -> list[str]:
    """The event loops Koala can run on here: asyncio, and uvloop and trio if present."""
    found = ["asyncio"]
    for name in ("uvloop", "trio"):
        try:
            __import__(name)
        except ImportError:
            continue
        found.append(name)
    return found


def hooks(backend: str | None = None) -> dict[str, bool]:
    """Which hooks work on the installed versions: ``{name: works}`` for every hook that
    applies here (on ``backend`` only, if given), all False when forced off. Probed
    once per process, on fresh event loops in a worker thread."""
    record = _probe_all()
    if backend is None:
        return _fold(record)
    return {name: not why for (name, on), why in record.items() if on == backend}


def _fold(record: dict[tuple[str, str], str]) -> dict[str, bool]:
    folded: dict[str, bool] = {}
    for (name, _), why in record.items():
        folded[name] = folded.get(name, True) and not why
    return folded


def problems() -> dict[str, str]:
    """For each hook that does not work here: which backends, and why."""
    found: dict[str, str] = {}
    for (name, on), why in _probe_all().items():
        if why:
            found[name] = f"{found[name]}; " if name in found else ""
            found[name] += f"on {on}: {why}"
    return found


def _probe_all() -> dict[tuple[str, str], str]:
    global _record
    with _record_lock:
        if _record is None:
            record: dict[tuple[str, str], str] = {}
            for backend in installed_backends():
                record.update(_probe_in_thread(backend))
            _record = record
        return _record


def _probe_in_thread(backend: str) -> dict[tuple[str, str], str]:
    names = [h.name for h in HOOKS if backend in h.backends and h.applies()]
    if _forced_off:
        return {(name, backend): f"forced off by {ENV_VAR}" for name in names}
    found: dict[str, str] = {}

    def run() -> None:
        anyio_backend = "trio" if backend == "trio" else "asyncio"
        options = {"use_uvloop": True} if backend == "uvloop" else {}
        try:
            found.update(anyio.run(_probe, backend=anyio_backend, backend_options=options))
        except Exception as exc:  # a probe that cannot run finds nothing
            found.update({name: f"the probe failed: {exc!r}" for name in names})

    thread = threading.Thread(target=run, name=f"koala-probe-{backend}", daemon=True)
    thread.start()
    thread.join()
    return {(name, backend): found.get(name, "not probed") for name in names}


async def _probe() -> dict[str, str]:
    """In a fresh loop: every hook of this backend, tried as it is used."""
    trio = sniffio.current_async_library() == "trio"
    found: dict[str, str] = {}
    marker = _make_marker("trio" if trio else "asyncio")
    found["trio_scope_marker" if trio else "asyncio_scope_marker"] = (
        marker if isinstance(marker, str) else ""
    )
    if not trio:
        if BY_NAME["asyncio_current_task"].applies():
            tasks = _probe_current_tasks(asyncio.get_running_loop())
            found["asyncio_current_task"] = tasks if isinstance(tasks, str) else ""
        deadline = _asyncio_deadline()
        found["asyncio_deadline"] = deadline if isinstance(deadline, str) else ""
    stream_hooks = ["trio_lone_write"] if trio else ["asyncio_pipe", "asyncio_hold_reads"]
    try:
        found.update(await _probe_streams(trio))
    except OSError as exc:  # no loopback here: the stream hooks cannot be seen
        found.update(
            {name: f"no loopback connection to probe with: {exc!r}" for name in stream_hooks}
        )
    return found


async def _probe_streams(trio: bool) -> dict[str, str]:
    """The stream hooks, tried on a loopback connection of this backend."""
    found: dict[str, str] = {}
    async with await anyio.create_tcp_listener(local_host="127.0.0.1") as listener:
        port = listener.extra(SocketAttribute.local_port)
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            if trio:
                is_trio = type(stream).__module__ == _TRIO_STREAMS
                raw = stream.extra(SocketAttribute.raw_socket, None)
                found["trio_lone_write"] = (
                    ""
                    if is_trio and isinstance(raw, socket.socket)
                    else f"the stream is a {type(stream).__module__} one"
                )
            else:
                parts = _stream_parts(stream)
                found["asyncio_pipe"] = parts if isinstance(parts, str) else ""
                pausable = _pausable(stream)
                found["asyncio_hold_reads"] = pausable if isinstance(pausable, str) else ""
    return found
