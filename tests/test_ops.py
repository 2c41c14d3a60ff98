"""Operating real `koala` processes: SIGTERM at every stage, a port in use in one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._cluster import Cluster, Proc, cluster_of
from tests._etcd import free_port

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "_cluster_app.py")
GATEWAY_KEY = "a-gateway-key-for-the-ops-tests"
STOP_WITHIN = 5.0  # seconds from SIGTERM to exit: a few, where minutes was the bug


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    # no etcd of its own: each test says which PD it wants (an etcd that is down here)
    yield from cluster_of(tmp_path, f"http://127.0.0.1:{free_port()}", "ops")


def koala(*args: str) -> list[str]:
    return [sys.executable, "-m", "koala.cli", *args]


def _host_cmd(pd_url: str, *extra: str) -> list[str]:
    return koala("host", APP, "--pd", pd_url, "--listen", "127.0.0.1:0", *extra)


def _stop_in_time(proc: Proc) -> float:
    """SIGTERM; the seconds it took to exit (fails if it took more than STOP_WITHIN)."""
    started = time.monotonic()
    code = proc.stop(timeout=STOP_WITHIN)
    took = time.monotonic() - started
    assert code == 0, proc.output()
    return took


# ---------------------------------------------------------------- SIGTERM while registering


def test_sigterm_stops_a_host_whose_pd_refuses_connections(cluster: Cluster) -> None:
    proc = Proc(
        "host", _host_cmd(f"http://127.0.0.1:{free_port()}"), cluster.env(), cluster.tmp / "h.log"
    )
    cluster.procs.append(proc)
    proc.start(r"cannot register with the PD")  # it is in its retry loop
    _stop_in_time(proc)
    out = proc.output()
    assert "koala host: stopped before it could register with the PD" in out
    assert "koala host: stopped" in out.splitlines()[-1]
    assert "Traceback" not in out


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_sigterm_stops_a_host_whose_pd_has_no_etcd(cluster: Cluster, backend: str) -> None:
    pd = cluster.pd()  # its etcd (cluster.etcd_url) is a port nobody listens on
    proc = Proc(
        "host",
        _host_cmd(f"http://127.0.0.1:{pd.port}", "--log-level", "WARNING"),
        cluster.env(backend),
        cluster.tmp / "h.log",
    )
    cluster.procs.append(proc)
    proc.start(r"cannot register with the PD")
    _stop_in_time(proc)
    assert "koala host: stopped before it could register with the PD" in proc.output()
    _stop_in_time(pd)


def test_a_pd_with_etcd_down_and_a_gateway_with_the_pd_down_stop_on_sigterm(
    cluster: Cluster,
) -> None:
    pd = cluster.pd()
    cluster.extra_env["KOALA_GATEWAY_KEY"] = GATEWAY_KEY
    gw = Proc(
        "gateway",
        koala("gateway", "--pd", f"http://127.0.0.1:{free_port()}", "--listen", "127.0.0.1:0"),
        cluster.env(),
        cluster.tmp / "gw.log",
    )
    cluster.procs.append(gw)
    gw.start(r"koala gateway: ws://")
    _stop_in_time(gw)
    _stop_in_time(pd)
    assert "koala gateway: stopped" in gw.output()
    assert "koala pd: stopped" in pd.output()


def test_sigterm_stops_a_registered_host_whose_pd_died(cluster: Cluster) -> None:
    pd = cluster.pd(store="memory")
    host = cluster.host(f"http://127.0.0.1:{pd.port}")
    pd.kill()
    started = time.monotonic()
    assert host.stop(timeout=30) == 0, host.output()
    # no actor to drain; leaving the PD is bounded (5 s) and a dead PD fails at once
    assert time.monotonic() - started < 15, host.output()
    assert "koala host: stopped" in host.output()


# ---------------------------------------------------------------- a port in use


@pytest.fixture
def taken() -> Iterator[tuple[str, int]]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()


def _fails_in_one_line(proc: Proc, address: str) -> None:
    assert proc.popen is not None
    code = proc.popen.wait(timeout=60)
    out = proc.output()
    assert code == 2, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert errors == [f"koala: error: cannot listen on {address}: Address already in use"], out
    assert "Traceback" not in out, out


def _start(cluster: Cluster, name: str, cmd: list[str], backend: str = "asyncio") -> Proc:
    proc = Proc(name, cmd, cluster.env(backend), cluster.tmp / f"{name}.log")
    cluster.procs.append(proc)
    with open(proc.log, "ab") as out:
        proc.popen = subprocess.Popen(cmd, cwd=ROOT, env=proc.env, stdout=out, stderr=out)
    return proc


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_host_listen_port_in_use(cluster: Cluster, taken: tuple[str, int], backend: str) -> None:
    pd = cluster.pd(store="memory")
    address = f"{taken[0]}:{taken[1]}"
    cmd = koala("host", APP, "--pd", f"http://127.0.0.1:{pd.port}", "--listen", address)
    _fails_in_one_line(_start(cluster, "host", cmd, backend), address)


def test_a_host_http_port_in_use(cluster: Cluster, taken: tuple[str, int]) -> None:
    pd = cluster.pd(store="memory")
    address = f"{taken[0]}:{taken[1]}"
    cmd = _host_cmd(f"http://127.0.0.1:{pd.port}", "--http", address, "--log-level", "ERROR")
    _fails_in_one_line(_start(cluster, "host", cmd), address)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_pd_listen_port_in_use(cluster: Cluster, taken: tuple[str, int], backend: str) -> None:
    address = f"{taken[0]}:{taken[1]}"
    cmd = koala("pd", "--store", "memory", "--listen", address)
    _fails_in_one_line(_start(cluster, "pd", cmd, backend), address)


def test_a_gateway_listen_port_in_use(cluster: Cluster, taken: tuple[str, int]) -> None:
    cluster.extra_env["KOALA_GATEWAY_KEY"] = GATEWAY_KEY
    address = f"{taken[0]}:{taken[1]}"
    cmd = koala("gateway", "--pd", f"http://127.0.0.1:{free_port()}", "--listen", address)
    _fails_in_one_line(_start(cluster, "gateway", cmd), address)


@pytest.mark.parametrize(
    ("app", "flag"), [("examples/echo.py", "--http"), ("examples/chat.py", "--gateway")]
)
def test_koala_dev_ports_in_use(
    cluster: Cluster, taken: tuple[str, int], app: str, flag: str
) -> None:
    address = f"{taken[0]}:{taken[1]}"
    cmd = koala("dev", app, "--log-level", "ERROR", flag, address)
    _fails_in_one_line(_start(cluster, "dev", cmd), address)


# ---------------------------------------------------------------- koala status --wait-hosts


WAIT_ONE_SECOND = ("--wait-hosts", "1", "--wait-timeout", "1")


def test_status_wait_hosts_gives_up_in_time_with_the_reason() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        koala("status", "--pd", f"http://127.0.0.1:{free_port()}", *WAIT_ONE_SECOND),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("koala: error: waited 1 s for 1 host(s) (--wait-hosts): ")
    assert "no PD can be reached" in lines[0]
    assert time.monotonic() - started < 30  # it did not wait for the PD client's retries


def test_status_wait_hosts_waits_for_the_hosts(cluster: Cluster) -> None:
    pd = cluster.pd(store="memory")
    pd_url = f"http://127.0.0.1:{pd.port}"
    waiting = subprocess.Popen(
        koala("status", "--pd", pd_url, "--wait-hosts", "1", "--wait-timeout", "60"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(0.5)
        assert waiting.poll() is None  # no host yet: still waiting
        host = cluster.host(pd_url)
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert "1 host(s)" in out
    assert host.address in out
