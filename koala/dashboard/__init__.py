"""The live cluster page: ``/dashboard`` on the PD (and on ``koala dev``'s HTTP port).

A :class:`Dashboard` samples the cluster every ``period`` seconds through a
``sample()`` function its owner gives (the PD reads its host table and the reports the
hosts send with their renewals), keeps the last ``points`` samples (ten minutes by
default: bounded), and serves

* ``/dashboard``: a static page (HTML, CSS and JS shipped in this package: no build
  step, no CDN), which polls
* ``/dashboard/data``: the latest picture as JSON: hosts with load, activations, lease
  and age; activations per actor type; and series of calls per second, mean call
  latency, placements per second and gateway sessions.

The page is read-only. It is served to anyone only where the PD would be (loopback,
or without a cluster secret); with a cluster secret it needs ``password`` (HTTP Basic,
any user name), and with a secret but no password it is off (404, saying why).
:func:`access_from_env` applies that rule to ``KOALA_DASHBOARD_PASSWORD`` (an
environment variable only: a password on a command line shows in ``ps``).
"""

from __future__ import annotations

import base64
import hmac
import importlib.resources
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

DEFAULT_PERIOD: Final = 2.0
DEFAULT_POINTS: Final = 300  # ten minutes at the default period
MAX_TYPES: Final = 500  # actor types shown (the most activations first)
PASSWORD_ENV: Final = "KOALA_DASHBOARD_PASSWORD"
OFF_REASON: Final = (
    "the cluster page is off: this PD has a cluster secret (KOALA_CLUSTER_SECRET), so "
    f"the page needs a password; set {PASSWORD_ENV} where the PD runs and open "
    "/dashboard/ with any user name and that password"
)

log = logging.getLogger("koala.dashboard")

