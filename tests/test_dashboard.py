"""The live cluster page (koala.dashboard) for real: a `koala pd` on etcd with two
`koala host` processes reporting with their renewals, the page opened in Debian's
headless Chromium, its JSON, its access rule, and the History arithmetic.

Set KOALA_DASHBOARD_SCREENSHOT=docs/dashboard.png to keep the screenshot the cluster
test takes (that is how docs/dashboard.png was made)."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from koala._host import embedded_pd
from koala.dashboard import OFF_REASON, PASSWORD_ENV, ClusterSample, History, HostSample
from koala.pd._records import MAX_REPORTED_TYPES, HostStats
from koala.pd.server import MemoryStore, PlacementDriver, create_app
from koala.pd.server._dashboard import cluster_sample
from tests._cluster import APP, Cluster, Proc, cluster_of, url
from tests._etcd import etcd_url, free_port, unique_prefix

__all__ = ["etcd_url"]

CHROMIUM = "/usr/bin/chromium"
REPORTED = 30.0  # a bound for renewals to carry the stats under load (TTL 2 s), not speed
SECRET = "koala-dashboard-test-secret-0123"


@pytest.fixture
def cluster(tmp_path: Path, etcd_url: str) -> Iterator[Cluster]:
    yield from cluster_of(tmp_path, etcd_url, "dashboard")


@pytest.fixture
def memory_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """PD processes on the in-memory store (no etcd: only the access rule is tested)."""
    c = Cluster(tmp_path, "", unique_prefix("dashboard"))
    try:
        yield c
    except BaseException:
        print(c.dump())
        raise
    finally:
        c.close()


def chromium(tmp: Path, *args: str) -> str:
    """Headless Chromium on this machine, its standard output (the DOM with --dump-dom)."""
    profile = tmp / "chromium-profile"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=8000",
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode(errors="replace")


def data(pd: Proc, **kwargs: Any) -> dict[str, Any]:
    resp = httpx.get(f"{url(pd)}/dashboard/data", timeout=10, **kwargs)
    assert resp.status_code == 200, resp.text
    picture: dict[str, Any] = resp.json()
    return picture


def cell_texts(dom: str, table: str) -> list[list[str]]:
    """The rows of ``<table id=table>``'s body, as the texts of their cells."""
    found = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert found, f"no table {table!r} in the page:\n{dom[:3000]}"
    return [
        re.findall(r"<td>(.*?)</td>", row, re.S)
        for row in re.findall(r"<tr>(.*?)</tr>", found.group(1), re.S)
    ]


def element_text(dom: str, ident: str) -> str:
    found = re.search(rf'id="{ident}"[^>]*>([^<]*)<', dom)
    assert found, f"no element {ident!r} in the page:\n{dom[:3000]}"
    return found.group(1)


# ---------------------------------------------------------------- a real cluster


