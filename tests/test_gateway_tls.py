"""The gateway over wss: a session through TLS on every backend; a client that does not
trust the gateway's CA, or speaks plain ws, gets nowhere, and the gateway serves on."""

from __future__ import annotations

import ssl

import anyio
import pytest

from koala.gateway import ClientCloseCode
from koala.testing.tls import TestCA

from ._gateway_client import connect, session
from ._gateway_helpers import EVENTS, local_gateway

pytestmark = pytest.mark.anyio


async def test_a_session_over_wss() -> None:
    EVENTS.pop("wss", None)
    with TestCA() as ca:
        trusted = ca.trust_only().client_context()
        async with local_gateway(tls=ca.issue("gateway")) as (address, gateway, _):
            async with session(address, actor_id="wss", ssl_context=trusted) as c:
                assert str(await c.receive()).startswith("welcome u1")
                await c.send("over tls")
                assert await c.receive() == "over tls"
                await c.send(b"\x00binary")
                assert await c.receive() == b"\x00binary"
                await c.send("close")
                closed = await c.expect_close()
            assert closed.code == 4100  # the actor's own close reaches the client
            assert gateway.statistics().accepted == 1
    assert [k for k, _ in EVENTS["wss"]][:3] == ["open", "msg", "msg"]


async def test_clients_without_trust_or_tls_are_refused_and_the_gateway_serves_on() -> None:
    with TestCA() as ca, TestCA() as other:
        async with local_gateway(tls=ca.issue("gateway")) as (address, gateway, _):
            rogue = other.trust_only().client_context()
            with pytest.raises(ssl.SSLCertVerificationError):
                async with connect(address, ssl_context=rogue):
                    pass
            with pytest.raises((ConnectionError, OSError, anyio.EndOfStream, TimeoutError)):
                async with connect(address):  # plain ws to the wss port
                    pass
            trusted = ca.trust_only().client_context()
            async with session(address, actor_id="wss2", ssl_context=trusted) as c:
                assert str(await c.receive()).startswith("welcome u1")
            assert gateway.statistics().accepted == 1


async def test_the_first_packet_rules_hold_over_wss() -> None:
    with TestCA() as ca:
        trusted = ca.trust_only().client_context()
        async with (
            local_gateway(tls=ca.issue("gateway")) as (address, _, _),
            connect(address, ssl_context=trusted) as c,
        ):
            await c.send("{not json")
            assert (await c.expect_close()).code == ClientCloseCode.BAD_FIRST_PACKET
