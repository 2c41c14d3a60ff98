"""The gateway in-process: the seed's flow, every rejection with its close code, limits."""

from __future__ import annotations

import json
import time

import anyio
import pytest

from koala.gateway import ClientCloseCode

from ._gateway_client import Closed, connect, first_packet, session
from ._gateway_helpers import EVENTS, gateway_config, local_gateway

pytestmark = pytest.mark.anyio


async def test_seed_flow_text_and_binary_in_order() -> None:
    EVENTS.pop("flow", None)
    async with local_gateway() as (address, _, _), session(address, actor_id="flow") as c:
        welcome = await c.receive()
        assert isinstance(welcome, str)
        assert welcome.startswith("welcome u1")
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


async def _refused(address: tuple[str, int], first: str | bytes) -> Closed:
    async with connect(address) as c:
        await c.send(first)
        return await c.expect_close()


async def test_each_first_packet_rejection_has_its_close_code() -> None:
    now = int(time.time())
    async with local_gateway() as (address, gateway, _):
        cases: list[tuple[str | bytes, int]] = [
            ("{not json", ClientCloseCode.BAD_FIRST_PACKET),
            ("[1, 2]", ClientCloseCode.BAD_FIRST_PACKET),
            (b'{"open_id": "u"}', ClientCloseCode.BAD_FIRST_PACKET),  # binary frame
            (json.dumps({"open_id": "u", "server_id": "1"}), ClientCloseCode.BAD_FIELD),
            (json.dumps(first_packet(open_id="")), ClientCloseCode.BAD_FIELD),
            (json.dumps({**first_packet(), "timestamp": 1.5}), ClientCloseCode.BAD_FIELD),
            (json.dumps(first_packet(actor_type="EchoClient")), ClientCloseCode.BAD_FIELD),
            (json.dumps(first_packet(key="wrong-key")), ClientCloseCode.BAD_CHECKSUM),
            (json.dumps(first_packet(mode="hmac-sha256")), ClientCloseCode.BAD_CHECKSUM),
            (json.dumps(first_packet(timestamp=now - 3600)), ClientCloseCode.STALE_TIMESTAMP),
            (json.dumps(first_packet(timestamp=now + 3600)), ClientCloseCode.STALE_TIMESTAMP),
            (json.dumps(first_packet(pad="x" * 5000)), ClientCloseCode.MESSAGE_TOO_BIG),
            (
                json.dumps(first_packet(actor_type="Nobody", actor_id="1")),
                ClientCloseCode.NO_ACTOR,
            ),
            (json.dumps(first_packet(open_id="x-unknown")), ClientCloseCode.NO_ACTOR),
        ]
        for first, code in cases:
            closed = await _refused(address, first)
            assert closed.code == code, (first, closed)
            assert closed.reason
        assert gateway.statistics().refused == len(cases)
        assert gateway.statistics().sessions == 0


async def test_milliseconds_and_hmac_mode_are_accepted() -> None:
    async with local_gateway(gateway_config(checksum="hmac-sha256")) as (address, _, _):
        ms = int(time.time() * 1000)
        async with session(address, actor_id="hm", mode="hmac-sha256", timestamp=ms) as c:
            assert str(await c.receive()).startswith("welcome")


async def test_account_service_binds_the_open_id() -> None:
    async with local_gateway() as (address, _, _), connect(address) as c:
        await c.send_json(first_packet(open_id="alice"))
        assert str(await c.receive()).startswith("welcome alice")
        await c.send("hi")
        assert await c.receive() == "hi"
    assert EVENTS["acct-alice"][0] == ("open", False)


async def test_auth_timeout() -> None:
    cfg = gateway_config(auth_timeout=0.2)
    async with local_gateway(cfg) as (address, _, _), connect(address) as c:
        assert (await c.expect_close()).code == ClientCloseCode.AUTH_TIMEOUT


async def test_idle_timeout() -> None:
    cfg = gateway_config(idle_timeout=0.3)
    async with local_gateway(cfg) as (address, _, _), session(address, actor_id="idle") as c:
        assert (await c.expect_close()).code == ClientCloseCode.IDLE_TIMEOUT


async def test_oversized_frame() -> None:
    cfg = gateway_config(max_frame_size=8192)
    async with local_gateway(cfg) as (address, _, _), session(address, actor_id="big") as c:
        await c.receive()
        await c.send(b"x" * 8192)
        assert await c.receive() == b"x" * 8192
        await c.send("é" * 4097)  # 8194 bytes of UTF-8
        closed = await c.expect_close()
        assert closed.code == ClientCloseCode.MESSAGE_TOO_BIG


async def test_rate_limit() -> None:
    EVENTS.pop("rate", None)
    cfg = gateway_config(rate=1.0, burst=5)
    async with local_gateway(cfg) as (address, _, _), session(address, actor_id="rate") as c:
        await c.send_many([f"m{i}" for i in range(20)])
        closed = await c.expect_close()
        assert closed.code == ClientCloseCode.RATE_LIMITED
    assert [v for k, v in EVENTS["rate"] if k == "msg"] == [f"m{i}" for i in range(5)]


async def test_client_that_does_not_read_is_closed() -> None:
    cfg = gateway_config(send_queue_size=16)
    async with local_gateway(cfg) as (address, gw, _), session(address, actor_id="slow") as c:
        await c.send("flood")  # 10 000 pushes; we read none of them
        with anyio.fail_after(10):
            while gw.statistics().connections:
                await anyio.sleep(0.02)
        assert (await c.expect_close()).code == ClientCloseCode.SEND_QUEUE_FULL


async def test_max_connections() -> None:
    async with (
        local_gateway(gateway_config(max_connections=2)) as (address, _, _),
        session(address, actor_id="c1") as a,
        session(address, actor_id="c2") as b,
    ):
        await a.receive()
        await b.receive()
        async with connect(address) as c:
            assert (await c.expect_close()).code == ClientCloseCode.TRY_AGAIN_LATER


async def test_actor_closes_the_session_with_its_code() -> None:
    EVENTS.pop("closer", None)
    async with local_gateway() as (address, _, _), session(address, actor_id="closer") as c:
        await c.receive()
        await c.send("close")
        closed = await c.expect_close()
        assert (closed.code, closed.reason) == (4100, "asked to")
        with anyio.fail_after(5):
            while ("close", "asked to") not in EVENTS["closer"]:
                await anyio.sleep(0.01)


async def test_gateway_stop_closes_clients_with_1001() -> None:
    async with local_gateway() as (address, gateway, _), session(address, actor_id="stop") as c:
        await c.receive()
        await gateway.close_all()
        assert (await c.expect_close()).code == ClientCloseCode.GOING_AWAY


async def test_reactivated_actor_sees_a_rebind() -> None:
    EVENTS.pop("re", None)
    async with local_gateway() as (address, _, _), session(address, actor_id="re") as c:
        assert "rebind=False" in str(await c.receive())
        await c.send("deactivate")
        assert await c.receive() == "bye"
        await anyio.sleep(0.1)
        await c.send("again")
        assert "rebind=True" in str(await c.receive())
        assert await c.receive() == "again"


async def test_sessions_of_an_actor() -> None:
    async with (
        local_gateway() as (address, _, _),
        session(address, actor_id="multi") as a,
        session(address, actor_id="multi") as b,
    ):
        await a.receive()
        await b.receive()
        await a.send("sessions")
        assert await a.receive() == "2"
