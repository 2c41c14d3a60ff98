"""Replay protection: a first packet is accepted once; the cache is bounded and fails
closed. Sans-IO for the cache (with a model checked by hypothesis), a real gateway for
the close codes."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala.gateway import AuthError, ClientCloseCode
from koala.gateway._replay import DIGEST_SIZE, ReplayCache

from ._gateway_client import connect, first_packet
from ._gateway_helpers import gateway_config, local_gateway


def _code(cache: ReplayCache, digest: bytes, expires: float, now: float) -> int | None:
    try:
        cache.admit(digest, expires, now)
    except AuthError as exc:
        return int(exc.code)
    return None


def test_a_replay_is_refused_until_the_packet_would_be_stale() -> None:
    cache = ReplayCache(10)
    assert _code(cache, b"a" * 32, expires=160.0, now=100.0) is None
    assert _code(cache, b"a" * 32, expires=160.0, now=100.5) == ClientCloseCode.REPLAYED
    assert _code(cache, b"a" * 32, expires=160.0, now=160.0) == ClientCloseCode.REPLAYED
    assert _code(cache, b"b" * 32, expires=161.0, now=101.0) is None
    cache.expire(160.5)  # a's timestamp is out of the window: its entry goes, b's stays
    assert len(cache) == 1
    assert cache.statistics().replays == 2


def test_a_full_cache_refuses_new_packets_and_forgets_nothing() -> None:
    cache = ReplayCache(2)
    assert _code(cache, b"a" * 32, 200.0, 100.0) is None
    assert _code(cache, b"b" * 32, 300.0, 100.0) is None
    assert _code(cache, b"c" * 32, 300.0, 150.0) == ClientCloseCode.REPLAY_CACHE_FULL
    assert _code(cache, b"a" * 32, 200.0, 150.0) == ClientCloseCode.REPLAYED  # still held
    # once a's timestamp is out of the window, there is room again
    assert _code(cache, b"c" * 32, 300.0, 200.5) is None
    assert cache.statistics().full == 1


def test_the_reason_tells_the_client_what_to_do() -> None:
    cache = ReplayCache(1)
    cache.admit(b"a" * 32, 10.0, 0.0)
    with pytest.raises(AuthError, match="sign a new one for every connection"):
        cache.admit(b"a" * 32, 10.0, 1.0)
    with pytest.raises(AuthError, match="try again in a few seconds"):
        cache.admit(b"b" * 32, 10.0, 1.0)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive capacity"):
        ReplayCache(0)


events = st.lists(
    st.tuples(
        st.integers(0, 5),  # which of a few packets
        st.floats(0, 30, allow_nan=False),  # lifetime of its entry
        st.floats(0, 10, allow_nan=False),  # time passing before it is seen
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(1, 4))
def test_the_cache_is_a_bounded_set_of_live_packets(
    seen: list[tuple[int, float, float]], capacity: int
) -> None:
    """Against a model: a packet is refused exactly when it was accepted before and its
    entry is still live, or when the live entries fill the cache; never more than
    ``capacity`` entries."""
    cache = ReplayCache(capacity)
    live: dict[bytes, float] = {}  # the model: accepted packets and their expiry
    now = 0.0
    for which, lifetime, step in seen:
        now += step
        digest = bytes([which]) * DIGEST_SIZE
        live = {d: e for d, e in live.items() if e >= now}
        if digest in live:
            expected: int | None = ClientCloseCode.REPLAYED
        elif len(live) >= capacity:
            expected = ClientCloseCode.REPLAY_CACHE_FULL
        else:
            expected = None
            live[digest] = now + lifetime
        assert _code(cache, digest, now + lifetime, now) == expected
        assert len(cache) == len(live) <= capacity


@pytest.mark.anyio
async def test_a_replayed_first_packet_is_refused_and_a_fresh_one_works() -> None:
    async with local_gateway() as (address, gateway, _):
        packet = json.dumps(first_packet(actor_type="EchoClient", actor_id="replay"))
        async with connect(address) as c:
            await c.send(packet)
            assert str(await c.receive()).startswith("welcome u1")
        async with connect(address) as thief:  # the same bytes again, on a new connection
            await thief.send(packet)
            closed = await thief.expect_close()
        assert closed.code == ClientCloseCode.REPLAYED
        assert "already used" in closed.reason
        async with connect(address) as c:  # a freshly signed packet still works
            await c.send_json(first_packet(actor_type="EchoClient", actor_id="replay"))
            assert str(await c.receive()).startswith("welcome u1")
        # the checksum in upper case is the same packet
        upper = json.loads(packet)
        upper["check_sum"] = upper["check_sum"].upper()
        async with connect(address) as thief:
            await thief.send_json(upper)
            assert (await thief.expect_close()).code == ClientCloseCode.REPLAYED
        stats = gateway.statistics()
        assert stats.replays == 2
        assert stats.first_packets_seen == 2
        assert stats.accepted == 2


@pytest.mark.anyio
async def test_a_packet_outside_the_window_is_refused() -> None:
    async with local_gateway(gateway_config(timestamp_window=60.0)) as (address, gateway, _):
        for offset in (-61, 61):
            async with connect(address) as c:
                await c.send_json(first_packet(timestamp=int(time.time()) + offset))
                assert (await c.expect_close()).code == ClientCloseCode.STALE_TIMESTAMP
        assert gateway.statistics().first_packets_seen == 0  # stale packets are not kept


@pytest.mark.anyio
async def test_a_forged_packet_does_not_enter_the_cache() -> None:
    async with local_gateway(gateway_config(replay_cache_size=1)) as (address, gateway, _):
        async with connect(address) as c:
            await c.send_json(first_packet(key="not-the-key"))
            assert (await c.expect_close()).code == ClientCloseCode.BAD_CHECKSUM
        assert gateway.statistics().first_packets_seen == 0
        async with connect(address) as c:
            await c.send_json(first_packet(actor_type="EchoClient", actor_id="forged"))
            assert str(await c.receive()).startswith("welcome")


@pytest.mark.anyio
async def test_a_full_replay_cache_fails_closed() -> None:
    async with local_gateway(gateway_config(replay_cache_size=2)) as (address, gateway, _):
        for i in range(2):
            async with connect(address) as c:
                await c.send_json(first_packet(actor_type="EchoClient", actor_id=f"full{i}"))
                assert str(await c.receive()).startswith("welcome")
        async with connect(address) as c:
            await c.send_json(first_packet(actor_type="EchoClient", actor_id="full2"))
            closed = await c.expect_close()
        assert closed.code == ClientCloseCode.REPLAY_CACHE_FULL
        assert gateway.statistics().first_packets_seen == 2
