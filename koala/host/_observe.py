"""What a host tells about itself: its metrics (koala._metrics) and the outcome of calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import _metrics
from .._errors import (
    ActorNotFoundError,
    ArgumentTypeError,
    HostUnavailableError,
    KoalaError,
    OverloadedError,
    ShuttingDownError,
    WrongHostError,
)

if TYPE_CHECKING:
    from ._runtime import Runtime


def outcome_of(exc: BaseException) -> str:
    """The ``outcome`` label of a call that raised ``exc`` (its kind, not its text)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, KoalaError):
        return _OUTCOMES.get(type(exc), "error")
    if isinstance(exc, Exception):
        return "error"  # the actor's own exception
    return "cancelled"  # the caller gave up (or the host stops)


_OUTCOMES: dict[type[KoalaError], str] = {
    OverloadedError: "overloaded",
    ShuttingDownError: "shutting_down",
    HostUnavailableError: "unavailable",
    ActorNotFoundError: "not_found",
    ArgumentTypeError: "bad_argument",
    WrongHostError: "wrong_host",
}


def runtime_metrics(rt: Runtime) -> list[Metric]:
    cat = rt._catalog
    life = cat.lifecycle
    live = GaugeMetricFamily(
        "koala_activations", "Live activations by actor type", labels=("actor_type",)
    )
    for actor_type, n in list(life.live.items()):
        live.add_metric([actor_type], n)
    finished = CounterMetricFamily(
        "koala_deactivations", "Activations that ended, by actor type", labels=("actor_type",)
    )
    for actor_type, n in list(life.finished.items()):
        finished.add_metric([actor_type], n)
    failed = CounterMetricFamily(
        "koala_activation_failures",
        "Activations whose on_activate raised or ran out of time",
        labels=("actor_type",),
    )
    for actor_type, n in list(life.failed.items()):
        failed.add_metric([actor_type], n)
    calls = [*rt._local_calls.values(), *rt._remote_calls.values()]
    g = _metrics.gauge
    return [
        live,
        finished,
        failed,
        life.activate_seconds.family(),
        life.deactivate_seconds.family(),
        *_metrics.call_families(calls),
        rt._served.family(),
        g("koala_mailbox_queued_calls", "Calls waiting in mailboxes on this host", cat.queued),
        g("koala_calls_in_flight", "Calls being run or waited for on this host", cat.inflight),
        g("koala_host_draining", "1 while the host drains", float(cat.state.draining)),
    ]
