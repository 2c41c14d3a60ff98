"""koala._net: the one HOST:PORT parser and the one loopback check (a security check:
the command line and the transport both ask it who may go without a secret)."""

from __future__ import annotations

import pytest

from koala._net import is_loopback, join_hostport, split_hostport


@pytest.mark.parametrize(
    "host",
    [
        "localhost",
        "LocalHost",
        "localhost.",
        "127.0.0.1",
        "127.0.0.2",
        "127.255.255.254",
        "::1",
        "::1%lo",
        "0:0:0:0:0:0:0:1",
        "::ffff:127.0.0.1",
        "::ffff:7f00:1",
    ],
)
def test_loopback(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize(
    "host",
    [
        "",  # every interface, to a socket's bind()
        "0.0.0.0",
        "::",
        "::ffff:0.0.0.0",
        "::ffff:10.0.0.1",
        "10.0.0.1",
        "192.168.1.1",
        "fe80::1%eth0",
        "[::1]",  # a bracketed literal is an address's spelling, not a host
        "127.0.0.1 ",
        "example.com",
        "localhost.example.com",
        "my-localhost",
        "127.0.0.1.nip.io",  # a name: what it resolves to is not known here
    ],
)
def test_not_loopback(host: str) -> None:
    assert not is_loopback(host)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("localhost:0", ("localhost", 0)),
        ("example.com:65535", ("example.com", 65535)),
        ("[::1]:9000", ("::1", 9000)),
        ("[fe80::1%eth0]:7001", ("fe80::1%eth0", 7001)),
        ("0.0.0.0:7001", ("0.0.0.0", 7001)),
    ],
)
def test_split_hostport(value: str, expected: tuple[str, int]) -> None:
    assert split_hostport(value) == expected
    host, port = expected
    assert split_hostport(join_hostport(host, port)) == expected


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("8000", "is not HOST:PORT"),
        (":8000", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
        ("host:port", "must be a number"),
        ("h:70000", "must be a number"),
        ("h:-1", "must be a number"),
        ("h:", "must be a number"),
        ("h:\u0668\u0660", "must be a number"),  # Arabic-Indic digits: int() takes them
        ("h:000080", "must be a number"),
        ("[::1:80", "unbalanced brackets"),
        ("[]:80", "unbalanced brackets"),
        ("::1:80", "takes brackets"),
        ("a]:80", "takes brackets"),
    ],
)
def test_split_hostport_rejects(value: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        split_hostport(value)


def test_join_hostport() -> None:
    assert join_hostport("10.0.0.7", 7001) == "10.0.0.7:7001"
    assert join_hostport("::1", 7001) == "[::1]:7001"
