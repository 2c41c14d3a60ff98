"""A real Prometheus server scrapes a real cluster (etcd, a PD, two hosts on two
backends): its query API returns Koala's series, and the calls it counts are the calls
the test made."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from koala.testing.prometheus import PrometheusProcess
from tests._cluster import Cluster, cluster_of, url
from tests._etcd import etcd_url, free_port

__all__ = ["etcd_url"]

pytestmark = pytest.mark.slow

CALLS = 60


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path, etcd_url, "prometheus")


def test_prometheus_sees_the_calls_a_cluster_made(cluster: Cluster) -> None:
    pd = cluster.pd()
    first = cluster.host(url(pd), "asyncio")
    metrics_port = free_port()  # the second host's metrics on an address of their own
    second = cluster.host(url(pd), "trio", extra=("--metrics", f"127.0.0.1:{metrics_port}"))
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in second.output()
    keys = [f"k{i}" for i in range(20)]
    with httpx.Client(timeout=30) as client:
        for i in range(CALLS):  # every HTTP request makes one actor call from `first`
            resp = client.get(f"{url(first)}/hit/{keys[i % len(keys)]}")
            assert resp.status_code == 200, resp.text
        # the host's own /metrics, as Prometheus will read it
        text = client.get(f"{url(first)}/metrics").text
    assert "koala_calls_total" in text
    assert "koala_call_seconds_bucket" in text

    targets = [f"127.0.0.1:{p.port}" for p in (pd, first)] + [f"127.0.0.1:{metrics_port}"]
    prom = PrometheusProcess(targets, interval=0.5)
    try:
        prom.start()
        prom.wait_for_targets()
        made = prom.wait_until(
            'sum(koala_calls_total{method="hit",outcome="ok"})', lambda v: v == CALLS
        )
        assert made == CALLS
        # the calls that went to the other host were served there, one request each
        remote = prom.value('sum(koala_calls_total{method="hit",path="remote"})') or 0.0
        served = prom.value('sum(koala_requests_served_total{method="hit"})') or 0.0
        assert served == remote
        local = prom.value('sum(koala_calls_total{method="hit",path="local"})') or 0.0
        assert local + remote == CALLS
        # both hosts hold activations of the keys, and the PD placed each key once
        live = prom.value('sum(koala_activations{actor_type="Counter"})')
        assert live == len(keys)
        assert prom.value("sum(koala_pd_placements_total)") == len(keys)
        assert prom.value("sum(koala_pd_hosts)") == 2
        # latency histograms: every call observed, and under the default deadline
        count = prom.value('sum(koala_call_seconds_count{method="hit"})')
        assert count == CALLS
        under = prom.value('sum(koala_call_seconds_bucket{method="hit",le="10.0"})')
        assert under == CALLS
        assert prom.value("sum(koala_directory_hits_total)") is not None
    except BaseException:
        print(f"--- prometheus\n{prom.log()}")
        raise
    finally:
        prom.destroy()
