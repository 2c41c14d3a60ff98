"""A small WebSocket client for gateway tests and benchmarks: wsproto over anyio sockets,
so it runs the same on asyncio, uvloop and trio, and can send what a polite client would
not. ``first_packet`` signs a first packet with ``KEY`` unless given another key, with a
random ``nonce`` field so that no two are alike (the gateway refuses a replayed one)."""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ByteStream
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from ..gateway import sign

KEY = "test-gateway-key"


@dataclass(frozen=True)
class Closed:
    code: int
    reason: str


class WSClient:
    def __init__(self, stream: ByteStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.closed: Closed | None = None
        self._parts: list[Any] = []
        self._inbox: list[str | bytes] = []

    async def _handshake(self, host: str) -> None:
        await self.stream.send(self.ws.send(Request(host=host, target="/")))
        while True:
            self.ws.receive_data(await self.stream.receive())
            for ev in self.ws.events():
                if isinstance(ev, AcceptConnection):
                    return
                if isinstance(ev, RejectConnection):
                    raise ConnectionError(f"rejected: {ev.status_code}")

    async def send(self, data: str | bytes) -> None:
        if self.closed is not None:
            raise ConnectionError(f"closed: {self.closed}")
        await self.stream.send(self.ws.send(_message(data)))

    async def send_many(self, frames: list[str | bytes]) -> None:
        """Several frames in one write (so a close in between cannot break the write)."""
        await self.stream.send(b"".join(self.ws.send(_message(f)) for f in frames))

    async def send_json(self, obj: Any) -> None:
        await self.send(json.dumps(obj))

    async def receive(self) -> str | bytes | Closed:
        """The next message, or Closed(code, reason) once the server closed."""
        while True:
            for ev in self.ws.events():
                if isinstance(ev, (TextMessage, BytesMessage)):
                    self._parts.append(ev.data)
                    if ev.message_finished:
                        if isinstance(ev, TextMessage):
                            self._inbox.append("".join(self._parts))
                        else:
                            self._inbox.append(b"".join(self._parts))
                        self._parts = []
                elif isinstance(ev, CloseConnection):
                    self.closed = Closed(ev.code, ev.reason or "")
                    with suppress(Exception):
                        await self.stream.send(self.ws.send(ev.response()))
                elif isinstance(ev, Ping):
                    with suppress(Exception):
                        await self.stream.send(self.ws.send(ev.response()))
            if self._inbox:
                return self._inbox.pop(0)
            if self.closed is not None:
                return self.closed
            try:
                data = await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                self.closed = Closed(1006, "connection lost")
                continue
            self.ws.receive_data(data)

    async def expect_close(self, within: float = 5.0) -> Closed:
        """Read until the server closes; the close code and reason."""
        with anyio.fail_after(within):
            while True:
                item = await self.receive()
                if isinstance(item, Closed):
                    return item

    async def close(self, code: int = 1000) -> None:
        if self.closed is None:
            with suppress(Exception):
                await self.stream.send(self.ws.send(CloseConnection(code=code)))
        await self.stream.aclose()


def _message(data: str | bytes) -> Message[Any]:
    return TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)


@asynccontextmanager
async def connect(
    address: tuple[str, int], *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[WSClient]:
    """A WebSocket to the gateway at ``address``: ws, or wss with ``ssl_context`` (the
    server's name checked against the host part of ``address``)."""
    stream: ByteStream
    if ssl_context is None:
        stream = await anyio.connect_tcp(*address)
    else:
        stream = await anyio.connect_tcp(
            *address,
            ssl_context=ssl_context,
            tls_hostname=address[0],
            tls_standard_compatible=False,  # a close need not wait for the TLS goodbye
        )
    client = WSClient(stream)
    try:
        with anyio.fail_after(5):
            await client._handshake(f"{address[0]}:{address[1]}")
        yield client
    finally:
        with anyio.CancelScope(shield=True):
            await client.close()


def first_packet(
    open_id: str = "u1",
    *,
    key: str = KEY,
    mode: str = "sha256",
    timestamp: int | None = None,
    nonce: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A signed first packet; ``nonce`` is random unless given ("" leaves it out)."""
    fields: dict[str, Any] = {
        "open_id": open_id,
        "server_id": "1",
        "timestamp": int(time.time()) if timestamp is None else timestamp,
        **extra,
    }
    if nonce != "":
        fields["nonce"] = secrets.token_hex(8) if nonce is None else nonce
    return sign(fields, key, mode)


@asynccontextmanager
async def session(
    address: tuple[str, int],
    actor_type: str = "EchoClient",
    actor_id: str | int = "a1",
    *,
    ssl_context: ssl.SSLContext | None = None,
    **kw: Any,
) -> AsyncIterator[WSClient]:
    """A connected client that sent a valid first packet binding it to the actor."""
    async with connect(address, ssl_context=ssl_context) as client:
        await client.send_json(first_packet(actor_type=actor_type, actor_id=actor_id, **kw))
        yield client
