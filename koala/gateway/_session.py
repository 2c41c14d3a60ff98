"""The actor's side of client sessions: hooks, the session handle, and the host's hub.

An actor that serves clients mixes :class:`ClientHandler` into its implementation and
overrides the hooks. The host's :class:`ClientHub` turns what the gateway reports
(session opened, a frame, session closed) into turns of the bound actor, each with a
call chain of its own, in the order the gateway reported them.
"""

from __future__ import annotations

import logging
import weakref
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry.trace import SpanKind

from .. import _tracing
from .._actor import ActorBase
from .._errors import KoalaError, ShuttingDownError
from .._interface import ActorInterface
from .._messages import Key
from ._codes import ClientCloseCode, valid_actor_close_code

if TYPE_CHECKING:
    from ..host import Activation, Runtime

log = logging.getLogger("koala.gateway")

Data = bytes | str


class SessionClosedError(KoalaError):
    """The client session is closed (the client left, or it was closed): nothing can be
    pushed to it any more."""


class Outlet(Protocol):
    """Where a host sends what actors push: the gateway itself (in-process) or the
    connection to the gateway that owns the session (cluster)."""

    async def push(self, session_id: int, data: Data) -> None: ...

    async def close(self, session_id: int, code: int, reason: str) -> None: ...

    async def ack(self, session_id: int, seq: int) -> None:
        """Every frame of the session numbered up to ``seq`` has had its turn run."""
        ...


