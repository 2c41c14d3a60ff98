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
