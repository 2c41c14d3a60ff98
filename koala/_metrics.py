"""Prometheus metrics of a Koala process, cheap where they are counted.

The hot paths (a call, a storage operation, a directory lookup) add to plain Python
counters and bucket arrays: an index, an add, and for a latency a ``bisect``. Nothing
there takes a lock or builds a label set. prometheus-client reads them only when
``/metrics`` is scraped, through one collector on :data:`REGISTRY` that asks every
registered source (a runtime, a PD, a gateway, a storage) for its families.

Series are bounded: a labelled family keeps at most ``MAX_SERIES`` label sets, and
values past that are counted under ``"other"``, so a peer that sends many distinct
method names cannot grow the process's memory or the scrape.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Seconds: from a local call (tens of microseconds) to a default deadline (30 s).
BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
MAX_SERIES: Final = 2000
OTHER: Final = "other"

Labels = tuple[str, ...]


class Histogram:
    """One latency series: counts per bucket (``le``, plus +Inf) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        """This series alone, as a family without labels."""
        family = HistogramMetricFamily(name, doc)
        family.add_metric([], self.cumulative(), self.sum)
        return family

    def cumulative(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*map(repr, BUCKETS), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class Counters:
    """A labelled counter: label values -> count, at most MAX_SERIES label sets."""

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Labels) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[Labels, int] = {}

    def inc(self, key: Labels, amount: int = 1) -> None:
        values = self.values
        if key in values:
            values[key] += amount
        elif len(values) < MAX_SERIES:
            values[key] = amount
        else:
            other = (OTHER,) * len(key)
            values[other] = values.get(other, 0) + amount

    def family(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(key, value)
        return family


class Histograms:
    """A labelled histogram: label values -> Histogram, at most MAX_SERIES label sets."""

    __slots__ = ("doc", "labels", "name", "series")

    def __init__(self, name: str, doc: str, labels: Labels) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.series: dict[Labels, Histogram] = {}

    def of(self, key: Labels) -> Histogram:
        """The series of ``key`` (made on first use); keep it to observe without a lookup."""
        series = self.series.get(key)
        if series is None:
            if len(self.series) >= MAX_SERIES:
                key = (OTHER,) * len(key)
                series = self.series.get(key)
            if series is None:
                series = self.series[key] = Histogram()
        return series

    def observe(self, key: Labels, seconds: float) -> None:
        self.of(key).observe(seconds)

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, series in list(self.series.items()):
            family.add_metric(list(key), series.cumulative(), series.sum)
        return family


class CallSeries:
    """The calls of one method of one actor type on one path (local or remote), kept by
    the runtime per method: answers counted (``ok``, and failures by outcome), latency
    bucketed, slow turns counted. The runtime's local path writes these fields itself."""

    __slots__ = ("labels", "ok", "outcomes", "slow", "time")

    def __init__(self, actor_type: str, method: str, path: str) -> None:
        self.labels = (actor_type, method, path)
        self.ok = 0
        self.outcomes: dict[str, int] = {}  # the failed ones, by outcome
        self.time = Histogram()
        self.slow = 0

    def failed(self, outcome: str) -> None:
        outcomes = self.outcomes
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def done(self, outcome: str, seconds: float) -> None:
        if outcome == "ok":
            self.ok += 1
        else:
            self.failed(outcome)
        self.time.observe(seconds)

    def counts(self) -> dict[str, int]:
        """Calls by outcome, ``ok`` included."""
        out = dict(self.outcomes)
        if self.ok:
            out["ok"] = self.ok
        return out


def call_families(all_series: Iterable[CallSeries]) -> list[Metric]:
    """The families of a runtime's calls: counts by outcome, latency, slow turns."""
    counts = CounterMetricFamily(
        "koala_calls_total",
        "Actor calls made by this host, by actor type, method, path and outcome",
        labels=("actor_type", "method", "path", "outcome"),
    )
    times = HistogramMetricFamily(
        "koala_call_seconds",
        "Time from a call to its answer, by actor type, method and path (local or remote)",
        labels=("actor_type", "method", "path"),
    )
    slow = CounterMetricFamily(
        "koala_slow_turns_total",
        "Local calls that took longer than the host's slow_turn seconds",
        labels=("actor_type", "method"),
    )
    for series in all_series:
        for outcome, n in series.counts().items():
            counts.add_metric([*series.labels, outcome], n)
        times.add_metric(list(series.labels), series.time.cumulative(), series.time.sum)
        if series.slow:
            slow.add_metric(list(series.labels[:2]), series.slow)
    return [counts, times, slow]


def gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    """A one-series gauge (labels fixed here, e.g. ``backend="sqlite"``)."""
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    """A one-series counter read from a part's own statistics."""
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


Source = Callable[[Any], Iterable[Metric]]


class _Sources:
    """The collector: every live part that reports metrics, each held weakly (a part's
    source is a function of the part, not a bound method, which would keep it alive)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: weakref.WeakKeyDictionary[Any, list[Source]] = weakref.WeakKeyDictionary()

    def add(self, owner: Any, source: Source) -> None:
        with self._lock:
            self._parts.setdefault(owner, []).append(source)

    def remove(self, owner: Any) -> None:
        with self._lock:
            self._parts.pop(owner, None)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            parts = [(owner, list(sources)) for owner, sources in self._parts.items()]
        merged: dict[str, Metric] = {}
        for owner, sources in parts:
            for source in sources:
                for family in source(owner):
                    # two parts of one kind in one process (two storages, or the host
                    # and PD of `koala dev`): one family, their samples side by side
                    known = merged.get(family.name)
                    if known is None:
                        merged[family.name] = family
                    else:
                        known.samples.extend(family.samples)
        yield from merged.values()


class _Process:
    """The owner of the process-wide families (storage), reported for good."""


_sources = _Sources()
PROCESS: Final = _Process()
"""The owner of process-wide families, reported for as long as the process runs."""
REGISTRY: Final = CollectorRegistry(auto_describe=False)
REGISTRY.register(_sources)


def report(owner: Any, source: Source) -> None:
    """Have ``source(owner)`` asked at every scrape while ``owner`` lives."""
    _sources.add(owner, source)


def unreport(owner: Any) -> None:
    _sources.remove(owner)


def exposition() -> tuple[bytes, str]:
    """The text a scrape receives, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------- process-wide families

# storage: counted where every engine call goes through (koala.storage)
storage_operations = Counters(
    "koala_storage_operations_total",
    "Storage operations by backend, operation and outcome (ok or error)",
    ("backend", "operation", "outcome"),
)
storage_seconds = Histograms(
    "koala_storage_operation_seconds",
    "Time of storage operations (waiting for a connection included)",
    ("backend", "operation"),
)
report(PROCESS, lambda _: (storage_operations.family(), storage_seconds.family()))
