"""`koala dev` for real: a process on each backend, HTTP through hypercorn, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from koala import ConfigError
from koala._backend import parse_backend
from koala.cli import check_bind
from koala.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ["asyncio", "trio"] + (["uvloop"] if sys.platform != "win32" else [])


def koala_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "koala.cli", *args]


def start_dev(target: str, backend: str, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "KOALA_BACKEND": backend, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        koala_cmd("dev", target, "--http", f"127.0.0.1:{port}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_http(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"koala dev exited early ({proc.returncode}):\n{out}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail("koala dev did not start serving HTTP in time")


@pytest.fixture
def stop_later() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_host_links_beyond_loopback_may_use_mutual_tls_instead_of_the_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _env(monkeypatch, None, None)
    check_bind("0.0.0.0", "--listen", links=True, mutual_tls=True)  # the certificate proves
    with pytest.raises(ConfigError, match="or give --tls-cert, --tls-key and --tls-ca"):
        check_bind("0.0.0.0", "--listen", links=True)  # no TLS, no secret
    with pytest.raises(ConfigError, match="set KOALA_CLUSTER_SECRET"):
        check_bind("0.0.0.0", "--listen", mutual_tls=True)  # the PD, hosts' HTTP: the secret


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["examples/echo.py", "examples.echo"])
def test_dev_serves_the_seed_echo_and_stops_on_ctrl_c(
    backend: str, target: str, stop_later: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    proc = start_dev(target, backend, port)
    stop_later.append(proc)
    wait_for_http(port, proc)
    assert httpx.get(f"http://127.0.0.1:{port}/echo/hi").json() == "hi"
    assert httpx.get(f"http://127.0.0.1:{port}/").json() == "hello world"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert f"on {backend}; HTTP on http://127.0.0.1:{port}" in out
    assert "koala dev: stopped" in out
    assert "Traceback" not in out


def test_sigterm_stops_cleanly_too(stop_later: list[subprocess.Popen[str]]) -> None:
    port = free_port()
    proc = start_dev("examples/echo.py", "asyncio", port)
    stop_later.append(proc)
    wait_for_http(port, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out


def test_bad_backend_fails_at_once_listing_the_valid_ones() -> None:
    env = {**os.environ, "KOALA_BACKEND": "tornado"}
    proc = subprocess.run(
        koala_cmd("dev", "examples/echo.py"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "KOALA_BACKEND='tornado' is not a valid backend" in proc.stderr
    assert "asyncio, uvloop, trio" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dev", "examples/nope.py"], "app file 'examples/nope.py' does not exist"),
        (["dev", "examples/echo.py", "--http", "8000"], "--http must look like HOST:PORT"),
        (["dev", "examples/echo.py", "--http", "0.0.0.0:0"], "set KOALA_CLUSTER_SECRET"),
        (["dev", "no_such_module"], "cannot import app module 'no_such_module'"),
    ],
)
def test_bad_arguments_are_clear_errors(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KOALA_CLUSTER_SECRET"}
    proc = subprocess.run(
        koala_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, "asyncio"), ("", "asyncio"), ("TRIO", "trio"), ("uvloop", "uvloop")],
)
def test_parse_backend(value: str | None, expected: str) -> None:
    assert parse_backend(value).name == expected


def test_parse_backend_rejects_unknown() -> None:
    with pytest.raises(ConfigError, match="use one of: asyncio, uvloop, trio"):
        parse_backend("gevent")


# ---------------------------------------------------------------- the bind rule

REAL_KEY = "a-real-gateway-key-0123456789"


def _env(monkeypatch: pytest.MonkeyPatch, secret: str | None, key: str | None) -> None:
    for name, value in (("KOALA_CLUSTER_SECRET", secret), ("KOALA_GATEWAY_KEY", key)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2", "::ffff:127.0.0.1"])
def test_loopback_needs_nothing(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    _env(monkeypatch, None, None)
    check_bind(host, "--listen")
    check_bind(host, "--listen", gateway=True)


def test_a_gateway_beyond_loopback_needs_its_key_not_the_cluster_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _env(monkeypatch, None, REAL_KEY)
    check_bind("0.0.0.0", "--listen", gateway=True)  # the key is enough
    with pytest.raises(ConfigError, match="set KOALA_CLUSTER_SECRET"):
        check_bind("0.0.0.0", "--listen")  # hosts' listeners still need the secret


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (None, "KOALA_GATEWAY_KEY is not set"),
        ("", "KOALA_GATEWAY_KEY is not set"),
        ("koala-dev-key", "KOALA_GATEWAY_KEY is the development key"),
        ("short", "KOALA_GATEWAY_KEY is shorter than 16 characters"),
    ],
)
def test_a_gateway_without_a_real_key_stays_on_loopback(
    monkeypatch: pytest.MonkeyPatch, key: str | None, why: str
) -> None:
    _env(monkeypatch, "the-cluster-secret", key)  # the cluster secret does not help
    with pytest.raises(ConfigError) as info:
        check_bind("0.0.0.0", "--gateway", gateway=True)
    assert why in str(info.value)
    assert "set KOALA_GATEWAY_KEY" in str(info.value)
    assert "or listen on 127.0.0.1" in str(info.value)


def test_koala_gateway_refuses_a_public_listen_without_its_key() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if k != "KOALA_GATEWAY_KEY"},
        "KOALA_CLUSTER_SECRET": "the-cluster-secret",
    }
    proc = subprocess.run(
        koala_cmd("gateway", "--pd", "http://127.0.0.1:9", "--listen", "0.0.0.0:0"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "KOALA_GATEWAY_KEY is not set: set KOALA_GATEWAY_KEY" in proc.stderr


def test_koala_dev_serves_a_public_gateway_with_its_key_and_no_secret(
    stop_later: list[subprocess.Popen[str]],
) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "KOALA_CLUSTER_SECRET"},
        "KOALA_GATEWAY_KEY": REAL_KEY,
        "PYTHONUNBUFFERED": "1",
    }
    proc = subprocess.Popen(
        koala_cmd("dev", "examples/chat.py", "--gateway", f"0.0.0.0:{port}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stop_later.append(proc)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    line = ""
    while "gateway on ws://" not in line:
        assert time.monotonic() < deadline, "koala dev did not serve the gateway in time"
        line = proc.stdout.readline()
        assert line, "koala dev exited before serving the gateway"
    assert f"gateway on ws://0.0.0.0:{port}" in line
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
