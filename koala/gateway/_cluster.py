"""The gateway as a cluster member: sessions reach their actors' hosts over the wire.

:class:`ClusterLink` is the :class:`~koala.gateway._gateway.Link` of ``koala gateway``.
It asks the PD where a session's actor lives (``find_position``), dials that host with
the transport, and sends the gateway kinds of the wire protocol on that connection:
CLIENT_OPENED when a session is bound, CLIENT_MESSAGE per client frame, CLIENT_CLOSED
at the end. The host answers on the same connection with PUSH_TO_CLIENT and
CLOSE_CLIENT, which :meth:`ClusterLink.on_event` hands to the session's client.

Failover: when the connection to a session's host ends (the host died, or drained and
left), the session is re-bound. The link asks the PD again (which places the actor
elsewhere once the dead host's lease expires), sends CLIENT_OPENED marked as a re-bind
to the new host, and only then lets the client's next frame through: the client's
reader waits meanwhile, so frames back up in hypercorn's bounded queue and in TCP, never
in an unbounded buffer here, and none is dropped. If no host takes the session within
``failover_timeout`` the client is closed with 4011 (UNAVAILABLE).

Placement: CLIENT_OPENED carries the placement ticket the PD answered
(``koala.placement``, hex); a host that does not hold the actor's position, and cannot
take it on that ticket, refuses the session (CLOSE_CLIENT marked
``misplaced``), and the session is re-bound exactly as in a failover.

No frame is lost: each frame gets a sequence number (per session, from 1) and stays in
the session's :class:`Unacked` buffer (bounded by ``unacked_frames`` and
``unacked_bytes``; a client that outruns it is closed with 4012) until the host
acknowledges it (CLIENT_ACK: its turn has run). After a re-bind the frames still
unacknowledged are sent again, in order, before any new frame: at least once across a
host's death.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup

from .._errors import ConfigError, HostUnavailableError, KoalaError, WrongHostError
from .._messages import Key, Request, new_chain_id
from ..pd import PDClient, PDRequestError
from ..transport import (
    Channel,
    ClientClosed,
    ClientMessage,
    ClientOpened,
    CloseClient,
    Event,
    PushToClient,
    Transport,
)
from ..wire._events import ClientAck
from ._auth import FirstPacket
from ._bridge import PLACEMENT_KEY, REBIND_KEY
from ._codes import ClientCloseCode
from ._gateway import BindError, ClientConnection, Gateway, account_target
from ._session import Data, IAccount, SessionClosedError

if TYPE_CHECKING:
    from .._interface import MethodSpec

log = logging.getLogger("koala.gateway")

RETRY_MIN = 0.05  # seconds between attempts to reach a host, doubling...
RETRY_MAX = 1.0  # ...up to this
MAX_CONCURRENT_REBINDS = 64  # PD lookups at once while many sessions fail over


@dataclass(frozen=True, slots=True)
class HostBinding:
    """Where a session lives now: its host's address and server id (as the PD
    answered), the PD's placement ticket for the host, and the connection to it."""

    address: str
    channel: Channel
    server_id: int = 0
    ticket: bytes = b""


class Unacked:
    """The frames of one session its host has not acknowledged yet, in order.

    Frames are numbered from 1 and kept contiguous: ``frames[i]`` has number
    ``frames[0][0] + i``. ``sent`` is the last number written to the current binding.
    """

    __slots__ = ("acked", "frames", "max_bytes", "max_frames", "next_seq", "sent", "size")

    def __init__(self, max_frames: int, max_bytes: int) -> None:
        self.frames: deque[tuple[int, Data, int]] = deque()
        self.next_seq = 1
        self.acked = 0
        self.sent = 0
        self.size = 0
        self.max_frames = max_frames
        self.max_bytes = max_bytes

    def add(self, data: Data) -> int:
        """Keep a frame; its sequence number. BindError (4012) past the bounds."""
        size = len(data)
        if isinstance(data, str) and not data.isascii():
            size = len(data.encode("utf-8", "surrogatepass"))
        if len(self.frames) >= self.max_frames or self.size + size > self.max_bytes:
            raise BindError(
                ClientCloseCode.OVERLOADED,
                f"{len(self.frames)} frames ({self.size} bytes) not yet acknowledged by the "
                "actor's host: the client is too far ahead of its actor",
            )
        seq = self.next_seq
        self.next_seq += 1
        self.frames.append((seq, data, size))
        self.size += size
        return seq

    def ack(self, seq: int) -> None:
        """The host ran every frame up to ``seq``: forget them."""
        frames = self.frames
        while frames and frames[0][0] <= seq:
            self.size -= frames.popleft()[2]
        self.acked = max(self.acked, min(seq, self.next_seq - 1))

    def after(self, seq: int) -> tuple[int, Data] | None:
        """The frame that follows number ``seq``, if it is kept."""
        frames = self.frames
        if not frames:
            return None
        i = max(0, seq + 1 - frames[0][0])
        if i >= len(frames):
            return None
        number, data, _ = frames[i]
        return number, data


