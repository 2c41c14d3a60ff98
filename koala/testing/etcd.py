"""A real etcd on loopback for tests and benchmarks: one member, free ports, a temporary
data directory, short raft timings.

```python
from koala.testing.etcd import EtcdProcess

etcd = EtcdProcess()
etcd.start()           # waits until it answers; RuntimeError (with its log) if not
...                    # etcd.url is http://127.0.0.1:PORT
etcd.destroy()         # stops it and removes its directory
```

etcd runs with the settings docs/pd.md tells a user to run it with: an explicit
``--quota-backend-bytes`` (``quota_bytes``; a test of a full etcd passes a few MiB) and
etcd's default ``--max-txn-ops`` (128, what the PD's batches assume). No
auto-compaction: the PD compacts etcd's history itself. etcd cannot take port 0 for
its client URL, so free ports are picked first (bind to 0, read, close).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import httpx

from . import free_port
from ._server import ServerProcess

ETCD_ENV = "KOALA_TEST_ETCD"  # path of the etcd binary (default: etcd on PATH)
DEFAULT_QUOTA_BYTES = 2 * 1024**3  # etcd's own default, given explicitly as docs/pd.md says
MAX_TXN_OPS = 128


def etcd_binary() -> str:
    found = os.environ.get(ETCD_ENV) or shutil.which("etcd") or "/usr/bin/etcd"
    if not os.path.exists(found):
        raise RuntimeError(
            "etcd is not installed: run `make services` (Debian: apt-get install etcd-server) "
            f"or point {ETCD_ENV} at an etcd binary"
        )
    return found


class _PortTaken(Exception):
    """etcd could not bind its port: another process took it."""


class EtcdProcess(ServerProcess):
    """One etcd member on loopback, in its own temporary directory.

    ``quota_bytes``: etcd's ``--quota-backend-bytes`` (beyond it, etcd raises its
    NOSPACE alarm and refuses writes)."""

    def __init__(self, *, quota_bytes: int = DEFAULT_QUOTA_BYTES) -> None:
        if isinstance(quota_bytes, bool) or not isinstance(quota_bytes, int) or quota_bytes < 1:
            raise ValueError(f"quota_bytes must be a positive number of bytes, got {quota_bytes!r}")
        self.quota_bytes = quota_bytes
        self.dir = tempfile.mkdtemp(prefix="koala-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(self.dir, "etcd.log")
        self._served = False  # once it has served, its URL is known: it keeps its ports

    def start(self, timeout: float = 20.0) -> None:
        """Start it and wait until it answers. A first start whose port another process
        took meanwhile (free_port only found it free) tries again on other ports."""
        for _ in range(3):
            try:
                self._start(timeout)
            except _PortTaken:
                self.client_port, self.peer_port = free_port(), free_port()
                self.url = f"http://127.0.0.1:{self.client_port}"
                continue
            self._served = True
            return
        self._start(timeout)

    def _start(self, timeout: float) -> None:
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [
            etcd_binary(),
            "--name=koala-test",
            f"--data-dir={os.path.join(self.dir, 'data')}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=koala-test={peer}",
            f"--quota-backend-bytes={self.quota_bytes}",
            f"--max-txn-ops={MAX_TXN_OPS}",
            "--heartbeat-interval=10",
            "--election-timeout=100",
            "--log-level=error",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if not self._served and "address already in use" in self.log():
                    with open(self.log_path, "w"):
                        pass  # the next attempt's log starts clean
                    raise _PortTaken
                raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n{self.log()}")
            try:
                resp = httpx.post(f"{self.url}/v3/kv/range", json={"key": "AA=="}, timeout=1)
                if resp.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"etcd did not answer within {timeout} s:\n{self.log()}")
