"""Prometheus metrics (koala._metrics): what a scrape of this process shows.

Counters are process-wide and other tests add to them, so each test reads the scrape
before and after what it does and compares the difference.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from koala import _metrics
from koala.storage import Storage, VersionConflictError


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape of this process: (name, sorted labels) -> value."""
    text, content_type = _metrics.exposition()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@dataclasses.dataclass
class Score:
    points: int


@pytest.mark.anyio
async def test_storage_operations_are_counted_with_their_outcome(tmp_path: Path) -> None:
    ops = "koala_storage_operations_total"
    write_ok = (ops, (("backend", "sqlite"), ("operation", "write"), ("outcome", "ok")))
    conflict = (ops, (("backend", "sqlite"), ("operation", "write"), ("outcome", "conflict")))
    load_ok = (ops, (("backend", "sqlite"), ("operation", "load"), ("outcome", "ok")))
    timed = (
        "koala_storage_operation_seconds_count",
        (("backend", "sqlite"), ("operation", "load")),
    )
    before = scrape()
    async with Storage(f"sqlite:///{tmp_path / 'm.db'}") as storage:
        scores = storage.store("scores", Score)
        version = await scores.save("alice", Score(1), version=None)
        await scores.save("alice", Score(2), version=version)
        with pytest.raises(VersionConflictError):
            await scores.save("alice", Score(3), version=version)  # stale
        for _ in range(3):
            assert await scores.load("alice") is not None
    after = scrape()
    assert after[write_ok] - before.get(write_ok, 0) == 2
    assert after[conflict] - before.get(conflict, 0) == 1
    assert after[load_ok] - before.get(load_ok, 0) == 3
    assert after[timed] - before.get(timed, 0) == 3


def test_series_are_bounded() -> None:
    calls = _metrics.Counters("koala_test_calls_total", "test", ("method",))
    times = _metrics.Histograms("koala_test_seconds", "test", ("method",))
    for i in range(_metrics.MAX_SERIES + 500):
        calls.inc((f"m{i}",))
        times.observe((f"m{i}",), 0.001)
    assert len(calls.values) == _metrics.MAX_SERIES + 1  # the rest folded into "other"
    assert calls.values[(_metrics.OTHER,)] == 500
    assert len(times.series) == _metrics.MAX_SERIES + 1
    assert (
        times.series[(_metrics.OTHER,)].counts[_metrics.BUCKETS.index(0.001)] == 500
    )  # le="0.001" holds 0.001 itself


def test_histogram_buckets_are_cumulative_and_le() -> None:
    h = _metrics.Histogram()
    for seconds in (0.00005, 0.0001, 0.0002, 3.0, 100.0):
        h.observe(seconds)
    buckets = dict(h.cumulative())
    assert buckets["0.0001"] == 2  # 0.00005 and 0.0001 (le: less than or equal)
    assert buckets["0.00025"] == 3
    assert buckets["5.0"] == 4
    assert buckets["30.0"] == 4
    assert buckets["+Inf"] == 5
    assert h.sum == pytest.approx(103.0003, rel=1e-6)


def test_a_part_that_goes_away_leaves_the_scrape() -> None:
    class Part:
        pass

    part = Part()
    _metrics.report(
        part, lambda p: [_metrics.gauge("koala_test_part_alive", "test", 1.0, part="x")]
    )
    assert scrape()[("koala_test_part_alive", (("part", "x"),))] == 1.0
    del part
    gc.collect()
    assert ("koala_test_part_alive", (("part", "x"),)) not in scrape()


def test_two_parts_of_one_kind_share_a_family() -> None:
    class Part:
        pass

    def things(name: str) -> _metrics.Source:
        return lambda part: [_metrics.counter("koala_test_things_total", "t", 2.0, p=name)]

    one, two = Part(), Part()
    _metrics.report(one, things("a"))
    _metrics.report(two, things("b"))
    samples = scrape()
    assert samples[("koala_test_things_total", (("p", "a"),))] == 2.0
    assert samples[("koala_test_things_total", (("p", "b"),))] == 2.0
    _metrics.unreport(one)
    _metrics.unreport(two)