@pytest.mark.slow
def test_the_page_shows_a_live_two_host_cluster_in_chromium(
    cluster: Cluster, tmp_path: Path
) -> None:
    pd = cluster.pd()
    pd_url = url(pd)
    hosts = [cluster.host(pd_url, backend="uvloop"), cluster.host(pd_url, backend="trio")]
    keys = [f"k{n}" for n in range(40)]
    with httpx.Client(timeout=10) as client:
        for key in keys:
            for host in hosts:
                resp = client.get(f"{url(host)}/hit/{key}")
                assert resp.status_code == 200, resp.text
        # renewals (every TTL/3) carry the stats; the page samples every 2 s: poll for
        # a picture of both hosts, with activations and a call rate from those calls
        deadline = time.monotonic() + REPORTED
        while True:
            picture = data(pd)
            by_type = picture["activations_by_type"]
            rates = [h["calls_per_second"] or 0 for h in picture["hosts"]]
            if (
                len(picture["hosts"]) == 2
                and sum(h["activations"] for h in picture["hosts"]) >= len(keys)
                and by_type.get("Counter", 0) >= len(keys)
                and max(rates) > 0
            ):
                break
            assert time.monotonic() < deadline, f"the page never showed the calls: {picture}"
            # calls keep coming, so that a rate between two samples is never zero
            for key in keys[:5]:
                client.get(f"{url(hosts[0])}/hit/{key}")
            time.sleep(0.2)

    # /dashboard/data: plausible numbers
    series = picture["series"]
    assert any((v or 0) > 0 for v in series["calls_per_second"])
    assert any((v or 0) > 0 for v in series["placements_per_second"])
    assert len(series["time"]) == len(series["calls_per_second"]) >= 2
    assert picture["gateway_sessions"] is None  # no gateway in a PD's view
    for host in picture["hosts"]:
        assert host["lease_ttl"] == 2
        assert 0 <= host["renewed_seconds_ago"] < 10
        assert 0 < host["age_seconds"] < 600
    listed = {h["address"]: h["server_id"] for h in picture["hosts"]}
    assert set(listed) == {h.address for h in hosts}

    # the page itself, as a browser draws it
    dom = chromium(tmp_path, "--dump-dom", f"{pd_url}/dashboard/")
    assert element_text(dom, "status") == "live", dom[:3000]
    assert element_text(dom, "hosts-count") == "2"
    assert int(element_text(dom, "activations-count").replace(",", "")) >= len(keys)
    rows = cell_texts(dom, "hosts")
    shown = {row[1]: int(row[0]) for row in rows}
    assert shown == listed, rows
    types = dict(cell_texts(dom, "types"))
    assert int(types["Counter"].replace(",", "")) >= len(keys)

    shot = tmp_path / "dashboard.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", f"{pd_url}/dashboard/")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a drawn page, not a blank one
    keep = os.environ.get("KOALA_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copyfile(shot, keep)


# ---------------------------------------------------------------- the access rule


@pytest.mark.slow
def test_with_a_cluster_secret_and_no_password_the_page_is_off(memory_cluster: Cluster) -> None:
    memory_cluster.extra_env["KOALA_CLUSTER_SECRET"] = SECRET
    pd = memory_cluster.pd(store="memory")
    for path in ("/dashboard/", "/dashboard/data", "/dashboard"):
        resp = httpx.get(f"{url(pd)}{path}", timeout=10)
        assert resp.status_code == 404, resp.text
        assert resp.json() == {"error": "dashboard_off", "message": OFF_REASON}
        assert PASSWORD_ENV in resp.json()["message"]
    # the API behind it is still guarded by the secret
    assert httpx.get(f"{url(pd)}/pd/api/v1/version", timeout=10).status_code == 401


@pytest.mark.slow
def test_with_a_cluster_secret_the_page_needs_the_password(memory_cluster: Cluster) -> None:
    memory_cluster.extra_env["KOALA_CLUSTER_SECRET"] = SECRET
    memory_cluster.extra_env[PASSWORD_ENV] = "s3cret-page"
    pd = memory_cluster.pd(store="memory")
    page = f"{url(pd)}/dashboard/"
    bare = httpx.get(page, timeout=10)
    assert bare.status_code == 401
    assert bare.headers["www-authenticate"].startswith("Basic")
    wrong = httpx.get(page, auth=("ops", "not-it"), timeout=10)
    assert wrong.status_code == 401
    good = httpx.get(page, auth=("ops", "s3cret-page"), timeout=10)
    assert good.status_code == 200
    assert "<title>Koala cluster</title>" in good.text
    picture = data(pd, auth=("anyone", "s3cret-page"))
    assert picture["hosts"] == []
    # the password opens the page only: the API still wants signed requests
    token = base64.b64encode(b"ops:s3cret-page").decode()
    api = httpx.get(
        f"{url(pd)}/pd/api/v1/version", headers={"Authorization": f"Basic {token}"}, timeout=10
    )
    assert api.status_code == 401


@pytest.mark.slow
def test_without_a_secret_the_page_is_open(memory_cluster: Cluster) -> None:
    pd = memory_cluster.pd(store="memory")
    resp = httpx.get(f"{url(pd)}/dashboard", timeout=10, follow_redirects=True)
    assert resp.status_code == 200
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")
    js = httpx.get(f"{url(pd)}/dashboard/static/dashboard.js", timeout=10)
    assert js.status_code == 200
    assert "poll()" in js.text


# ---------------------------------------------------------------- what hosts report


def pd_api() -> httpx.AsyncClient:
    """The PD's API in this process, without a socket (bodies go straight to it)."""
    app = create_app(PlacementDriver(MemoryStore()))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://pd")


@pytest.mark.anyio
async def test_keep_alive_carries_stats_to_the_page() -> None:
    driver = PlacementDriver(MemoryStore())
    client = embedded_pd(driver)
    try:
        server = await client.new_server_id()
        lease = await client.register(server, "127.0.0.1:7001", {"Counter": "app.Counter"}, ttl=15)
        stats = HostStats(calls=12, call_seconds=0.5, activations_by_type={"Counter": 3})
        await client.keep_alive(server, lease, 3, 3, stats=stats)
        sample = cluster_sample(driver)
        (host,) = sample.hosts
        assert (host.server_id, host.address, host.activations) == (server, "127.0.0.1:7001", 3)
        assert (host.calls, host.call_seconds) == (12, 0.5)
        assert host.activations_by_type == {"Counter": 3}
        # a renewal without stats keeps the last ones (an older host sends none)
        await client.keep_alive(server, lease, 3, 3)
        assert cluster_sample(driver).hosts[0].calls == 12
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("stats", "field"),
    [
        ({"calls": -1}, "stats.calls"),
        ({"calls": "7"}, "stats.calls"),
        ({"call_seconds": -0.5}, "stats.call_seconds"),
        ({"call_seconds": 1e300}, "stats.call_seconds"),
        ({"activations_by_type": {"A": -1}}, "stats.activations_by_type.A"),
        ({"activations_by_type": {"": 1}}, "stats.activations_by_type"),
        ({"activations_by_type": {"x" * 300: 1}}, "stats.activations_by_type"),
        ({"activations_by_type": {"a/b": 1}}, "stats.activations_by_type"),
        (
            {"activations_by_type": {f"T{n}": 1 for n in range(MAX_REPORTED_TYPES + 1)}},
            "stats.activations_by_type",
        ),
        ({"calls": 1, "extra": 2}, "stats.extra"),
    ],
)
async def test_bad_stats_are_refused_naming_the_field(stats: dict[str, Any], field: str) -> None:
    async with pd_api() as client:
        body = {"server_id": 1, "lease_id": 1, "stats": stats}
        resp = await client.post("/pd/api/v1/membership/keep_alive", json=body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["field"].startswith(field), resp.json()


@pytest.mark.anyio
async def test_non_finite_call_seconds_are_refused() -> None:
    async with pd_api() as client:
        for raw in ("NaN", "Infinity"):
            body = '{"server_id": 1, "lease_id": 1, "stats": {"call_seconds": RAW}}'
            body = body.replace("RAW", raw)
            resp = await client.post(
                "/pd/api/v1/membership/keep_alive",
                content=body,
                headers={"content-type": "application/json"},
            )
            assert resp.status_code == 422, resp.text
            assert resp.json()["field"] == "stats.call_seconds"


# ---------------------------------------------------------------- History


def host(server_id: int, calls: int, seconds: float, start: float = 1000.0) -> HostSample:
    return HostSample(
        server_id, f"10.0.0.{server_id}:7001", 0.0, 1, start, start, 15, calls, seconds
    )


def test_rates_are_differences_over_time() -> None:
    history = History(10)
    history.add(100.0, ClusterSample([host(1, 0, 0.0), host(2, 0, 0.0)], 0))
    history.add(102.0, ClusterSample([host(1, 100, 1.0), host(2, 60, 0.6)], 8))
    series = history.picture()["series"]
    assert series["calls_per_second"] == [None, 80.0]
    assert series["mean_call_ms"][1] == pytest.approx(10.0)
    assert series["placements_per_second"] == [None, 4.0]
    rates = {h["server_id"]: h["calls_per_second"] for h in history.picture()["hosts"]}
    assert rates == {1: 50.0, 2: 30.0}


def test_a_host_restart_resets_counts_without_negative_rates() -> None:
    history = History(10)
    history.add(100.0, ClusterSample([host(1, 5000, 50.0)], 40))
    # the host restarted (its counts began again) and the PD restarted (placements too)
    history.add(101.0, ClusterSample([host(1, 30, 0.3, start=1100.0)], 2))
    picture = history.picture()
    assert picture["series"]["calls_per_second"][-1] == 30.0
    assert picture["series"]["mean_call_ms"][-1] == pytest.approx(10.0)
    assert picture["series"]["placements_per_second"][-1] == 0.0
    assert picture["hosts"][0]["calls_per_second"] == 30.0


def test_a_host_that_joins_counts_from_zero_and_one_that_left_is_gone() -> None:
    history = History(10)
    history.add(100.0, ClusterSample([host(1, 10, 0.1)], 0))
    history.add(110.0, ClusterSample([host(2, 50, 0.5)], 0))
    picture = history.picture()
    assert picture["series"]["calls_per_second"][-1] == 5.0
    assert [h["server_id"] for h in picture["hosts"]] == [2]


def test_the_history_is_bounded() -> None:
    history = History(5)
    for n in range(50):
        history.add(100.0 + n, ClusterSample([host(1, n * 10, 0.0)], n))
    series = history.picture()["series"]
    assert series["time"] == [145.0, 146.0, 147.0, 148.0, 149.0]
    assert series["calls_per_second"] == [10.0] * 5
    with pytest.raises(ValueError, match="at least 2"):
        History(1)


def test_activations_by_type_add_up_over_hosts() -> None:
    a = HostSample(1, "a:1", 0.0, 3, 0.0, 0.0, 15, activations_by_type={"X": 2, "Y": 1})
    b = HostSample(2, "b:1", 0.0, 4, 0.0, 0.0, 15, activations_by_type={"X": 4})
    history = History()
    history.add(1.0, ClusterSample([a, b], 0))
    assert history.picture()["activations_by_type"] == {"X": 6, "Y": 1}


# ---------------------------------------------------------------- koala dev


@pytest.mark.slow
def test_koala_dev_serves_the_page_with_its_gateway(memory_cluster: Cluster) -> None:
    port, ws = free_port(), free_port()
    cmd = [sys.executable, "-m", "koala.cli", "dev", APP, "--http", f"127.0.0.1:{port}"]
    cmd += ["--gateway", f"127.0.0.1:{ws}", "--log-level", "WARNING"]
    log = memory_cluster.tmp / "dev.log"
    dev = Proc("dev", cmd, memory_cluster.env(), log)
    dev.port = port
    memory_cluster.procs.append(dev)
    found = dev.start(r"cluster page: (http://\S+/dashboard/);")
    assert found.group(1) == f"http://127.0.0.1:{port}/dashboard/"
    with httpx.Client(timeout=10) as client:
        for key in ("a", "b", "c"):
            assert client.get(f"{url(dev)}/hit/{key}").status_code == 200
        deadline = time.monotonic() + REPORTED
        while True:
            picture = data(dev)
            hosts = picture["hosts"]
            if hosts and hosts[0]["activations"] >= 3 and picture["gateway_sessions"] == 0:
                break
            assert time.monotonic() < deadline, f"the page never showed the calls: {picture}"
            time.sleep(0.2)
    assert picture["activations_by_type"] == {"Counter": 3}
    assert picture["hosts"][0]["address"] == "embedded.invalid:1"
    assert dev.stop() == 0
