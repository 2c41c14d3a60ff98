"""A TLS cluster with real processes (issue 12), on asyncio, uvloop and trio: the PD
serves HTTPS and asks its callers for a certificate, hosts link over mutual TLS and
serve their app over HTTPS, every PD request is signed with the cluster secret. A host
whose certificate another CA signed is refused by the PD and by the hosts."""

from __future__ import annotations

import secrets
import ssl
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from koala._tls import TLSConfig
from koala.testing.tls import TestCA
from tests._cluster import APP, Cluster, Proc, double_activations
from tests._etcd import etcd_url, unique_prefix

__all__ = ["etcd_url"]

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

BACKENDS = ["asyncio", "uvloop", "trio"]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    """The test process only drives HTTPS; the cluster processes run the backend."""
    return ("asyncio", {})


@pytest.fixture
def ca() -> Iterator[TestCA]:
    with TestCA() as authority:
        yield authority


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str, ca: TestCA) -> Iterator[Cluster]:
    c = Cluster(tmp_path, etcd_url, unique_prefix("tls"))
    c.extra_env = tls_env(ca.issue("node"))
    c.extra_env["KOALA_CLUSTER_SECRET"] = secrets.token_hex(16)
    try:
        yield c
    finally:
        c.close()
        print(c.dump())  # pytest shows it for a failed test only


def tls_env(tls: TLSConfig) -> dict[str, str]:
    assert tls.cert
    assert tls.key
    assert tls.ca
    return {"KOALA_TLS_CERT": tls.cert, "KOALA_TLS_KEY": tls.key, "KOALA_TLS_CA": tls.ca}


def https(proc: Proc) -> str:
    return f"https://127.0.0.1:{proc.port}"


def client(ca: TestCA) -> httpx.AsyncClient:
    """A client of the hosts' HTTPS (no certificate needed there), trusting the CA."""
    return httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(ca.ca_path)))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_tls_cluster_serves_across_hosts(
    cluster: Cluster, ca: TestCA, backend: str
) -> None:
    pd = cluster.pd(backend=backend)
    a = cluster.host(https(pd), backend, ttl=5)
    b = cluster.host(https(pd), backend, ttl=5)
    assert "HTTP on https://" in a.output()
    async with client(ca) as http:
        holders: dict[str, int] = {}
        with anyio.fail_after(60):
            for i in range(40):  # placed on both hosts: half the calls cross a TLS link
                resp = await http.get(f"{https(a)}/hit/tls-{i}")
                assert resp.status_code == 200, resp.text
                holders[f"tls-{i}"] = resp.json()[0]
            for key, pid in holders.items():
                resp = await http.get(f"{https(b)}/hit/{key}")
                assert resp.json() == [pid, 2]
        assert a.popen is not None
        assert b.popen is not None
        assert set(holders.values()) == {a.popen.pid, b.popen.pid}
        # the PD's API is signed and mutual TLS: a client with the CA but no
        # certificate does not get in, even for a read
        with pytest.raises(httpx.HTTPError):
            await http.post(f"{https(pd)}/pd/api/v1/membership/fetch_all")
    plain = httpx.AsyncClient()
    async with plain:
        with pytest.raises(httpx.HTTPError):  # the hosts speak only HTTPS
            await plain.get(f"http://127.0.0.1:{a.port}/hit/tls-0")
    assert double_activations(cluster.event_lines()) == []


async def test_a_host_with_another_cas_certificate_is_refused(
    cluster: Cluster, ca: TestCA, tmp_path: Path
) -> None:
    """The rogue trusts the cluster's CA (it can check the PD) but presents a
    certificate of its own CA: the PD refuses its TLS handshake, so it never joins."""
    pd = cluster.pd()
    a = cluster.host(https(pd), ttl=5)
    with TestCA() as other:
        rogue_tls = other.issue("rogue")
        assert rogue_tls.cert
        assert rogue_tls.key
        cluster.extra_env.update(KOALA_TLS_CERT=rogue_tls.cert, KOALA_TLS_KEY=rogue_tls.key)
        cmd = [sys.executable, "-m", "koala.cli", "host", APP, "--pd", https(pd), "--ttl", "5"]
        rogue = Proc("rogue", cmd, cluster.env(), tmp_path / "rogue.log")
        cluster.procs.append(rogue)
        rogue.start(r"refused this process's TLS certificate")  # it says why, and retries
    assert "koala host: server" not in rogue.output()
    async with client(ca) as http:
        resp = await http.get(f"{https(a)}/hit/after-rogue")
        assert resp.status_code == 200
