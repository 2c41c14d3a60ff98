"""A real Prometheus server on loopback for tests: a free port, a temporary directory,
scraping the targets it is given every ``interval`` seconds.

```python
from koala.testing.prometheus import PrometheusProcess

prom = PrometheusProcess(["127.0.0.1:8001", "127.0.0.1:8002"])
prom.start()                     # waits until it is ready; RuntimeError (with its log) if not
prom.wait_for_targets()          # every target scraped once and up
prom.query("sum(koala_calls_total)")   # the query API's result list
prom.destroy()                   # stops it and removes its directory
```

Debian's ``prometheus`` package (``make services`` installs it) or ``KOALA_TEST_PROMETHEUS``
pointing at a binary. Queries use the HTTP API (``/api/v1/query``) as Grafana would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from . import free_port
from ._server import ServerProcess

PROMETHEUS_ENV = "KOALA_TEST_PROMETHEUS"


def prometheus_binary() -> str:
    found = os.environ.get(PROMETHEUS_ENV) or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.path.exists(found):
        raise RuntimeError(
            "prometheus is not installed: run `make services` (Debian: apt-get install "
            f"prometheus) or point {PROMETHEUS_ENV} at a prometheus binary"
        )
    return found


class PrometheusProcess(ServerProcess):
    """One Prometheus server scraping ``targets`` (HOST:PORT, path ``metrics_path``)."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        interval: float = 0.5,
        metrics_path: str = "/metrics",
    ) -> None:
        if not targets:
            raise ValueError("PrometheusProcess needs at least one target to scrape")
        self.targets = list(targets)
        self.dir = tempfile.mkdtemp(prefix="koala-prometheus-")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "prometheus.log")
        self.proc: subprocess.Popen[bytes] | None = None
        ms = max(1, round(interval * 1000))
        config = {  # JSON is YAML: no YAML writer needed
            "global": {"scrape_interval": f"{ms}ms", "scrape_timeout": f"{ms}ms"},
            "scrape_configs": [
                {
                    "job_name": "koala",
                    "metrics_path": metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }
        self.config_path = os.path.join(self.dir, "prometheus.yml")
        with open(self.config_path, "w") as f:
            json.dump(config, f)

    def start(self, timeout: float = 30.0) -> None:
        cmd = [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={os.path.join(self.dir, 'data')}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus was not ready within {timeout} s:\n{self.log()}")

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        resp = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus refused {expr!r}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The one value of an instant query that yields a single series (None: no series)."""
        result = self.query(expr)
        if not result:
            return None
        if len(result) > 1:
            raise RuntimeError(f"{expr!r} gave {len(result)} series; aggregate it (sum(...))")
        return float(result[0]["value"][1])

    def wait_until(
        self, expr: str, check: Callable[[float | None], bool], timeout: float = 20.0
    ) -> float | None:
        """Poll ``expr`` until ``check(value)`` holds; the value, or AssertionError."""
        deadline = time.monotonic() + timeout
        seen: float | None = None
        while time.monotonic() < deadline:
            seen = self.value(expr)
            if check(seen):
                return seen
            time.sleep(0.2)
        raise AssertionError(f"{expr!r} stayed at {seen!r} for {timeout} s")

    def wait_for_targets(self, timeout: float = 20.0) -> None:
        """Until every target has been scraped and answered (``up == 1``)."""
        want = len(self.targets)
        self.wait_until("sum(up)", lambda v: v == want, timeout)
