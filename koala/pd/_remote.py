"""The runtime's ``RemoteDelivery`` in a cluster: the transport, with the directory kept
honest (:class:`PlacementRemote`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

from .._errors import DeadlineExceededError, HostUnavailableError, ShuttingDownError, WrongHostError
from .._messages import Request
from ._directory import ClusterDirectory

if TYPE_CHECKING:
    from .._interface import MethodSpec
    from ..transport import Transport


class PlacementRemote:
    """The runtime's ``RemoteDelivery``: the transport, with the directory kept honest.

    A host that cannot be reached before anything is sent (the connection cannot be
    opened) proves the request did not run there; its cached position is dropped and
    the PD asked again. If the actor now lives elsewhere (the host left, or its lease
    expired and the actor was placed again), the call is refused as "wrong host", which
    makes the runtime retry against the new position; if the PD still names the
    unreachable host (its lease is alive), the call fails with HostUnavailableError.
    Any failure that may mean a stale position drops the cached entry.
    """

    def __init__(self, transport: Transport, directory: ClusterDirectory) -> None:
        self.transport = transport
        self.directory = directory

    async def call(self, host: str, req: Request, spec: MethodSpec) -> Any:
        """``req.expires``: no cancel scope of the caller's holds the deadline; dialing and
        asking the PD again then run under one (the transport keeps it once sent). An
        open channel needs neither: the common case pays nothing for it."""
        if not self.transport.is_open(host):
            await self._reach_within(host, req)
        req = req.with_placement(self.directory.ticket_of(req.actor_type, req.key))
        try:
            return await self.transport.call(host, req, spec)
        except (HostUnavailableError, ShuttingDownError, WrongHostError):
            self.directory.forget(req.actor_type, req.key)
            raise

    async def _reach_within(self, host: str, req: Request) -> None:
        try:
            if req.expires:
                with anyio.fail_at(req.deadline):
                    await self._reach(host, req)
            else:
                await self._reach(host, req)
        except TimeoutError:
            raise DeadlineExceededError(
                f"{req.interface}.{req.method} on {req.actor_type}/{req.key!r}: the deadline "
                f"passed while reaching {host}",
                None,
                req.actor_type,
                req.key,
                req.method,
            ) from None

    async def _reach(self, host: str, req: Request) -> None:
        """Open the channel to ``host``; if it cannot be reached, ask the PD whether the
        actor moved (WrongHostError) or not (HostUnavailableError)."""
        try:
            await self.transport.channel(host)
        except HostUnavailableError:
            self.directory.forget(req.actor_type, req.key)
            now = await self.directory.resolve(req.actor_type, req.key)
            if now == host:
                raise
            raise WrongHostError(
                f"{req.actor_type}/{req.key!r} moved from {host}, which cannot be reached"
            ) from None
