"""The seams between a host and its cluster: where actors live, and how to reach them.

A :class:`~koala.Runtime` asks a :class:`Directory` which host an actor lives on, and
hands requests for other hosts to a :class:`RemoteDelivery`. The placement driver's
client (``koala.pd``) and the transport (``koala.transport``) fill these two seams in a
cluster; a single host needs neither (every actor is :data:`LOCAL`). Tests and tools
may write their own: both are plain protocols, matched by shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

from ._messages import Key as Key

if TYPE_CHECKING:
    from ._interface import MethodSpec
    from ._messages import Request

__all__ = ["LOCAL", "Directory", "Key", "LocalDirectory", "RemoteDelivery"]

LOCAL: Final = "local"
"""The host name a :class:`Directory` answers for "this host"."""


class Directory(Protocol):
    """Where actors live: the seam the placement driver's client fills.

    ``lookup`` answers from a cache without waiting (None: not known here);
    ``resolve`` asks the authority and may wait. Hosts are named by opaque strings;
    :data:`LOCAL` is this host. An actor is named by its actor type (the
    implementation's ``actor_type``) and its :data:`Key`.

    A directory may set the attribute ``local_only = True`` to say that every actor
    lives here, always (as :class:`LocalDirectory` does): the runtime then skips its
    lookups, claims and releases. Without it (or False) every method is called.
    """

    def lookup(self, actor_type: str, key: Key) -> str | None: ...

    async def resolve(self, actor_type: str, key: Key) -> str: ...

    def forget(self, actor_type: str, key: Key) -> None:
        """Drop a cached answer that proved wrong (the host said "wrong host")."""

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        """A peer's request carries the placement ticket its PD lookup returned
        (``Request.placement``): True if it proves the actor is placed on this host as it
        is now, which then serves the actor without asking (and records it); False: ask."""

    def released(self, actor_type: str, key: Key) -> None:
        """The activation of (actor_type, key) on this host ended (it left the catalog):
        its position may be given back to the authority. Called synchronously; must not
        block. A new activation of the same key may start right after (calls that
        queued meanwhile), which :meth:`Runtime.is_active` tells."""


class RemoteDelivery(Protocol):
    """The transport's side of the seam: send a request to another host.

    ``req.args`` are CBOR data, encoded by the caller's method spec; ``call``
    returns the decoded result or raises the rebuilt remote error (a one-way request
    returns None once sent). Hosts reach each other's :meth:`Runtime.serve_request`.
    A request with ``req.expires`` set has a deadline that no cancel scope of its caller
    enforces (the default one): ``call`` must raise TimeoutError once ``req.deadline``
    passes without an answer, as the transport's connections do.
    """

    async def call(self, host: str, req: Request, spec: MethodSpec) -> Any: ...


class LocalDirectory:
    """A one-host cluster: every actor lives here (a runtime's default directory).

    A subclass that wants to be told of releases (a test's counting double) sets
    ``local_only = False``.
    """

    local_only: bool = True

    def lookup(self, actor_type: str, key: Key) -> str | None:
        return LOCAL

    async def resolve(self, actor_type: str, key: Key) -> str:
        return LOCAL

    def forget(self, actor_type: str, key: Key) -> None:
        pass

    def claim(self, actor_type: str, key: Key, ticket: bytes) -> bool:
        return True

    def released(self, actor_type: str, key: Key) -> None:
        pass
