"""How a channel's frames leave: one small interface, two writers, one corking rule.

A :class:`Writer` takes whole frames (a request's carries its id, reported through
``on_written`` once the frame has left, so the channel knows the call may have run) and
never writes half of one. There are two:

- :class:`StreamWriter`, over anyio's byte stream (trio, TLS, and asyncio with
  ``direct_io`` off): a bounded outbox; the first task that finds no writer busy writes
  it, joining the frames queued meanwhile into one ``send``; on trio a lone frame goes
  straight to the socket, without a checkpoint.
- ``_pipe.Pipe``, asyncio's transport driven by callbacks: ``transport.write``, which
  never blocks, paused above the transport's high-water mark.

Both cork the same way (:class:`Cork`), and both bound memory: a frame that may wait
waits for room (up to its call's deadline), a control frame that cannot wait
(``write_control``) is refused when there is none, and the channel closes or drops it.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import anyio
from anyio.abc import ByteStream, TaskGroup

# A burst larger than this is written in several sends.
COALESCE_BYTES = 256 * 1024


class NotSent(Exception):
    """The frame never left this process, so a request in it is safe to send again.

    Internal to the transport (not a KoalaError): ``Transport.call`` sends such a
    request once more on a fresh connection, and ``Channel.send_event`` reports it as
    HostUnavailableError."""


class Cork:
    """The corking rule of both writers. Open, the next frame leaves at once and shuts
    it; shut, frames wait to leave together in one write, and it opens again when they
    have left or when bytes arrive with nothing waiting (a new exchange). A lone call,
    or the answer to one, pays no delay; a burst costs a few writes, not one each."""

    __slots__ = ("shut",)

    def __init__(self) -> None:
        self.shut = False

    def take(self) -> bool:
        """Whether a frame may leave at once (it then shuts the cork)."""
        if self.shut:
            return False
        self.shut = True
        return True

    def open(self) -> None:
        self.shut = False


class Writer(Protocol):
    """What a channel needs of its writer (see the module docstring)."""

    @property
    def io(self) -> str:
        """How bytes leave, for statistics: "pipe", "stream+socket" or "stream"."""
        ...

    def try_write(self, data: bytes, rid: int = 0) -> bool:
        """Write (or queue) ``data`` if that needs no wait; False: call ``write``."""
        ...

    async def write(self, data: bytes, rid: int = 0, deadline: float = math.inf) -> None:
        """Write ``data``, waiting for room until ``deadline`` (TimeoutError after it);
        NotSent if the channel stopped first."""
        ...

    def write_control(self, data: bytes) -> bool:
        """Queue a frame that cannot wait, from synchronous code; False: no room."""
        ...

    def hold(self) -> None:
        """The channel's serving task starts a batch: hold its answers back (all but
        one that may leave at once) until ``release`` or ``release_now``."""
        ...

    def release(self) -> None:
        """Stop holding; what was held leaves soon, written by a task of its own."""
        ...

    def release_now(self) -> bool:
        """Stop holding; True if the caller, free to write now, should ``flush``."""
        ...

    async def flush(self) -> None:
        """Write what is queued, in this task."""
        ...

    def stop(self) -> None:
        """The channel is closing: refuse new frames (NotSent), wake waiting writers."""
        ...

    def abandon(self) -> None:
        """Forget the frames not written yet (their calls fail as not sent)."""
        ...

    async def close(self, last: bytes) -> None:
        """Write ``last`` (a CLOSE frame, or b"") after what has left, then close."""
        ...


class StreamWriter:
    """Frames to anyio's ``stream``, through a bounded outbox (see the module docstring).

    ``raw`` is the stream's socket on trio (``koala._loop.trio_socket``), for lone
    frames: trio keeps no send buffer, so bytes written there stay in order with the
    stream's sends. ``on_broken`` is told when a send fails (the channel closes)."""

    def __init__(
        self,
        stream: ByteStream,
        raw: socket.socket | None,
        max_frames: int,
        on_written: Callable[[int], None],
        on_broken: Callable[[str], None],
    ) -> None:
        self.stream = stream
        self.raw = raw
        self._limit = max_frames
        self._on_written = on_written
        self._on_broken = on_broken
        self._outbox: deque[tuple[bytes, int]] = deque()  # frames to write, request id
        self._writing = False  # a task holds the writer's role: it is in _drain
        self._holding = False  # the serving task's answers wait for its batch to end
        self._space: anyio.Event | None = None  # set when a full outbox drains
        self._cork = Cork()
        self._tg: TaskGroup | None = None
        self.stopped = False

    @property
    def io(self) -> str:
        return "stream+socket" if self.raw is not None else "stream"

    def start(self, tg: TaskGroup) -> None:
        """Where write tasks run (``release``, ``write_control``)."""
        self._tg = tg

    def received(self) -> None:
        """Bytes arrived: a new exchange, whose first frame may leave at once."""
        self._cork.open()

    def try_write(self, data: bytes, rid: int = 0) -> bool:
        outbox = self._outbox
        if self.stopped or self._holding or len(outbox) >= self._limit:
            return False
        if self._writing:  # the task writing takes it along
            outbox.append((data, rid))
            return True
        if outbox or self.raw is None or not self._cork.take():
            return False  # it must be written by a send of this task: write() does that
        outbox.append((data, rid))
        if not self._send_raw():
            self._write_later()  # the socket took part of it: a task writes the rest
        return True

    async def write(self, data: bytes, rid: int = 0, deadline: float = math.inf) -> None:
        """Queue a frame; if no task is writing, write the queue now, in this task.

        Whoever finds the writer idle becomes the writer and also writes what other
        tasks queue meanwhile, so a lone call costs no task switch and a burst of
        frames goes out in a few large sends."""
        outbox, limit = self._outbox, self._limit
        if self._holding:  # the batch's answers leave together when it ends
            if len(outbox) >= limit and not self._writing:
                await self.flush()
            if len(outbox) < limit:
                if self.stopped:
                    raise NotSent("the connection closed")
                outbox.append((data, rid))
                self._write_lone()  # the first one leaves at once
                return
        if len(outbox) >= limit and not self.stopped:
            if deadline == math.inf:
                await self._room()
            else:
                with anyio.fail_at(deadline):  # waiting for room is bounded too
                    await self._room()
        if self.stopped:
            raise NotSent("the connection closed")
        outbox.append((data, rid))
        if not self._writing and not self._write_lone():
            await self.flush()

    async def _room(self) -> None:
        while len(self._outbox) >= self._limit and not self.stopped:
            if self._space is None:
                self._space = anyio.Event()
            await self._space.wait()

    def write_control(self, data: bytes) -> bool:
        if len(self._outbox) >= self._limit:
            return False
        self._outbox.append((data, 0))
        self._write_lone()
        self._write_later()
        return True

    def hold(self) -> None:
        self._holding = True

    def release(self) -> None:
        self._holding = False
        self._write_later()

    def release_now(self) -> bool:
        self._holding = False
        return bool(self._outbox) and not self._writing and not self.stopped

    async def flush(self) -> None:
        """Write the outbox, in this task (the caller checked no task is writing)."""
        self._writing = True
        try:
            with anyio.CancelScope(shield=True):  # a frame is never half written
                await self._drain()
        finally:
            self._writing = False

    def _write_later(self) -> None:
        """Have a task of its own write the outbox, unless one is writing already."""
        if self._outbox and not self._writing and not self.stopped and self._tg is not None:
            self._writing = True
            self._tg.start_soon(self._drain_task, name="koala-write")

    async def _drain_task(self) -> None:
        try:
            await self._drain()
        finally:
            self._writing = False

    def _write_lone(self) -> bool:
        """Write the outbox's only frame straight to the socket (trio), if no send is in
        progress (its bytes come first) and the cork is open. True if nothing is left
        to write."""
        if self.raw is None or self._writing or len(self._outbox) != 1 or not self._cork.take():
            return False
        return self._send_raw()

    def _send_raw(self) -> bool:
        """Write the one queued frame straight to the (non-blocking) socket: no
        checkpoint, no shielded scope. True if nothing is left to write; else the rest
        stays queued for _drain."""
        assert self.raw is not None
        data, rid = self._outbox[0]
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._on_broken(f"the connection broke: {exc!r}")
            return True
        if rid:
            self._on_written(rid)
        if sent == len(data):
            self._outbox.popleft()
            return True
        self._outbox[0] = (data[sent:], 0)
        return False

    async def _drain(self) -> None:
        outbox, on_written = self._outbox, self._on_written
        while outbox and not self.stopped:
            batch: list[bytes] = []
            size = 0
            while outbox and size < COALESCE_BYTES:
                data, rid = outbox.popleft()
                batch.append(data)
                size += len(data)
                if rid:
                    on_written(rid)  # from here on it may reach the peer
            if self._space is not None:
                self._space.set()
                self._space = None
            try:
                await self.stream.send(batch[0] if len(batch) == 1 else b"".join(batch))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self._on_broken(f"the connection broke: {exc!r}")
                return
        self._cork.open()  # what waited has left

    def stop(self) -> None:
        self.stopped = True
        if self._space is not None:
            self._space.set()

    def abandon(self) -> None:
        self._outbox.clear()
        if self._space is not None:
            self._space.set()

    async def close(self, last: bytes) -> None:
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(1.0):
                if last and not self._writing:
                    with contextlib.suppress(Exception):
                        await self.stream.send(last)
            await anyio.aclose_forcefully(self.stream)
