"""The test vectors of docs/protocol.md: decoded, re-encoded byte for byte, and rebuilt."""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

import pytest

from koala._messages import ErrorCode, ErrorInfo
from koala.transport import (
    NEED_DATA,
    ClientMessage,
    CloseClient,
    Connection,
    HandshakeComplete,
    Request,
    Response,
    Role,
    State,
)
from koala.wire._events import ClientAck
from koala.wire._wire import HEADER, decode, frame

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
SECRET = b"koala-test-vector-secret"
NONCE_C = bytes(range(32))
NONCE_S = bytes(range(32, 64))
TICKET = bytes(range(64, 96))  # the placement ticket of request-placed (any 32 bytes)


def _block(name: str) -> dict[str, bytes]:
    text = DOC.read_text()
    match = re.search(rf"```{name}\n(.*?)```", text, re.S)
    assert match, f"no ```{name} block in {DOC}"
    out: dict[str, bytes] = {}
    for line in match.group(1).splitlines():
        parts = line.split()
        out[parts[-2]] = bytes.fromhex(parts[-1])
    return out


VECTORS = _block("vectors")


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_decodes_and_encodes_back(name: str) -> None:
    data = VECTORS[name]
    (size,) = HEADER.unpack_from(data)
    assert size == len(data) - 4
    assert frame(decode(data[4:])) == data


def test_request_vector_means_what_the_doc_says() -> None:
    assert decode(VECTORS["request"][4:]) == Request(
        1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False
    )
    assert decode(VECTORS["request-placed"][4:]) == Request(
        1, 4242, 30.0, "Player", "p1", "IPlayer", "echo", ["hello"], False, placement=TICKET
    )
    assert decode(VECTORS["request-traced"][4:]) == Request(
        1,
        4242,
        30.0,
        "Player",
        "p1",
        "IPlayer",
        "echo",
        ["hello"],
        False,
        trace=("00-000102030405060708090a0b0c0d0e0f-1011121314151617-01", "koala=1"),
    )
    err = decode(VECTORS["error"][4:])
    assert err == Response(
        1,
        None,
        ErrorInfo(
            ErrorCode.APPLICATION,
            "builtins:ValueError",
            "boom",
            "Traceback (most recent call last):\n",
            ("boom",),
        ),
    )


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no-secret", "secret"])
def test_handshake_vectors_are_what_the_connection_sends(secret: bytes | None) -> None:
    suffix = "-secret" if secret else ""
    c = Connection(
        Role.CLIENT,
        cluster_id="koala",
        node_id="node-a",
        address="127.0.0.1:7001",
        secret=secret,
        nonce=NONCE_C,
    )
    s = Connection(Role.SERVER, cluster_id="koala", node_id="node-b", secret=secret, nonce=NONCE_S)
    hello = c.initiate()
    assert hello == VECTORS["hello" + suffix]
    s.receive_data(hello)
    assert s.next_event() is NEED_DATA
    welcome = s.data_to_send()
    assert welcome == VECTORS["welcome" + suffix]
    c.receive_data(welcome)
    assert isinstance(c.next_event(), HandshakeComplete)
    auth = c.data_to_send()
    assert auth == VECTORS["auth" + suffix]
    s.receive_data(auth)
    assert isinstance(s.next_event(), HandshakeComplete)
    assert s.state is State.OPEN


def test_proofs_are_the_hmac_of_the_documented_transcripts() -> None:
    transcripts = _block("transcripts")
    welcome = decode(VECTORS["welcome-secret"][4:])
    auth = decode(VECTORS["auth-secret"][4:])
    server = hmac.new(SECRET, transcripts["server"], hashlib.sha256).digest()
    client = hmac.new(SECRET, transcripts["client"], hashlib.sha256).digest()
    assert getattr(welcome, "proof", None) == server
    assert getattr(auth, "proof", None) == client


def test_gateway_vectors_mean_what_the_doc_says() -> None:
    assert decode(VECTORS["client-message"][4:]) == ClientMessage(5, b"\x01\x02\x03")
    assert decode(VECTORS["client-message-seq"][4:]) == ClientMessage(5, b"\x01\x02\x03", 3)
    assert decode(VECTORS["client-ack"][4:]) == ClientAck(5, 3)
    assert decode(VECTORS["close-client-going-away"][4:]) == CloseClient(5, "going away", 1001)
    assert decode(VECTORS["close-client-misplaced"][4:]) == CloseClient(5, "moved", 4011, True)
