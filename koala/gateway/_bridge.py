"""The host's end of cluster-mode gateways: wire events in, actor hooks, pushes back.

A cluster gateway (:class:`~koala.gateway._cluster.ClusterLink`) dials the host of a
session's actor and sends CLIENT_OPENED / CLIENT_MESSAGE / CLIENT_CLOSED on that
connection. :class:`HostBridge` is the host's ``Transport.on_event``: it hands each
event to the host's :class:`~koala.gateway._session.ClientHub` with the connection as
the session's owner (so session ids of different gateways never collide), and what the
actors push goes back on the same connection as PUSH_TO_CLIENT / CLOSE_CLIENT. When a
gateway's connection ends, its sessions end with it (``on_client_close`` runs).

Placement: the gateway puts, in CLIENT_OPENED's metadata (``koala.placement``), the
placement ticket the PD answered for the actor (hex). The bridge opens the session only
if this host's directory holds the actor's position or takes it on that ticket
(``ClusterDirectory.claim``: its own, current, not given back), and checks it again
before each frame's turn (the position may have been given back since, when the actor
was deactivated, or the host fenced and re-registered). Otherwise it runs nothing,
answers CLOSE_CLIENT marked ``misplaced`` once, and drops the session's
frames until the gateway binds it again (they are unacknowledged, so the gateway sends
them again after the re-bind): a stale PD answer never opens a second activation.

Frames with a sequence number are acknowledged (CLIENT_ACK) once their turn has run.

Install it with ``bridge = HostBridge(runtime)``, ``transport.on_event = bridge.on_event``
and ``task_group.start_soon(bridge.run)`` (``koala host`` does).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import anyio

from .._messages import Key
from .._seams import LOCAL
from ..pd import ClusterDirectory
from ..transport import (
    Channel,
    ClientClosed,
    ClientMessage,
    ClientOpened,
    CloseClient,
    Event,
    PushToClient,
)
from ..wire._events import ClientAck, valid_client_close_code
from ._codes import ClientCloseCode
from ._session import Data, SessionClosedError, hub_for

if TYPE_CHECKING:
    from ..host import Runtime

log = logging.getLogger("koala.gateway")

# CLIENT_OPENED metadata the bridge removes (actors never see them):
REBIND_KEY = "koala.rebind"  # "1" on a re-bind
PLACEMENT_KEY = "koala.placement"  # the PD's placement ticket for the actor (hex)
DEFAULT_BRIDGE_QUEUE = 1024  # refusals and new connections waiting for the bridge's task
MAX_MISPLACED = 4096  # sessions per gateway connection whose frames are being dropped


def wire_close_code(code: int) -> int:
    """CLOSE_CLIENT carries 1000, 1001, 1011 and 3000-4999 as themselves; anything else
    travels as 4011 (UNAVAILABLE)."""
    code = int(code)  # a ClientCloseCode is an int, but not of type int
    return code if valid_client_close_code(code) else int(ClientCloseCode.UNAVAILABLE)


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

    async def ack(self, session_id: int, seq: int) -> None:
        try:
            await self.channel.send_event(ClientAck(session_id, seq))
        except Exception:
            if not self.channel.closed:
                raise


class HostBridge:
    """Routes gateway events from the host's transport to its client hub (and back)."""

    def __init__(self, runtime: Runtime, *, queue_size: int = DEFAULT_BRIDGE_QUEUE) -> None:
        self.runtime = runtime
        self.hub = hub_for(runtime)
        self._outlets: dict[Channel, _ChannelOutlet] = {}
        # per gateway connection: sessions refused as misplaced, whose frames are dropped
        self._misplaced: dict[Channel, OrderedDict[int, None]] = {}
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
            placement = metadata.pop(PLACEMENT_KEY, "")
            why = self._misplacement(ev.actor_type, ev.key, placement)
            if why is not None:
                self._misplace(channel, ev.session_id, why)
                return
            self._placed(channel, ev.session_id)
            refused = self.hub.open(
                channel,
                outlet,
                ev.session_id,
                ev.actor_type,
                ev.key,
                metadata,
                rebind=rebind,
                placement=placement,
            )
        elif kind is ClientMessage:
            assert isinstance(ev, ClientMessage)
            dropped = self._misplaced.get(channel)
            if dropped is not None and ev.session_id in dropped:
                return  # not run, not acknowledged: the gateway sends it again after re-binding
            sess = self.hub.session(channel, ev.session_id)
            if sess is not None and not sess.closed:
                why = self._misplacement(sess.actor_type, sess.key, sess._placement)
                if why is not None:
                    self.hub.closed(channel, ev.session_id, "the actor is not placed on this host")
                    self._misplace(channel, ev.session_id, why)
                    return
            refused = self.hub.message(channel, ev.session_id, ev.payload, ev.seq)
        elif kind is ClientClosed:
            assert isinstance(ev, ClientClosed)
            self._placed(channel, ev.session_id)
            self.hub.closed(channel, ev.session_id, ev.reason)
        else:  # PUSH_TO_CLIENT / CLOSE_CLIENT / CLIENT_ACK go to gateways, not hosts
            log.debug("connection %s: ignoring %s (a host does not take it)", channel.name, ev)
            return
        if refused is not None:
            code, reason = refused
            assert isinstance(ev, (ClientOpened, ClientMessage))
            self._later(channel, CloseClient(ev.session_id, reason, wire_close_code(code)))

    # ------------------------------------------------------------ placement

    def _misplacement(self, actor_type: str, key: Key, placement: str) -> str | None:
        """Why this host must not run turns of a session of (actor_type, key) bound under
        ``placement`` (the PD's ticket), or None if it may. A host without a cluster
        directory (a single process) places every actor on itself."""
        directory = self.runtime.directory
        if not isinstance(directory, ClusterDirectory):
            return None
        if not directory.serving:
            return "this host is not serving (fenced, or not registered yet)"
        if directory.lookup(actor_type, key) == LOCAL:
            return None
        try:
            ticket = bytes.fromhex(placement)
        except ValueError:
            ticket = b""
        if directory.claim(actor_type, key, ticket):
            return None
        return (
            f"{actor_type}/{key!r} is not placed on this host (server {directory.server_id}), "
            "or its position was given back since the session was bound"
        )

    def _misplace(self, channel: Channel, session_id: int, why: str) -> None:
        """Refuse the session once (CLOSE_CLIENT marked misplaced); drop its frames."""
        dropped = self._misplaced.setdefault(channel, OrderedDict())
        if session_id in dropped:
            return
        dropped[session_id] = None
        if len(dropped) > MAX_MISPLACED:  # its later frames are refused as unbound (4011)
            dropped.popitem(last=False)
        log.info("session %d refused: %s", session_id, why)
        reason = "the actor is not placed on this host"
        self._later(
            channel, CloseClient(session_id, reason, int(ClientCloseCode.UNAVAILABLE), True)
        )

    def _placed(self, channel: Channel, session_id: int) -> None:
        dropped = self._misplaced.get(channel)
        if dropped is not None:
            dropped.pop(session_id, None)

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
        self._misplaced.pop(channel, None)
        sessions = self.hub.sessions_from(channel)
        if sessions:
            log.info(
                "the gateway connection %s ended: closing its %d session(s)",
                channel.name,
                len(sessions),
            )
        for sess in sessions:
            self.hub.closed(channel, sess.session_id, "the gateway connection was lost")
