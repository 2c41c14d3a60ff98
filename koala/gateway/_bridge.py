"""The host's end of cluster-mode gateways: wire events in, actor hooks, pushes back.

A cluster gateway (:class:`~koala.gateway._cluster.ClusterLink`) dials the host of a
session's actor and sends CLIENT_OPENED / CLIENT_MESSAGE / CLIENT_CLOSED on that
connection. :class:`HostBridge` is the host's ``Transport.on_event``: it hands each
event to the host's :class:`~koala.gateway._session.ClientHub` with the connection as
the session's owner (so session ids of different gateways never collide), and what the
actors push goes back on the same connection as PUSH_TO_CLIENT / CLOSE_CLIENT. When a
gateway's connection ends, its sessions end with it (``on_client_close`` runs).

Install it with ``bridge = HostBridge(runtime)``, ``transport.on_event = bridge.on_event``
and ``task_group.start_soon(bridge.run)`` (``koala host`` does).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from ..transport import (
    Channel,
    ClientClosed,
    ClientMessage,
    ClientOpened,
    CloseClient,
    Event,
    PushToClient,
)
from ._codes import ClientCloseCode, valid_actor_close_code
from ._session import Data, SessionClosedError, hub_for

if TYPE_CHECKING:
    from .._runtime import Runtime

log = logging.getLogger("koala.gateway")

REBIND_KEY = "koala.rebind"  # CLIENT_OPENED metadata: "1" on a re-bind (never shown to actors)
DEFAULT_BRIDGE_QUEUE = 1024  # refusals and new connections waiting for the bridge's task


def wire_close_code(code: int) -> int:
    """CLOSE_CLIENT carries 1000 or 3000-4999; the gateway's own 1001 and 1011 refusals
    (host draining, ``on_client_open`` raised) travel as 4011 (UNAVAILABLE)."""
    return code if valid_actor_close_code(code) else int(ClientCloseCode.UNAVAILABLE)


class _ChannelOutlet:
    """Where the actors of this host push to the sessions of one gateway connection."""

    __slots__ = ("channel",)

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    async def push(self, session_id: int, data: Data) -> None:
        try:
            await self.channel.send_event(PushToClient(session_id, data))
        except Exception:
            if not self.channel.closed:
                raise
            raise SessionClosedError(
                f"session {session_id} is closed: the connection to its gateway was lost"
            ) from None

    async def close(self, session_id: int, code: int, reason: str) -> None:
        try:
            await self.channel.send_event(CloseClient(session_id, reason, wire_close_code(code)))
        except Exception:
            if not self.channel.closed:
                raise


class HostBridge:
    """Routes gateway events from the host's transport to its client hub (and back)."""

    def __init__(self, runtime: Runtime, *, queue_size: int = DEFAULT_BRIDGE_QUEUE) -> None:
        self.runtime = runtime
        self.hub = hub_for(runtime)
        self._outlets: dict[Channel, _ChannelOutlet] = {}
        self._queue_size = queue_size
        self._todo, self._jobs = anyio.create_memory_object_stream[
            tuple[Channel, CloseClient | None]
        ](queue_size)

    def on_event(self, channel: Channel, ev: Event) -> None:
        """The transport's ``on_event``: called in the connection's reader, in order."""
        outlet = self._outlets.get(channel)
        if outlet is None:
            if channel.closed:
                return
            outlet = self._outlets[channel] = _ChannelOutlet(channel)
            self._later(channel, None)  # watch it: its sessions end with it
        kind = type(ev)
        refused: tuple[int, str] | None = None
        if kind is ClientOpened:
            assert isinstance(ev, ClientOpened)
            metadata = dict(ev.metadata)
            rebind = metadata.pop(REBIND_KEY, "") == "1"
            refused = self.hub.open(
                channel, outlet, ev.session_id, ev.actor_type, ev.key, metadata, rebind=rebind
            )
        elif kind is ClientMessage:
            assert isinstance(ev, ClientMessage)
            refused = self.hub.message(channel, ev.session_id, ev.payload)
        elif kind is ClientClosed:
            assert isinstance(ev, ClientClosed)
            self.hub.closed(channel, ev.session_id, ev.reason)
        else:  # PUSH_TO_CLIENT / CLOSE_CLIENT go to gateways, not hosts
            log.debug("connection %s: ignoring %s (a host does not take it)", channel.name, ev)
            return
        if refused is not None:
            code, reason = refused
            assert isinstance(ev, (ClientOpened, ClientMessage))
            self._later(channel, CloseClient(ev.session_id, reason, wire_close_code(code)))

    def _later(self, channel: Channel, ev: CloseClient | None) -> None:
        try:
            self._todo.send_nowait((channel, ev))
        except anyio.WouldBlock:
            # never drop a refusal silently: the gateway fails its sessions over instead
            log.error("gateway bridge: %d jobs waiting; closing %s", self._queue_size, channel)
            channel.close("the host cannot keep up with this gateway")

    async def run(self) -> None:
        """Send refusals and watch gateway connections, until cancelled."""
        async with self._jobs, anyio.create_task_group() as tg:
            async for channel, ev in self._jobs:
                if ev is None:
                    tg.start_soon(self._watch, channel)
                elif not channel.closed:
                    try:
                        await channel.send_event(ev)
                    except Exception:
                        log.debug("refusal not sent to %s", channel, exc_info=True)

    async def _watch(self, channel: Channel) -> None:
        await channel.wait_closed()
        self._outlets.pop(channel, None)
        sessions = self.hub.sessions_from(channel)
        if sessions:
            log.info(
                "the gateway connection %s ended: closing its %d session(s)",
                channel.name,
                len(sessions),
            )
        for sess in sessions:
            self.hub.closed(channel, sess.session_id, "the gateway connection was lost")
