"""Accepting connections without reading ahead of the protocol.

anyio's asyncio streams read whatever arrives from the moment a connection is accepted
until a ``receive()`` finds nothing queued; uvloop reads up to 32 times 256 KiB per
turn of its loop, so a stranger blasting bytes had megabytes read for it before its
first frame was even looked at (128 such connections grew a uvloop host by 149 MB,
measured). So a listener here accepts raw sockets itself and reads a stranger's bytes
only when the handshake asks for them (:class:`StrangerStream`: ``recv`` of at most
what is asked, when the socket is readable). Once the peer is proven, the socket is
handed to anyio as a normal stream (``SocketStream.from_socket``), for the channel's
usual paths. The same code runs on asyncio, uvloop and trio: ``wait_readable`` and
``wait_writable`` are anyio's.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream, TaskGroup

log = logging.getLogger("koala.transport")

# Bytes a stranger's receive() returns at most (its handshake needs a few hundred).
STRANGER_READ = 16 * 1024
# Pause after accept() fails for want of file descriptors, before trying again.
ACCEPT_BACKOFF = 0.1


class StrangerStream(ByteStream):
    """A raw socket read only on request; :meth:`hand_over` makes it anyio's stream,
    after which this one forwards to it (so a TLS session begun over it goes on)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.stream: SocketStream | None = None  # anyio's, once handed over

    async def hand_over(self) -> SocketStream:
        if self.stream is None:
            self.stream = await SocketStream.from_socket(self.sock)
        return self.stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        if self.stream is not None:
            return await self.stream.receive(max_bytes)
        while True:
            await anyio.wait_readable(self.sock)
            try:
                data = self.sock.recv(min(max_bytes, STRANGER_READ))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            if not data:
                raise anyio.EndOfStream
            return data

    async def send(self, item: bytes) -> None:
        if self.stream is not None:
            await self.stream.send(item)
            return
        view = memoryview(item)
        while view:
            await anyio.wait_writable(self.sock)
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise anyio.BrokenResourceError from exc
            view = view[sent:]

    async def send_eof(self) -> None:
        if self.stream is not None:
            await self.stream.send_eof()
        else:
            self.sock.shutdown(socket.SHUT_WR)

    async def aclose(self) -> None:
        if self.stream is not None:
            await anyio.aclose_forcefully(self.stream)
        elif self.sock.fileno() >= 0:
            anyio.notify_closing(self.sock)
            self.sock.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        if self.stream is not None:
            return self.stream.extra_attributes
        sock = self.sock
        return {
            SocketAttribute.family: lambda: sock.family,
            SocketAttribute.raw_socket: lambda: sock,
            SocketAttribute.local_address: lambda: sock.getsockname(),
            SocketAttribute.remote_address: lambda: sock.getpeername(),
        }


async def accept_forever(
    listener: socket.socket,
    handle: Callable[[StrangerStream], Coroutine[Any, Any, None]],
    tg: TaskGroup,
) -> None:
    """Accept connections on ``listener`` (a listening socket) and start ``handle`` on
    each in ``tg``. A failure to accept (out of file descriptors) pauses, never ends it."""
    listener.setblocking(False)
    while True:
        await anyio.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                log.warning("cannot accept a connection: %s; trying again shortly", exc)
                await anyio.sleep(ACCEPT_BACKOFF)
            continue  # ECONNABORTED and the like: that connection is gone
        tg.start_soon(handle, StrangerStream(sock))
