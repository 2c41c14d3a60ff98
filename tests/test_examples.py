"""The examples work as their docstrings say (in-process, through their HTTP apps)."""

from __future__ import annotations

import anyio
import httpx
import pytest

from examples import reentrancy, timers
from koala.testing import local_runtime

pytestmark = pytest.mark.anyio


async def test_reentrancy_example() -> None:
    async with local_runtime(reentrancy.Person):
        transport = httpx.ASGITransport(app=reentrancy.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            response = await client.get("/handshake/alice/bob")
    assert response.json() == ["alice: hello bob", "bob: hello Alice"]


async def test_timers_example() -> None:
    async with local_runtime(timers.Counter):
        transport = httpx.ASGITransport(app=timers.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            await client.post("/counter/c1/start", params={"every": 0.01})

            async def value() -> int:
                return int((await client.get("/counter/c1")).json())

            with anyio.fail_after(5):
                while await value() < 3:
                    await anyio.sleep(0.01)
            stopped = int((await client.post("/counter/c1/stop")).json())
            await anyio.sleep(0.05)
            assert await value() == stopped  # the timer is gone
        assert stopped >= 3