class ClientSession:
    """A client bound to an actor. Push frames to it; close it.

    ``metadata`` holds what the gateway authenticated (``open_id``, ``server_id``, the
    other signed fields of the first packet) and ``remote`` (the client's address).
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_opened_on",
        "_outlet",
        "_placement",
        "actor_type",
        "key",
        "metadata",
        "session_id",
    )

    def __init__(
        self,
        outlet: Outlet,
        session_id: int,
        actor_type: str,
        key: Key,
        metadata: dict[str, str],
        placement: str = "",
    ) -> None:
        self._outlet = outlet
        self._closed = False
        self._opened_on: Activation | None = None
        self._placement = placement  # the PD's ticket (hex) the session was opened under
        self.session_id = session_id
        self.actor_type = actor_type
        self.key = key
        self.metadata: MappingProxyType[str, str] = MappingProxyType(metadata)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<ClientSession {self.session_id} {self.actor_type}/{self.key!r} {state}>"

    @property
    def open_id(self) -> str:
        return self.metadata.get("open_id", "")

    @property
    def closed(self) -> bool:
        return self._closed

    async def push(self, data: bytes | str) -> None:
        """Send one frame to the client: ``bytes`` as a binary frame, ``str`` as text.

        Raises SessionClosedError if the session is closed. A client that does not read
        is closed by the gateway (its send queue is bounded), it does not hold you up.
        """
        if self._closed:
            raise SessionClosedError(f"session {self.session_id} is closed")
        if not isinstance(data, (bytes, str)):
            raise TypeError(f"push() sends bytes or str, got {type(data).__name__}")
        await self._outlet.push(self.session_id, data)

    async def close(self, code: int = ClientCloseCode.NORMAL, reason: str = "") -> None:
        """Close the client's WebSocket with ``code`` (1000, or 3000-4999) and ``reason``.

        ``on_client_close`` still runs (with the reason). Closing twice does nothing.
        """
        if not isinstance(code, int) or not valid_actor_close_code(int(code)):
            raise ValueError(f"close code must be 1000 or from 3000 to 4999, got {code!r}")
        if len(reason.encode()) > 123:
            raise ValueError("a WebSocket close reason is at most 123 bytes of UTF-8")
        if self._closed:
            return
        await self._outlet.close(self.session_id, int(code), reason)


class ClientHandler:
    """Mix into an actor implementation to serve WebSocket clients through the gateway.

    ``class Player(IPlayer, ClientHandler, ActorBase)``. Each hook runs as a turn of the
    actor with a call chain of its own; frames arrive in the order the client sent them.
    The actor type clients name in their first packet is the class's ``actor_type``.
    """

    async def on_client_open(self, session: ClientSession, rebind: bool) -> None:
        """A client session was bound to this actor. ``rebind`` is True when the session
        existed before and comes back to a new activation (the old one went idle, or its
        host died): state kept in memory about the session is gone. Raising refuses the
        session (the client is closed with 1011)."""

    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        """One frame from the client, unchanged: ``bytes`` (binary) or ``str`` (text)."""

    async def on_client_close(self, session: ClientSession, reason: str) -> None:
        """The session ended (the client left, or it was closed); nothing can be pushed."""

    @property
    def client_sessions(self) -> list[ClientSession]:
        """The open sessions bound to this actor on this host."""
        act: Activation = self._koala_activation  # type: ignore[attr-defined]
        return hub_for(act.runtime).sessions_of(act.ident[0], act.key)


def client_actor(runtime: Runtime, actor_type: str) -> type[ActorBase] | None:
    """The implementation of ``actor_type`` that handles clients on this host, if any
    (the one defined last, when a module was loaded twice)."""
    found: type[ActorBase] | None = None
    todo: list[type[Any]] = [ClientHandler]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if (
                issubclass(sub, ActorBase)
                and sub.actor_type == actor_type
                and not getattr(sub, "__abstractmethods__", None)
                and runtime.serves(sub)
            ):
                found = sub
    return found


@dataclass(frozen=True, slots=True)
class ActorRef:
    """Which actor a client is bound to: the answer of the account service."""

    actor_type: str
    actor_id: str


class IAccount(ActorInterface):
    """The default account service: a client that names no actor in its first packet is
    bound to the actor its account (keyed by ``open_id``) names."""

    @abstractmethod
    async def find_actor(self, server_id: str) -> ActorRef: ...


# ---------------------------------------------------------------- the host's hub


class ClientHub:
    """The sessions bound to actors of one host, and their turns."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._sessions: dict[tuple[Hashable, int], ClientSession] = {}
        self._by_actor: dict[tuple[str, Key], dict[int, ClientSession]] = {}
        self._impls: dict[str, type[ActorBase]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def sessions_of(self, actor_type: str, key: Key) -> list[ClientSession]:
        return [s for s in self._by_actor.get((actor_type, key), {}).values() if not s._closed]

    def session(self, owner: Hashable, session_id: int) -> ClientSession | None:
        return self._sessions.get((owner, session_id))

    def sessions_from(self, owner: Hashable) -> list[ClientSession]:
        return [s for (o, _), s in self._sessions.items() if o == owner]

    def _impl(self, actor_type: str) -> type[ActorBase] | None:
        impl = self._impls.get(actor_type)
        if impl is None:
            impl = client_actor(self.runtime, actor_type)
            if impl is not None:
                self._impls[actor_type] = impl
        return impl

    def open(
        self,
        owner: Hashable,
        outlet: Outlet,
        session_id: int,
        actor_type: str,
        key: Key,
        metadata: dict[str, str],
        *,
        rebind: bool = False,
        placement: str = "",
    ) -> tuple[int, str] | None:
        """Bind a session and queue its open turn; (close code, reason) if refused.

        ``placement`` is the PD's placement ticket (hex) the gateway bound the session under
        (checked by the host bridge before each turn; "" in-process)."""
        impl = self._impl(actor_type)
        if impl is None:
            return (
                ClientCloseCode.NO_ACTOR,
                f"this host serves no client-handling actor of type {actor_type!r}",
            )
        ident = (owner, session_id)
        old = self._sessions.pop(ident, None)
        if old is not None:  # the same session bound again: a re-bind from the gateway
            old._closed = True
            self._unindex(old)
        sess = ClientSession(outlet, session_id, impl.actor_type, key, metadata, placement)
        self._sessions[ident] = sess
        self._by_actor.setdefault((impl.actor_type, key), {})[session_id] = sess

        async def opened(instance: ClientHandler, act: Activation) -> None:
            sess._opened_on = act
            try:
                await instance.on_client_open(sess, rebind)
            except Exception:
                log.exception("on_client_open of %s/%r raised: closing the session", *act.ident)
                if not sess._closed:
                    await outlet.close(session_id, ClientCloseCode.INTERNAL_ERROR, "refused")

        return self._turn(sess, impl, "on_client_open", opened, reopen=False)

    def message(
        self, owner: Hashable, session_id: int, data: Data, seq: int = 0
    ) -> tuple[int, str] | None:
        """Queue a frame as a turn of the bound actor; (close code, reason) if refused.

        A frame with a sequence number (``seq`` > 0) is acknowledged through the
        session's outlet once its turn has run (raised or not)."""
        sess = self._sessions.get((owner, session_id))
        if sess is None or sess._closed:
            return ClientCloseCode.UNAVAILABLE, f"session {session_id} is not bound on this host"
        impl = self._impls[sess.actor_type]
        outlet = sess._outlet

        async def received(instance: ClientHandler, act: Activation) -> None:
            try:
                try:
                    await instance.on_client_message(sess, data)
                except SessionClosedError:
                    if not sess._closed:
                        raise
                    log.debug("session %d closed while its actor answered a frame", session_id)
            except Exception:
                if seq:  # the turn ran (and raised): it is done all the same
                    await outlet.ack(session_id, seq)
                raise
            if seq:
                await outlet.ack(session_id, seq)

        return self._turn(sess, impl, "on_client_message", received, reopen=True)

    def closed(self, owner: Hashable, session_id: int, reason: str) -> None:
        """The client went away: mark the session closed and queue on_client_close."""
        sess = self._sessions.pop((owner, session_id), None)
        if sess is None:
            return
        sess._closed = True
        self._unindex(sess)
        impl = self._impls[sess.actor_type]
        if self.runtime.draining:
            return  # every activation is deactivating: on_deactivate is the last word
        act = self.runtime.activation_of(impl, sess.key)
        if act is None or (sess._opened_on is not None and act is not sess._opened_on):
            return  # the activation that knew the session is gone: nobody to tell

        async def gone(instance: ClientHandler, act: Activation) -> None:
            if act is sess._opened_on:
                await instance.on_client_close(sess, reason)

        self._turn(sess, impl, "on_client_close", gone, reopen=False)

    def _unindex(self, sess: ClientSession) -> None:
        ident = (sess.actor_type, sess.key)
        by_key = self._by_actor.get(ident)
        if by_key is not None and by_key.get(sess.session_id) is sess:
            del by_key[sess.session_id]
            if not by_key:
                del self._by_actor[ident]

    def _turn(
        self,
        sess: ClientSession,
        impl: type[ActorBase],
        hook: str,
        body: Callable[[ClientHandler, Activation], Awaitable[None]],
        *,
        reopen: bool,
    ) -> tuple[int, str] | None:

        async def run(act: Activation) -> None:
            instance: Any = act.instance
            if reopen and sess._opened_on is not act:
                # a fresh activation that never saw this session: tell it first
                sess._opened_on = act
                await instance.on_client_open(sess, True)
            await body(instance, act)

        async def turn(act: Activation) -> None:
            active = _tracing.tracer  # None unless tracing is on: the whole cost when off
            if active is None:
                await run(act)
                return
            # inside the turn, in the actor's task, so the calls the hook makes are the
            # span's children; its parent is the traceparent of the first packet, if any
            meta = sess.metadata
            parent = _tracing.incoming(meta.get("traceparent"), meta.get("tracestate", ""))
            attributes = _tracing.call_attributes("gateway", hook, sess.actor_type, sess.key)
            attributes["koala.session_id"] = sess.session_id
            with _tracing.span(active, f"gateway {hook}", SpanKind.SERVER, attributes, parent):
                await run(act)

        try:
            self.runtime.schedule_turn(impl, sess.key, turn, hook)
        except ShuttingDownError:
            return ClientCloseCode.GOING_AWAY, "the host is shutting down"
        except KoalaError as exc:
            log.warning(
                "session %d: %s/%r refused a client turn: %s",
                sess.session_id,
                impl.actor_type,
                sess.key,
                exc,
            )
            return ClientCloseCode.OVERLOADED, "the actor cannot keep up"
        return None


_hubs: weakref.WeakKeyDictionary[Runtime, ClientHub] = weakref.WeakKeyDictionary()


def hub_for(runtime: Runtime) -> ClientHub:
    """The hub of client sessions of ``runtime`` (created on first use)."""
    hub = _hubs.get(runtime)
    if hub is None:
        hub = _hubs[runtime] = ClientHub(runtime)
    return hub
