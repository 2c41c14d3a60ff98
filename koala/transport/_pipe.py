"""The asyncio fast path of a channel: its socket's bytes without anyio's stream.

anyio's asyncio ``SocketStream`` spends, per frame, a trip through the event loop
before each send (a checkpoint) and two changes of the socket's epoll registration per
receive (reading is paused between receives), and the channel needs a reader task to
call it. On asyncio (and uvloop) a channel therefore takes the stream's transport over
once the handshake is done: bytes arrive in ``buffer_updated``, which decodes and
dispatches frames at once (a response wakes its caller directly), and frames leave
through ``transport.write``, which never blocks and never writes half a frame.

Writes are corked: the first frame written since bytes last arrived goes out at once
(a lone call, or the answer to one, pays no delay), and frames written after it leave
together in one ``write`` at the next iteration of the event loop. Memory is bounded
by the transport's write-buffer limits, with the frames held for the next write
counted in: above them the pipe is paused and writers wait.

Taking the transport over relies on where anyio keeps it (``_transport``,
``_protocol.read_queue``), which only ``koala._loop`` knows; :func:`takeover` returns
None when it is not there (or ``KOALA_NO_LOOP_HOOKS`` is set), and the channel keeps
using the stream.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import sniffio

from .._loop import hold_reads as hold_reads
from .._loop import take_transport
from ._writers import Cork, NotSent

# Above this many bytes buffered in the transport, writers wait (the peer is slow).
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024
# Bytes read at most per receive, into one buffer kept for the connection's life: a
# plain protocol would get a new bytes object per receive, which asyncio allocates at
# 256 KiB and shrinks (an mmap, an mremap and a munmap each time, about 12 us here).
READ_SIZE = 64 * 1024

Data = bytes | bytearray | memoryview


class Pipe(asyncio.BufferedProtocol):
    """A connection's transport, driven by callbacks (see the module docstring); the
    channel's reader and its writer (``_writers.Writer``) on asyncio."""

    io = "pipe"

    def __init__(
        self,
        transport: asyncio.Transport,
        on_data: Callable[[Data], None],
        on_lost: Callable[[str], None],
        on_written: Callable[[int], None],
        max_frames: int,
    ) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        # the callbacks run in the context of the task that took the transport over, so
        # anyio (through sniffio) knows its backend there, as it does in a task
        self._context = contextvars.copy_context()
        self._context.run(sniffio.current_async_library_cvar.set, "asyncio")
        self._on_data = on_data
        self._on_lost = on_lost
        self._on_written = on_written  # a request's frame has left: its id
        self._max_frames = max_frames  # held frames that refuse a control frame
        self._cork = Cork()
        self._held: deque[tuple[bytes, int]] = deque()
        self._held_bytes = 0
        self._paused = False
        self._resumed: anyio.Event | None = None
        self.lost = False  # the transport is gone
        self.stopped = False  # the channel is closing: no new frames
        self._inbox = memoryview(bytearray(READ_SIZE))

    # ------------------------------------------------------------ asyncio.Protocol

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._inbox

    def buffer_updated(self, nbytes: int) -> None:
        # on_data copies what it keeps: the buffer is read into again next time
        self.data_received(self._inbox[:nbytes])

    def data_received(self, data: Data) -> None:
        """The bytes of one receive (also what a transport that was already reading
        before the protocol changed may still deliver this way)."""
        if not self._held:
            self._cork.open()  # a new exchange: its first frame leaves at once
        self._context.run(self._on_data, data)

    def eof_received(self) -> bool:
        self._context.run(self._on_data, b"")
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._resumed is not None:
            self._resumed.set()
        reason = f"the connection broke: {exc!r}" if exc else "the connection ended"
        self._context.run(self._on_lost, reason)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    # ------------------------------------------------------------ writing

    @property
    def paused(self) -> bool:
        """Whether writers must wait: the transport holds more than its high-water
        mark, or the frames held for the next write come to that much."""
        return self._paused or self._held_bytes >= HIGH_WATER

    def overfull(self, max_frames: int) -> bool:
        """Whether a frame that cannot wait must be refused: ``max_frames`` are held
        for the next write, or four times the high-water mark waits to be written."""
        waiting = self._held_bytes + self.transport.get_write_buffer_size()
        return len(self._held) >= max_frames or waiting > 4 * HIGH_WATER

    def try_write(self, data: bytes, rid: int = 0) -> bool:
        """Send a frame now unless writers must wait (False: call ``write``)."""
        if self._paused or self._held_bytes >= HIGH_WATER or self.stopped:
            return False
        self._put(data, rid)
        return True

    async def write(self, data: bytes, rid: int = 0, deadline: float = math.inf) -> None:
        if self.paused:
            if deadline == math.inf:
                await self.writable()
            else:
                with anyio.fail_at(deadline):  # waiting for room is bounded too
                    await self.writable()
        if self.stopped:
            raise NotSent("the connection closed")
        self._put(data, rid)

    def write_control(self, data: bytes) -> bool:
        if self.overfull(self._max_frames):
            return False
        self._put(data)
        return True

    def _put(self, data: bytes, rid: int = 0) -> None:
        """Send a frame: at once if the cork is open, else with the next batch. ``rid``
        (a request's id, or 0) is reported to ``on_written`` once the frame is handed
        to the transport."""
        if self.lost:
            return
        if not self._cork.take():
            if not self._held:
                self.loop.call_soon(self._uncork, context=self._context)
            self._held.append((data, rid))
            self._held_bytes += len(data)
            return
        if self._send(data) and rid:
            self._on_written(rid)

    # the serving task's batches need no holding here: the cork joins its answers
    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass

    def release_now(self) -> bool:
        return False

    async def flush(self) -> None:
        pass

    def _send(self, data: bytes) -> bool:
        """Hand ``data`` to the transport; False if it is closed already (uvloop raises
        then, before ``connection_lost`` arrives): the bytes were not written."""
        try:
            self.transport.write(data)
        except RuntimeError:
            self.lost = True
            return False
        return True

    def _uncork(self) -> None:
        held = self._held
        if held and not self.lost:
            data = held[0][0] if len(held) == 1 else b"".join([frame for frame, _ in held])
            if self._send(data):
                for _, rid in held:
                    if rid:
                        self._on_written(rid)
        held.clear()
        self._held_bytes = 0
        self._cork.open()
        if not self._paused and self._resumed is not None:  # writers waited for these
            self._resumed.set()
            self._resumed = None

    async def writable(self) -> None:
        """Return once the transport's buffer is below its high-water mark."""
        while self.paused and not self.lost and not self.stopped:
            if self._resumed is None:
                self._resumed = anyio.Event()
            await self._resumed.wait()

    def stop(self) -> None:
        self.stopped = True
        if self._resumed is not None:
            self._resumed.set()
            self._resumed = None

    def abandon(self) -> None:
        """Forget the frames not written yet."""
        self._held.clear()
        self._held_bytes = 0

    async def close(self, last: bytes = b"") -> None:
        """Write ``last`` after what is buffered, then close: the buffer is flushed, for
        at most a second (a peer that does not read is cut off)."""
        if not self.lost:
            self._uncork()
            if last:
                self._send(last)
            self.transport.close()
            self.loop.call_later(1.0, self.transport.abort)


def takeover(
    stream: Any,
    on_data: Callable[[Data], None],
    on_lost: Callable[[str], None],
    on_written: Callable[[int], None],
    max_frames: int,
) -> tuple[Pipe, bytes] | None:
    """Take the asyncio transport of anyio's socket ``stream`` over (call it from a task,
    between two receives): the pipe and the bytes anyio had read but not handed out.
    None on trio, or when the transport cannot be had (see ``koala._loop``)."""
    taken = take_transport(stream)
    if taken is None:
        return None
    transport, leftover = taken
    pipe = Pipe(transport, on_data, on_lost, on_written, max_frames)
    transport.set_protocol(pipe)
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
    transport.resume_reading()
    return pipe, leftover
