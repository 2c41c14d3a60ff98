"""Mutual TLS on host links, over real loopback sockets, on asyncio, uvloop and trio
(the ``anyio_backend`` fixture), in one process and across processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from anyio.streams.tls import TLSStream

from koala import ConfigError, HostUnavailableError, get_rpc_proxy
from koala._net import split_hostport
from koala._tls import CA_ENV, CERT_ENV, KEY_ENV, TLSConfig
from koala.testing.tls import TestCA
from koala.transport import Transport, TransportConfig
from tests._transport_helpers import SECRET, IAlpha, free_port, node, transport_config
from tests.test_transport import echo, two_nodes, until_dropped, wait_until
from tests.test_transport_processes import backend_name, host_process

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    with TestCA() as authority:
        yield authority


@pytest.fixture(scope="module")
def rogue_ca() -> Iterator[TestCA]:
    with TestCA() as authority:
        yield authority


def tls(ca: TestCA, name: str, **more: Any) -> dict[str, Any]:
    return {"tls": ca.issue(name), **more}


async def test_a_tls_link_carries_calls_both_ways(ca: TestCA) -> None:
    async with two_nodes(tls(ca, "server"), tls(ca, "client")) as (rt1, t1, _, t2):
        assert await echo(rt1).echo("over tls") == "over tls"
        big = "x" * 1_000_000  # many TLS records each way
        assert await echo(rt1, "big").echo(big) == big
        # A (node 1) -> B (node 2) -> A: node 2 calls back over the same TLS connection
        assert len(await get_rpc_proxy(IAlpha, "a", runtime=rt1).start(1)) == 3
        assert t2.statistics().connects == 0

        async def one(i: int) -> None:
            assert await echo(rt1, f"k{i}").add(i, 1) == i + 1

        async with anyio.create_task_group() as tg:
            for i in range(100):
                tg.start_soon(one, i)
        await wait_until(lambda: t2.statistics().connections == 1)
        for ch in (await t1.channel(t2.address), *t2._all):
            assert isinstance(ch.stream, TLSStream)
            assert ch.statistics().io == "stream"  # the fast paths bypass TLS: they are off


async def test_tls_accompanies_the_cluster_secret(ca: TestCA) -> None:
    server = tls(ca, "server", secret=SECRET)
    async with two_nodes(server, tls(ca, "client", secret=SECRET)) as (rt1, _, _, _):
        assert await echo(rt1).echo("both") == "both"
    wrong = tls(ca, "client", secret="a-different-secret-0123456789")
    async with two_nodes(server, wrong) as (rt1, _, _, t2):
        with pytest.raises(HostUnavailableError, match="secret"):
            await echo(rt1).echo("x")
        assert t2.statistics().connections == 0


async def refused(server: Transport, client: TransportConfig, match: str) -> str:
    """A node with ``client`` is refused by ``server``; a good peer is served after."""
    before = server.statistics().refused_connections
    async with node({"Echo": server.address}, config=client, listen=None) as (rt, _, _):
        with pytest.raises(HostUnavailableError, match=match) as info:
            await echo(rt).echo("let me in")
    await wait_until(lambda: server.statistics().refused_connections == before + 1)
    assert server.statistics().connections == 1  # the good peer's, kept
    return str(info.value)


async def test_peers_without_a_certificate_of_the_cluster_ca_are_refused(
    ca: TestCA, rogue_ca: TestCA
) -> None:
    async with two_nodes(tls(ca, "server"), tls(ca, "client")) as (rt1, _, _, t2):
        assert await echo(rt1).echo("good") == "good"
        # a certificate from another CA, trusting that CA only: the listener's
        # certificate is not one it trusts, and it says so
        other = transport_config(tls=rogue_ca.issue("rogue"))
        message = await refused(t2, other, "TLS: the node's certificate is not trusted")
        assert "--tls-ca" in message
        # a certificate from another CA, trusting the cluster's: the listener refuses it
        rogue = rogue_ca.issue("rogue")
        mixed = TLSConfig(cert=rogue.cert, key=rogue.key, ca=str(ca.ca_path))
        await refused(t2, transport_config(tls=mixed), "TLS: the node refused this one")
        # no certificate at all
        await refused(t2, transport_config(tls=ca.trust_only()), "TLS")
        # plain TCP: the listener answers in a plain CLOSE that it speaks TLS
        message = await refused(t2, transport_config(), "speaks TLS on host links")
        assert "plain TCP" in message
        assert await echo(rt1).echo("still served") == "still served"


async def test_a_tls_node_dialling_a_plain_one_is_told_why(ca: TestCA) -> None:
    async with two_nodes({}, tls(ca, "client")) as (rt1, _, _, t2):
        with pytest.raises(HostUnavailableError, match="TLS") as info:
            await echo(rt1).echo("x")
        assert "every node or none" in str(info.value)
        await wait_until(lambda: t2.statistics().refused_connections == 1)


async def test_a_stranger_in_its_tls_handshake_is_held_as_one(ca: TestCA) -> None:
    async with two_nodes(tls(ca, "server", handshake_timeout=0.5), tls(ca, "c")) as (
        rt1,
        _,
        _,
        t2,
    ):
        host, port = split_hostport(t2.address)
        async with await anyio.connect_tcp(host, port) as stream:
            await stream.send(b"\x16\x03\x01")  # a TLS record begun, never finished
            await wait_until(lambda: t2.statistics().unauthenticated == 1)
            await until_dropped(stream)  # at the handshake timeout
        await wait_until(lambda: t2.statistics().unauthenticated == 0)
        assert await echo(rt1).echo("fine") == "fine"


async def test_mutual_tls_alone_may_bind_beyond_loopback(ca: TestCA) -> None:
    async with Transport(transport_config(tls=ca.issue("public"))) as t:
        address = await t.listen("0.0.0.0", 0)
        assert split_hostport(address)[0] == "0.0.0.0"
    async with Transport(transport_config(tls=ca.trust_only())) as t:
        with pytest.raises(ConfigError, match="no certificate of its own"):
            await t.listen()
    async with Transport(transport_config()) as t:
        with pytest.raises(ConfigError, match="mutual TLS"):
            await t.listen("0.0.0.0", 0)


def test_tls_settings_are_checked_at_start(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    assert TransportConfig(tls=TLSConfig()).tls is None  # no files: plain TCP
    issued = ca.issue("node")
    with pytest.raises(ConfigError, match="--tls-ca"):
        TransportConfig(tls=TLSConfig(cert=issued.cert, key=issued.key))
    with pytest.raises(ConfigError, match="TLSConfig"):
        TransportConfig(tls="yes")  # type: ignore[arg-type]
    # files that do not belong together fail when the transport is made
    mismatched = TLSConfig(cert=issued.cert, key=ca.issue("other").key, ca=issued.ca)
    with pytest.raises(ConfigError, match="do not load"):
        Transport(TransportConfig(tls=mismatched))
    for name in (CERT_ENV, KEY_ENV, CA_ENV):
        monkeypatch.delenv(name, raising=False)
    assert TransportConfig.from_env().tls is None
    monkeypatch.setenv(CERT_ENV, str(issued.cert))
    monkeypatch.setenv(KEY_ENV, str(issued.key))
    monkeypatch.setenv(CA_ENV, str(issued.ca))
    assert TransportConfig.from_env().tls == issued
    assert TransportConfig.from_env().proves_peers


async def test_a_tls_cluster_across_processes(
    anyio_backend: tuple[str, dict[str, object]], ca: TestCA, rogue_ca: TestCA
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    good = transport_config(tls=ca.issue("caller"))
    async with (
        host_process(port, {}, backend_name(anyio_backend), tls=ca.issue("host")) as proc,
        node({"Echo": address}, config=good) as (rt, _, _),
    ):
        assert await echo(rt).where() == proc.pid
        assert await echo(rt).echo("across") == "across"
        rogue = rogue_ca.issue("rogue")
        mixed = TLSConfig(cert=rogue.cert, key=rogue.key, ca=str(ca.ca_path))
        async with node({"Echo": address}, config=transport_config(tls=mixed)) as (bad, _, _):
            with pytest.raises(HostUnavailableError, match="TLS"):
                await echo(bad).echo("x")
        assert await echo(rt).echo("still") == "still"
