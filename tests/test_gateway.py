"""The gateway in-process: the seed's flow, every rejection with its close code, limits."""

from __future__ import annotations

import anyio
import pytest

from ._gateway_client import session
from ._gateway_helpers import EVENTS, local_gateway

pytestmark = pytest.mark.anyio


async def test_seed_flow_text_and_binary_in_order() -> None:
    EVENTS.pop("flow", None)
    async with local_gateway() as (address, _, _), session(address, actor_id="flow") as c:
        welcome = await c.receive()
        assert isinstance(welcome, str) and welcome.startswith("welcome u1")
        assert "rebind=False" in welcome
        frames: list[str | bytes] = [f"m{i}" if i % 2 else bytes([i]) * 3 for i in range(50)]
        for f in frames:
            await c.send(f)
        got = [await c.receive() for _ in frames]
        assert got == frames  # unchanged, in order, text stays text and binary binary
    with anyio.fail_after(5):
        while not any(k == "close" for k, _ in EVENTS.get("flow", [])):
            await anyio.sleep(0.01)
    kinds = [k for k, _ in EVENTS["flow"]]
    assert kinds == ["open"] + ["msg"] * 50 + ["close"]
