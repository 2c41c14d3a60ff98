"""`koala dev` runs on an embedded in-memory PD: placement, lease and all."""

from __future__ import annotations

from abc import abstractmethod

import pytest

from koala import LOCAL, ActorBase, ActorInterface, get_rpc_proxy
from koala._host import embedded_host
from koala.pd import ClusterDirectory
from koala.testing import test_config

pytestmark = pytest.mark.anyio


class IEmbedded(ActorInterface):
    @abstractmethod
    async def where(self) -> str: ...


class Embedded(IEmbedded, ActorBase):
    async def where(self) -> str:
        return f"{self.actor_type}/{self.key}"


async def test_actors_are_placed_through_the_embedded_pd() -> None:
    async with embedded_host(test_config()) as rt:
        directory = rt.directory
        assert isinstance(directory, ClusterDirectory)
        assert directory.serving
        assert directory.lookup("Embedded", "a") is None  # nothing placed yet
        assert await get_rpc_proxy(IEmbedded, "a").where() == "Embedded/a"
        assert directory.lookup("Embedded", "a") == LOCAL  # the PD placed it here
        stats = directory.statistics()
        assert stats.resolves == 1
        assert stats.registrations == 1
        assert await get_rpc_proxy(IEmbedded, "a").where() == "Embedded/a"
        assert directory.statistics().resolves == 1  # the position is cached
    assert not directory.serving  # it left the cluster when it stopped
