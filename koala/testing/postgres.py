"""A private PostgreSQL server for tests and benchmarks (Debian's ``postgresql``).

``initdb`` into a temp dir, ``postgres`` on a free loopback port, stopped and deleted at
the end. Run as root (CI containers), the server runs as ``nobody``: PostgreSQL refuses
root. The server gets SIGQUIT if this process dies, so a killed run leaves no server
behind. ``start_server()`` starts one per process and stops it at exit.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from . import free_port

PR_SET_PDEATHSIG = 1
START_TIMEOUT = 60.0


def find_bin(name: str) -> str:
    """The path of a PostgreSQL program (Debian keeps them out of PATH)."""
    found = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise RuntimeError(
        f"PostgreSQL's {name} was not found (looked in /usr/lib/postgresql/*/bin and PATH): "
        "run `make services` (or `apt-get install -y postgresql`)"
    )


def _as_user(uid: int | None, gid: int | None) -> Callable[[], None]:
    def setup() -> None:
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # after setuid: a credential change clears the parent-death signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT)

    return setup


class PostgresServer:
    """One private server. ``url`` connects as the trusted superuser ``koala``."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="koala-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = free_port()
        self.url = f"postgresql://koala@127.0.0.1:{self.port}/postgres"
        self._proc: subprocess.Popen[bytes] | None = None
        self._uid: int | None = None
        self._gid: int | None = None
        if os.geteuid() == 0:
            user = pwd.getpwnam("nobody")
            self._uid, self._gid = user.pw_uid, user.pw_gid
            os.chown(self.dir, user.pw_uid, user.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            argv,
            preexec_fn=_as_user(self._uid, self._gid),
            capture_output=True,
            text=True,
            cwd=self.dir,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")

    def init(self) -> None:
        self._run(
            find_bin("initdb"),
            "-D",
            str(self.data),
            "-U",
            "koala",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    find_bin("postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    str(self.dir),
                    "-c",
                    "max_connections=200",
                ],
                preexec_fn=_as_user(self._uid, self._gid),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"postgres did not accept connections in {START_TIMEOUT:g} s:\n"
                        f"{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"

    def _signal_and_wait(self, sig: int) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def crash(self) -> None:
        """Immediate shutdown (SIGQUIT): no checkpoint; the next start runs crash recovery."""
        self._signal_and_wait(signal.SIGQUIT)

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGINT)  # fast shutdown
        self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


_server: PostgresServer | None = None


def start_server() -> PostgresServer:
    """The session's server: started once, stopped when the process exits."""
    global _server
    if _server is None:
        server = PostgresServer()
        try:
            server.init()
            server.start()
        except BaseException:
            server.stop()
            raise
        _server = server
        atexit.register(server.stop)
    return _server
