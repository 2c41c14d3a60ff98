"""Real cluster processes for the tests: `koala pd` and `koala host`, on free ports.

Each process writes its output to a log file in the test's directory (no pipe to fill);
start-up waits for the line the process prints once it serves. ``Cluster`` kills
whatever is still running when the test ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests._etcd import free_port, unique_prefix

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "_cluster_app.py")
STARTUP = 30.0  # a bound on start-up under load, not a speed claim


class Proc:
    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.address = ""  # a host's transport address, once started

    def start(self, ready: str) -> re.Match[str]:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + STARTUP
        pattern = re.compile(ready)
        while time.monotonic() < deadline:
            found = pattern.search(self.output())
            if found:
                return found
            if self.popen.poll() is not None:
                code = self.popen.returncode
                raise AssertionError(f"{self.name} exited ({code}):\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} did not start in {STARTUP} s:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait()

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; the exit code (killed if it does not stop in time)."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(
                    f"{self.name} did not stop on SIGTERM:\n{self.output()}"
                ) from None
        return self.popen.returncode


class Cluster:
    """PD and host processes of one test, sharing an events file and a key prefix."""

    def __init__(self, tmp: Path, etcd_url: str, prefix: str) -> None:
        self.tmp = tmp
        self.etcd_url = etcd_url
        self.prefix = prefix
        self.events = tmp / "events.log"
        self.procs: list[Proc] = []
        self.extra_env: dict[str, str] = {}  # e.g. KOALA_CLUSTER_SECRET, KOALA_TLS_*

    def env(self, backend: str = "asyncio") -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        env["KOALA_BACKEND"] = backend
        env["KOALA_TEST_EVENTS"] = str(self.events)
        env.pop("KOALA_CLUSTER_SECRET", None)
        env.update(self.extra_env)
        return env

    def pd(
        self,
        port: int = 0,
        backend: str = "asyncio",
        store: str = "etcd",
        extra: tuple[str, ...] = (),
    ) -> Proc:
        """A `koala pd` process; ``extra``: more flags."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "koala.cli", "pd", "--listen", f"127.0.0.1:{port}"]
        if store == "etcd":
            cmd += ["--etcd", self.etcd_url, "--prefix", self.prefix]
        else:
            cmd += ["--store", "memory"]
        cmd += list(extra)
        proc = Proc(f"pd:{port}", cmd, self.env(backend), self.tmp / f"pd-{port}.log")
        proc.port = port
        self.procs.append(proc)
        proc.start(r"koala pd: https?://")
        return proc

    def host(
        self,
        pd_urls: str,
        backend: str = "asyncio",
        ttl: int = 2,
        default_timeout: float = 10.0,
        extra: tuple[str, ...] = (),
    ) -> Proc:
        """A `koala host` process; ``extra``: more flags."""
        port = free_port()
        cmd = [sys.executable, "-m", "koala.cli", "host", APP, "--pd", pd_urls]
        cmd += ["--listen", "127.0.0.1:0", "--http", f"127.0.0.1:{port}", "--ttl", str(ttl)]
        cmd += ["--default-timeout", str(default_timeout), "--log-level", "WARNING"]
        cmd += list(extra)
        proc = Proc(f"host:{port}:{backend}", cmd, self.env(backend), self.tmp / f"host-{port}.log")
        proc.port = port
        self.procs.append(proc)
        found = proc.start(r"koala host: server \d+ on ([^;\s]+);")
        proc.address = found.group(1)
        return proc

    def activations(self) -> Counter[str]:
        """Activations per key, as the actors recorded them."""
        return Counter(
            line.split()[1] for line in self.event_lines() if line.startswith("activate ")
        )

    def event_lines(self) -> list[str]:
        try:
            return self.events.read_text().splitlines()
        except FileNotFoundError:
            return []

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()

    def dump(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in self.procs)


def cluster_of(tmp: Path, etcd_url: str, name: str) -> Iterator[Cluster]:
    """A test's cluster on ``etcd_url``, for a fixture to yield from: its processes are
    killed at the end, and their output printed (pytest shows it for a failed test)."""
    c = Cluster(tmp, etcd_url, unique_prefix(name))
    try:
        yield c
    finally:
        c.close()
        print(c.dump())


def url(proc: Proc) -> str:
    return f"http://127.0.0.1:{proc.port}"


def stats(proc: Proc) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(url(proc) + "/stats", timeout=10).json()
    return data


def double_activations(lines: list[str]) -> list[str]:
    """Every moment a key had two live activations, from the actors' own event lines
    (``activate|deactivate KEY PID``, in the order they were written); empty if none.

    An activation is live from its ``activate`` line to the ``deactivate`` line of the
    same key and pid. Only for processes that were never SIGKILLed: a killed host
    writes no ``deactivate``, so its activations would look live for ever."""
    live: dict[str, set[str]] = {}
    problems: list[str] = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("activate", "deactivate"):
            problems.append(f"line {n}: malformed event {line!r}")
            continue
        kind, key, pid = parts
        pids = live.setdefault(key, set())
        if kind == "activate":
            if pids:
                problems.append(f"line {n}: {key} activated in {pid} while live in {sorted(pids)}")
            pids.add(pid)
        elif pid in pids:
            pids.remove(pid)
        else:
            problems.append(f"line {n}: {key} deactivated in {pid}, where it was not live")
    return problems
