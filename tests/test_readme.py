"""The README's "A cluster" block, run as written: etcd, a PD, two hosts, `koala status`
and a gateway, as real processes started by bash from the block's own lines.

Only what must differ on a shared machine is changed: every 127.0.0.1 port becomes a
free one, /tmp/etcd a directory of the test, and each background line's output goes to
a log file (so the test can see it). The lines run in one bash, in order, with
``set -e``: an export is seen by the lines after it, exactly as in a terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._etcd import free_port

ROOT = Path(__file__).resolve().parent.parent
STARTUP = 60.0  # a bound on the whole block under load, not a speed claim


def readme_block(title: str = "## A cluster") -> list[str]:
    """The lines of the first ```sh block after ``title`` in README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(title)
    found = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert found, f"no ```sh block after {title!r} in README.md"
    return [line for line in found.group(1).splitlines() if line.strip()]


def _split_comment(line: str) -> tuple[str, str]:
    """A line's command and its trailing ``# comment`` (a # after whitespace)."""
    found = re.search(r"\s+#", line)
    return (line[: found.start()], line[found.start() :]) if found else (line, "")


def script_of(lines: list[str], tmp: Path) -> tuple[str, dict[int, int]]:
    """The block as a bash script for this test, and the ports it moved (old -> new)."""
    ports: dict[int, int] = {}

    def move(found: re.Match[str]) -> str:
        old = int(found.group(1))
        if old not in ports:
            ports[old] = free_port()
        return f"127.0.0.1:{ports[old]}"

    out = ["set -euo pipefail", f": > {tmp}/pids"]
    for n, line in enumerate(lines):
        command, _ = _split_comment(line)
        command = re.sub(r"127\.0\.0\.1:(\d+)", move, command)
        command = command.replace("/tmp/etcd", str(tmp / "etcd"))
        if command.rstrip().endswith("&"):
            log = tmp / f"line{n}.log"
            out.append(f"{command.rstrip()[:-1].rstrip()} > {log} 2>&1 &")
            out.append(f"echo $! >> {tmp}/pids")
        else:
            out.append(command)
    return "\n".join(out) + "\n", ports


def _pids(tmp: Path) -> list[int]:
    try:
        return [int(p) for p in (tmp / "pids").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not reaped by bash, which has exited too) counts as gone
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _stop(pids: list[int], timeout: float) -> list[int]:
    """SIGTERM each, newest first; the pids still alive after ``timeout``."""
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _koala_command(tmp: Path) -> Path:
    """A directory with a `koala` that runs this checkout's koala.cli with this
    interpreter: the installed console script may belong to another checkout."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    koala = bin_dir / "koala"
    koala.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m koala.cli "$@"\n')
    koala.chmod(0o755)
    return bin_dir


@pytest.fixture
def block_tmp(tmp_path: Path) -> Iterator[Path]:
    """A directory for the block; whatever the block started is killed at the end."""
    yield tmp_path
    for pid in _stop(_pids(tmp_path), 20):
        os.kill(pid, signal.SIGKILL)
    for log in sorted(tmp_path.glob("line*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")


def test_the_readme_cluster_block_runs_as_written(block_tmp: Path) -> None:
    lines = readme_block()
    script, ports = script_of(lines, block_tmp)
    assert {2379, 9000, 7001, 7002, 8001, 8002, 8003} <= set(ports), ports
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOALA_")}
    env["PATH"] = f"{_koala_command(block_tmp)}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    ran = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=STARTUP,
    )
    assert ran.returncode == 0, f"{ran.stdout}\n{ran.stderr}\n--- script\n{script}"
    # `koala status --wait-hosts 2` printed the table once both hosts had joined
    assert "2 host(s)" in ran.stdout, ran.stdout
    for port in (ports[7001], ports[7002]):
        assert f"127.0.0.1:{port}" in ran.stdout
    assert len(_pids(block_tmp)) == 5  # etcd, the PD, two hosts, the gateway

    gateway_log = block_tmp / f"line{len(lines) - 1}.log"
    deadline = time.monotonic() + STARTUP
    while "koala gateway: ws://" not in gateway_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, gateway_log.read_text()
        assert all(_alive(p) for p in _pids(block_tmp)), "a process of the block died"
        time.sleep(0.1)

    # the echo actor answers through either host's HTTP, wherever it lives
    for port in (ports[8001], ports[8002]):
        answer = httpx.get(f"http://127.0.0.1:{port}/echo/hi", timeout=30)
        assert answer.status_code == 200
        assert answer.json() == "hi"

    left = _stop(_pids(block_tmp), 20)
    assert not left, f"still running 20 s after SIGTERM: {left}"
    logs = {log.name: log.read_text(errors="replace") for log in block_tmp.glob("line*.log")}
    for name, text in logs.items():
        assert "Traceback" not in text, (name, text)
    assert sum("koala host: stopped" in text for text in logs.values()) == 2