@dataclass(frozen=True, slots=True)
class ClusterLinkStatistics:
    hosts: int  # connections to hosts with sessions on them
    rebinding: int  # sessions failing over right now
    failovers: int  # sessions re-bound after their host was lost
    failed_failovers: int  # sessions closed with 4011 because no host took them in time


class ClusterLink:
    """A gateway's way to actors in a cluster (see the module docstring).

    Use it as ``async with ClusterLink(pd, transport) as link: Gateway(config, link)``;
    it sets ``transport.on_event``.
    """

    def __init__(self, pd: PDClient, transport: Transport) -> None:
        self.pd = pd
        self.transport = transport
        transport.on_event = self.on_event
        self.failover_timeout = 30.0
        self.bind_timeout = 10.0
        self.unacked_frames = 1024
        self.unacked_bytes = 1024 * 1024
        self._unacked: dict[int, Unacked] = {}
        self._conns: dict[int, ClientConnection] = {}
        self._by_channel: dict[Channel, set[int]] = {}
        self._rebinding: dict[int, anyio.Event] = {}
        self._limiter = anyio.CapacityLimiter(MAX_CONCURRENT_REBINDS)
        self._tg: TaskGroup | None = None
        self._account_type = "Account"
        self._account_spec: MethodSpec | None = None
        self._failovers = 0
        self._failed_failovers = 0

    async def __aenter__(self) -> ClusterLink:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        tg, self._tg = self._tg, None
        return await tg.__aexit__(exc_type, exc, tb)

    def statistics(self) -> ClusterLinkStatistics:
        return ClusterLinkStatistics(
            hosts=len(self._by_channel),
            rebinding=len(self._rebinding),
            failovers=self._failovers,
            failed_failovers=self._failed_failovers,
        )

    # ------------------------------------------------------------ Link

    def attach(self, gateway: Gateway) -> None:
        cfg = gateway.config
        self._conns = gateway.connections
        self.failover_timeout = cfg.failover_timeout
        self.bind_timeout = cfg.bind_timeout
        self.unacked_frames = cfg.unacked_frames
        self.unacked_bytes = cfg.unacked_bytes
        self._account_type = cfg.account_actor_type
        self._account_spec = IAccount.__koala_methods__.get(cfg.account_method)
        if self._account_spec is None:
            raise ConfigError(
                f"a cluster gateway calls the account service through IAccount, which has no "
                f"method {cfg.account_method!r} (GatewayConfig.account_method)"
            )

    async def find_actor(self, packet: FirstPacket) -> tuple[str, Key]:
        """Ask the account actor (``account_actor_type`` keyed by ``open_id``) over the wire."""
        spec = self._account_spec
        assert spec is not None
        args = tuple(spec.encode_args((packet.server_id,)))
        for attempt in range(3):
            binding = await self._locate(self._account_type, packet.open_id)
            req = Request(
                0,
                new_chain_id(),
                anyio.current_time() + self.bind_timeout,
                self._account_type,
                packet.open_id,
                IAccount.__name__,
                spec.name,
                args,
                False,
                placement=binding.ticket,
            )
            try:
                return account_target(await self.transport.call(binding.address, req, spec))
            except (WrongHostError, HostUnavailableError):
                if attempt == 2:
                    raise
                await anyio.sleep(RETRY_MIN * 2**attempt)
        raise AssertionError("unreachable")

    async def open(self, conn: ClientConnection) -> None:
        self._unacked[conn.session_id] = Unacked(self.unacked_frames, self.unacked_bytes)
        while True:
            binding = await self._locate(conn.actor_type, conn.key)
            if await self._open_on(conn, binding, rebind=False):
                return

    async def message(self, conn: ClientConnection, data: Data) -> None:
        """Forward one frame; while the session fails over, wait for it to be re-bound.

        The frame is kept until its host acknowledges it; a re-bind sends it again."""
        unacked = self._unacked.get(conn.session_id)
        if unacked is None:
            raise BindError(ClientCloseCode.UNAVAILABLE, "the session is not bound")
        seq = unacked.add(data)
        while not conn.closing:
            pending = self._rebinding.get(conn.session_id)
            if pending is not None:
                await pending.wait()  # the re-bind sends every unacknowledged frame
                continue
            if unacked.sent >= seq:
                return
            binding: HostBinding | None = conn.host
            if binding is None:
                raise BindError(ClientCloseCode.UNAVAILABLE, "the session is not bound")
            channel = binding.channel
            if not channel.closed and not channel.peer_draining:
                try:
                    await channel.send_event(ClientMessage(conn.session_id, data, seq))
                except Exception:
                    if not channel.closed:
                        raise
                else:
                    if conn.host is binding and conn.session_id not in self._rebinding:
                        unacked.sent = seq
                        return
                    continue  # a re-bind began meanwhile: it sends the frame again
            self._fail_over(conn, binding)

    async def closed(self, conn: ClientConnection, reason: str) -> None:
        self._unacked.pop(conn.session_id, None)
        binding: HostBinding | None = conn.host
        if binding is None:
            return
        self._unindex(conn.session_id, binding.channel)
        await _tell(binding.channel, ClientClosed(conn.session_id, reason[:120]))

    # ------------------------------------------------------------ from hosts

    def on_event(self, channel: Channel, ev: Event) -> None:
        """The transport's ``on_event``: pushes, acks and closes from the session's host."""
        kind = type(ev)
        if kind is not PushToClient and kind is not CloseClient and kind is not ClientAck:
            log.debug("connection %s: ignoring %s (a gateway does not take it)", channel.name, ev)
            return
        assert isinstance(ev, (PushToClient, CloseClient, ClientAck))
        conn = self._conns.get(ev.session_id)
        binding: HostBinding | None = None if conn is None else conn.host
        if conn is None or binding is None or binding.channel is not channel:
            return  # the session ended, or lives on another host now
        if isinstance(ev, PushToClient):
            with contextlib.suppress(SessionClosedError):  # closing: the frame goes nowhere
                conn.push_nowait(ev.payload)
        elif isinstance(ev, ClientAck):
            unacked = self._unacked.get(ev.session_id)
            if unacked is not None:
                unacked.ack(ev.seq)
        elif ev.misplaced:  # the host does not hold the actor (a stale placement): re-bind
            log.info(
                "session %d (%s/%r): %s refused it (%s); re-binding",
                conn.session_id,
                conn.actor_type,
                conn.key,
                binding.address,
                ev.reason,
            )
            self._fail_over(conn, binding)
        else:
            conn.close(ev.code, ev.reason)

    # ------------------------------------------------------------ placement

    async def _locate(
        self, actor_type: str, key: Key, *, failing_over: bool = False
    ) -> HostBinding:
        """The host of the actor (placing it if needed) as the PD answered (address,
        server id, ticket), with an open connection to it.

        Retries while the PD names a host that cannot be reached or is draining (its
        lease has not expired yet); the caller bounds the wait. Raises BindError when no
        host serves the actor type, except while failing over: the host that served it
        may be the one that died, and another may join in time.
        """
        delay = RETRY_MIN
        while True:
            try:
                pos = await self.pd.find_position(actor_type, str(key))
                channel = await self.transport.channel(pos.server_address)
                if not channel.peer_draining:
                    return HostBinding(pos.server_address, channel, pos.server_id, pos.ticket)
                why = f"the host at {pos.server_address} is draining"
            except PDRequestError as exc:
                if exc.code == "bad_request" or (exc.code == "no_host" and not failing_over):
                    raise BindError(ClientCloseCode.NO_ACTOR, exc.message[:120]) from None
                why = str(exc)
            except HostUnavailableError as exc:  # the PD or the host
                why = str(exc)
            log.debug("finding %s/%r: %s; retrying in %.2f s", actor_type, key, why, delay)
            await anyio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _open_on(self, conn: ClientConnection, binding: HostBinding, *, rebind: bool) -> bool:
        """Bind the session on this host and send again its unacknowledged frames, in
        order; False if the connection ended meanwhile."""
        previous: HostBinding | None = conn.host
        if previous is not None:
            self._unindex(conn.session_id, previous.channel)
        conn.host = binding
        channel = binding.channel
        if channel not in self._by_channel:
            self._by_channel[channel] = set()
            self._task_group().start_soon(self._watch, channel)
        self._by_channel[channel].add(conn.session_id)
        metadata = {
            **conn.metadata,
            REBIND_KEY: "1" if rebind else "0",
            PLACEMENT_KEY: binding.ticket.hex(),
        }
        unacked = self._unacked.get(conn.session_id)
        try:
            await channel.send_event(
                ClientOpened(conn.session_id, conn.actor_type, conn.key, metadata)
            )
            if unacked is not None:
                # the reader waits for this re-bind, but may add one frame meanwhile:
                # send until caught up, by number (acks may drop frames as we go)
                sent = unacked.acked
                while (frame := unacked.after(sent)) is not None:
                    await channel.send_event(ClientMessage(conn.session_id, frame[1], frame[0]))
                    sent = frame[0]
                unacked.sent = sent
        except Exception:
            if not channel.closed:
                raise
            self._unindex(conn.session_id, channel)
            return False
        if conn.session_id not in self._conns:  # the client left while we re-bound
            self._unindex(conn.session_id, channel)
            await _tell(channel, ClientClosed(conn.session_id, conn.close_reason or "closed"))
        return True

    def _unindex(self, session_id: int, channel: Channel) -> None:
        ids = self._by_channel.get(channel)
        if ids is not None:
            ids.discard(session_id)

    def _task_group(self) -> TaskGroup:
        if self._tg is None:
            raise KoalaError("the cluster link is not running: use `async with ClusterLink(...)`")
        return self._tg

    async def _watch(self, channel: Channel) -> None:
        """When a host's connection ends, fail over every session that lived there."""
        await channel.wait_closed()
        ids = self._by_channel.pop(channel, set())
        if ids:
            log.warning(
                "lost the connection to %s (%s): re-binding %d session(s)",
                channel.name,
                channel.close_reason,
                len(ids),
            )
        for session_id in ids:
            conn = self._conns.get(session_id)
            if conn is not None and conn.host is not None and conn.host.channel is channel:
                self._fail_over(conn, conn.host)

    # ------------------------------------------------------------ failover

    def _fail_over(self, conn: ClientConnection, lost: HostBinding) -> None:
        """Start re-binding ``conn`` unless it is already under way (or done)."""
        if conn.closing or conn.session_id in self._rebinding or conn.host is not lost:
            return
        done = self._rebinding[conn.session_id] = anyio.Event()
        self._task_group().start_soon(self._rebind, conn, lost, done)

    async def _rebind(self, conn: ClientConnection, lost: HostBinding, done: anyio.Event) -> None:
        try:
            with anyio.move_on_after(self.failover_timeout):
                while not conn.closing:
                    async with self._limiter:
                        binding = await self._locate(conn.actor_type, conn.key, failing_over=True)
                    if await self._open_on(conn, binding, rebind=True):
                        self._failovers += 1
                        log.info(
                            "session %d (%s/%r) re-bound from %s to %s",
                            conn.session_id,
                            conn.actor_type,
                            conn.key,
                            lost.address,
                            binding.address,
                        )
                        return
            if not conn.closing:
                self._failed_failovers += 1
                log.warning(
                    "session %d (%s/%r): no host took it within failover_timeout (%.1f s)",
                    conn.session_id,
                    conn.actor_type,
                    conn.key,
                    self.failover_timeout,
                )
                conn.close(
                    ClientCloseCode.UNAVAILABLE, "the actor's host was lost and no other took over"
                )
        except BindError as exc:
            conn.close(exc.code, exc.reason)
        except Exception as exc:
            log.exception("re-binding session %d failed", conn.session_id)
            conn.close(ClientCloseCode.UNAVAILABLE, f"re-binding failed: {type(exc).__name__}")
        finally:
            del self._rebinding[conn.session_id]
            done.set()


async def _tell(channel: Channel, ev: Event) -> None:
    """Send an event whose loss does not matter (the host's connection may be gone)."""
    if channel.closed:
        return
    try:
        await channel.send_event(ev)
    except Exception:
        if not channel.closed:
            log.warning("could not send %s to %s", type(ev).__name__, channel.name, exc_info=True)
