"""The tests' etcd: one process per test session (``koala.testing.etcd``), on free
loopback ports.

Test modules import the ``etcd_url`` fixture (the session's etcd), or ``private_etcd``
(an etcd of one test alone, which it may stop and start again). The session's server
is stopped (and its directory removed) when the session ends. If etcd cannot start, the
tests that need it fail with the reason: they are never skipped.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator

import pytest

from koala.testing import free_port as free_port
from koala.testing.etcd import EtcdProcess as EtcdProcess

_shared: list[EtcdProcess] = []


def shared_etcd() -> EtcdProcess:
    """The session's etcd, started on first use and stopped when the process exits."""
    if not _shared:
        server = EtcdProcess()
        try:
            server.start()
        except BaseException:
            server.destroy()
            raise
        _shared.append(server)
        atexit.register(server.destroy)
    return _shared[0]


@pytest.fixture(scope="session")
def etcd_url() -> str:
    try:
        server = shared_etcd()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot start etcd for the placement driver tests: {exc}", pytrace=False)
    return server.url


@pytest.fixture
def private_etcd() -> Iterator[EtcdProcess]:
    """An etcd of this test alone, which the test may stop and start again."""
    server = EtcdProcess()
    try:
        server.start()
        yield server
    finally:
        print(f"--- etcd\n{server.log()}")  # pytest shows it for a failed test only
        server.destroy()


_prefixes = iter(range(1, 1 << 30))


def unique_prefix(name: str = "t") -> str:
    """A key prefix no other test of this session uses (tests share one etcd)."""
    return f"/koala-test/{os.getpid()}-{name}-{next(_prefixes)}/"
