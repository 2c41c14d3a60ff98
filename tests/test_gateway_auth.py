"""The first packet, sans-IO: both checksum schemes (worked example of docs/gateway.md),
and hypothesis-generated packets that never crash the parser or the gateway."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koala.gateway import AuthError, ClientCloseCode, check_first_packet, sign, signing_text

from ._gateway_client import KEY, Closed, connect
from ._gateway_helpers import local_gateway

EXAMPLE = {
    "open_id": "alice",
    "server_id": "1",
    "timestamp": 1767225600,
    "actor_type": "ChatUser",
    "actor_id": "alice",
}

SEED_EXAMPLE = "d6a88614bf318fa12d5ec86ecb048fafa1b93c323d1489fb7ba83c0ebb67c481"
HMAC_EXAMPLE = "55ebe445db5ca9a029894e135948e4cbccd26a4021329a66cf62984130747d14"


def test_worked_example_of_the_docs() -> None:
    text = "actor_idaliceactor_typeChatUseropen_idaliceserver_id1timestamp1767225600"
    assert signing_text(EXAMPLE) == text
    seed = hashlib.sha256((text + "koala-dev-key").encode()).hexdigest()
    mac = hmac.new(b"koala-dev-key", text.encode(), hashlib.sha256).hexdigest()
    assert sign(EXAMPLE, "koala-dev-key")["check_sum"] == seed
    assert sign(EXAMPLE, "koala-dev-key", "hmac-sha256")["check_sum"] == mac
    assert seed == SEED_EXAMPLE
    assert mac == HMAC_EXAMPLE


def test_keys_sort_by_code_point() -> None:
    assert signing_text({"b": "1", "B": "2", "a": 3, "é": "4", "check_sum": "x"}) == "B2a3b1é4"


def _check(data: str | bytes, now: float = 1767225600.0) -> Any:
    return check_first_packet(
        data, private_key=KEY, mode="sha256", now=now, window=300, max_size=4096
    )


def test_uppercase_hex_is_accepted() -> None:
    packet = sign(EXAMPLE, KEY)
    packet["check_sum"] = packet["check_sum"].upper()
    assert _check(json.dumps(packet)).actor_id == "alice"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
packets = st.dictionaries(
    st.sampled_from(["open_id", "server_id", "timestamp", "check_sum", "actor_type", "actor_id"])
    | st.text(max_size=8),
    json_values,
    max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(packets, st.booleans())
def test_generated_packets_are_refused_cleanly(obj: dict[str, Any], signed: bool) -> None:
    if signed:
        with contextlib.suppress(AuthError):
            obj = sign(obj, KEY)
    refused: AuthError | None = None
    try:
        packet = _check(json.dumps(obj))
    except AuthError as exc:
        refused = exc
    if refused is not None:
        assert refused.code in set(ClientCloseCode)
        assert KEY not in refused.reason
    else:
        assert signed
        assert packet.open_id


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_generated_garbage_is_refused_cleanly(data: str | bytes) -> None:
    with pytest.raises(AuthError):
        _check(data)


@pytest.mark.anyio
@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(packets | st.text(max_size=100), st.booleans())
async def test_generated_first_packets_never_crash_the_gateway(obj: Any, signed: bool) -> None:
    if signed and isinstance(obj, dict):
        with contextlib.suppress(AuthError):
            obj = sign({**obj, "timestamp": int(time.time())}, KEY)
    async with local_gateway() as (address, gateway, _):
        async with connect(address) as c:
            await c.send(json.dumps(obj) if isinstance(obj, dict) else obj)
            item = await c.receive()
            if isinstance(item, Closed):
                assert item.code in set(ClientCloseCode)
            else:
                assert str(item).startswith("welcome")
        # the gateway still serves a good client afterwards
        async with connect(address) as good:
            await good.send_json(
                sign(
                    {
                        "open_id": "ok",
                        "server_id": "1",
                        "timestamp": int(time.time()),
                        "actor_type": "EchoClient",
                        "actor_id": "ok",
                    },
                    KEY,
                )
            )
            assert str(await good.receive()).startswith("welcome ok")
        assert gateway.statistics().connections <= 1