_STATIC: Final = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS: Final = {
    # the page loads only its own files and talks only to its own origin
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class HostSample:
    """One host as the PD last heard of it."""

    server_id: int
    address: str
    load: float
    activations: int
    start_time: float  # seconds since the epoch
    renew_time: float
    lease_ttl: int
    calls: int = 0  # calls served since the host started (as the host reports)
    call_seconds: float = 0.0  # their total time
    activations_by_type: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClusterSample:
    """What :class:`Dashboard` asks its owner for, every period."""

    hosts: list[HostSample]
    placements: int  # actors placed since the PD started
    gateway_sessions: int | None = None  # None: no gateway in view


def access_from_env(
    secret: bool, environ: Mapping[str, str] | None = None
) -> tuple[str | None, str | None]:
    """``(password, closed_reason)`` for :class:`Dashboard`, by the page's access rule:
    a password in ``KOALA_DASHBOARD_PASSWORD`` is always asked for; without one the
    page is open when there is no cluster secret (``secret`` False: the PD then listens
    on loopback only), and off when there is one."""
    password = (os.environ if environ is None else environ).get(PASSWORD_ENV) or None
    if password is not None:
        return password, None
    return None, OFF_REASON if secret else None


class _Point:
    __slots__ = ("calls_per_second", "mean_call_ms", "placements_per_second", "sessions", "t")

    def __init__(
        self,
        t: float,
        calls: float | None,
        mean_ms: float | None,
        placed: float | None,
        sessions: int | None,
    ) -> None:
        self.t, self.calls_per_second, self.mean_call_ms = t, calls, mean_ms
        self.placements_per_second, self.sessions = placed, sessions


class History:
    """The last ``points`` samples, as rates between consecutive ones."""

    def __init__(self, points: int = DEFAULT_POINTS) -> None:
        if points < 2:
            raise ValueError(f"a history needs at least 2 points, got {points}")
        self._points: deque[_Point] = deque(maxlen=points)
        self._last: tuple[float, ClusterSample] | None = None
        self._host_rates: dict[int, float] = {}
        self.latest: ClusterSample | None = None
        self.latest_time = 0.0

    def add(self, now: float, sample: ClusterSample) -> None:
        calls = mean_ms = placed = None
        rates: dict[int, float] = {}
        if self._last is not None:
            then, before = self._last
            span = now - then
            if span > 0:
                old = {h.server_id: h for h in before.hosts}
                total_calls, total_seconds = 0, 0.0
                for host in sample.hosts:
                    prev = old.get(host.server_id)
                    # a host that restarted (its counts went down) or just joined: from 0
                    base_calls = prev.calls if prev and prev.calls <= host.calls else 0
                    base_secs = prev.call_seconds if prev and prev.calls <= host.calls else 0.0
                    total_calls += host.calls - base_calls
                    total_seconds += host.call_seconds - base_secs
                    rates[host.server_id] = (host.calls - base_calls) / span
                calls = total_calls / span
                # no time reported (a host that does not measure it): unknown, not 0 ms
                timed = total_calls and total_seconds > 0
                mean_ms = 1000 * total_seconds / total_calls if timed else None
                placed = max(0, sample.placements - before.placements) / span
        self._points.append(_Point(now, calls, mean_ms, placed, sample.gateway_sessions))
        self._last = (now, sample)
        self._host_rates = rates
        self.latest, self.latest_time = sample, now

    def picture(self) -> dict[str, Any]:
        """The JSON the page draws."""
        sample = self.latest or ClusterSample([], 0)
        now = self.latest_time or time.time()
        by_type: dict[str, int] = {}
        for host in sample.hosts:
            for actor_type, count in host.activations_by_type.items():
                by_type[actor_type] = by_type.get(actor_type, 0) + count
        shown = dict(sorted(by_type.items(), key=lambda kv: -kv[1])[:MAX_TYPES])
        points = list(self._points)
        return {
            "time": now,
            "hosts": [
                {
                    "server_id": h.server_id,
                    "address": h.address,
                    "load": h.load,
                    "activations": h.activations,
                    "calls_per_second": self._host_rates.get(h.server_id),
                    "age_seconds": max(0.0, now - h.start_time) if h.start_time else None,
                    "lease_ttl": h.lease_ttl,
                    "renewed_seconds_ago": max(0.0, now - h.renew_time) if h.renew_time else None,
                }
                for h in sorted(sample.hosts, key=lambda h: h.server_id)
            ],
            "activations_by_type": shown,
            "gateway_sessions": sample.gateway_sessions,
            "series": {
                "time": [p.t for p in points],
                "calls_per_second": [p.calls_per_second for p in points],
                "mean_call_ms": [p.mean_call_ms for p in points],
                "placements_per_second": [p.placements_per_second for p in points],
                "gateway_sessions": [p.sessions for p in points],
            },
        }


class Dashboard:
    """The page and its sampler. Run :meth:`run` in a task group; mount :meth:`__call__`
    (an ASGI app) at ``/dashboard``, or let :meth:`wrap` put it in front of an app."""

    def __init__(
        self,
        sample: Callable[[], Awaitable[ClusterSample]],
        *,
        period: float = DEFAULT_PERIOD,
        points: int = DEFAULT_POINTS,
        password: str | None = None,
        closed_reason: str | None = None,
    ) -> None:
        self._sample = sample
        self.period = period
        self.history = History(points)
        self._password = password
        self._closed_reason = closed_reason  # set: the page is off, and this says why
        files = importlib.resources.files(__package__) / "static"
        self._files = {name: (files / name).read_bytes() for name in (*_STATIC, "index.html")}

    async def run(self) -> None:
        """Sample every period, for ever (a failed sample is skipped, not fatal)."""
        while True:
            try:
                self.history.add(time.time(), await self._sample())
            except Exception as exc:  # a gap in the charts, not a dead page
                log.debug("a dashboard sample failed: %s", exc)
            await anyio.sleep(self.period)

    def wrap(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Any:
        """``app`` with ``/dashboard`` answered here first."""

        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            path = scope.get("path", "") if scope["type"] == "http" else ""
            if path == "/dashboard" or path.startswith("/dashboard/"):
                await self(scope, receive, send)
            else:
                await app(scope, receive, send)

        return wrapped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = self._answer(request)
        await response(scope, receive, send)

    def _answer(self, request: Request) -> Response:
        if self._closed_reason is not None:
            return JSONResponse({"error": "dashboard_off", "message": self._closed_reason}, 404)
        if request.method not in ("GET", "HEAD"):
            return JSONResponse({"error": "method", "message": "the page is read-only"}, 405)
        if self._password is not None and not self._authorized(request):
            return Response(
                "the cluster page needs the dashboard password",
                401,
                {"WWW-Authenticate": 'Basic realm="koala", charset="UTF-8"'},
            )
        path = request.url.path.removeprefix("/dashboard").lstrip("/")
        if path == "":
            if not request.url.path.endswith("/"):  # relative URLs resolve below it
                return Response(status_code=307, headers={"Location": "/dashboard/"})
            return Response(self._files["index.html"], 200, _HEADERS, "text/html")
        if path == "data":
            return JSONResponse(self.history.picture(), headers=_HEADERS)
        name = path.removeprefix("static/")
        if path.startswith("static/") and name in _STATIC:
            return Response(self._files[name], 200, _HEADERS, _STATIC[name])
        return JSONResponse({"error": "not_found", "message": f"no {path!r} here"}, 404)

    def _authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            _, _, given = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return False
        assert self._password is not None
        return hmac.compare_digest(given.encode(), self._password.encode())
