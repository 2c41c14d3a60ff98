"""A bounded load test on loopback: many clients echoing through the gateway at once."""

from __future__ import annotations

import anyio
import pytest

from ._gateway_client import session
from ._gateway_helpers import gateway_config, local_gateway

pytestmark = pytest.mark.anyio

CLIENTS = 40
FRAMES = 25


async def test_many_concurrent_clients_echo_in_order() -> None:
    done: list[int] = []

    async def client(i: int, address: tuple[str, int]) -> None:
        async with session(address, actor_id=f"load{i}") as c:
            assert str(await c.receive()).startswith("welcome")
            for n in range(FRAMES):
                await c.send(f"{i}:{n}")
                assert await c.receive() == f"{i}:{n}"
            done.append(i)

    async with local_gateway(gateway_config(max_connections=CLIENTS)) as (address, gw, _):
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(CLIENTS):
                    tg.start_soon(client, i, address)
        assert sorted(done) == list(range(CLIENTS))
        assert gw.statistics().frames_in == CLIENTS * FRAMES
