"""The storage contract: one suite, every storage backend, every event loop."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koala.storage
from koala import ArgumentTypeError, ConfigError
from koala.storage import (
    InvalidKeyError,
    RecordSchemaError,
    RecordTooLargeError,
    Row,
    Storage,
    StorageClosedError,
    StorageUnavailableError,
    VersionConflictError,
)
from tests._postgres import postgres_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio

FEW = settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------- records


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class Item:
    name: str
    count: int


@dataclasses.dataclass
class Record:
    name: str
    level: int
    score: float
    blob: bytes
    tags: list[str]
    items: list[Item]
    attrs: dict[str, int | None]
    color: Color
    seen: dt.datetime | None = None


class Profile(pydantic.BaseModel):
    nick: str
    friends: list[str] = []
    rank: int = 0


@dataclasses.dataclass
class Small:
    n: int


texts = st.text(max_size=30)
keys = st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s)
records = st.builds(
    Record,
    name=texts,
    level=st.integers(-(2**63), 2**63 - 1),
    score=st.floats(allow_nan=False),
    blob=st.binary(max_size=200),
    tags=st.lists(texts, max_size=5),
    items=st.lists(st.builds(Item, texts, st.integers()), max_size=4),
    attrs=st.dictionaries(texts, st.none() | st.integers(), max_size=4),
    color=st.sampled_from(Color),
    seen=st.none() | st.datetimes(timezones=st.just(dt.UTC)),
)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'koala.db'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.url)


@pytest.fixture
async def storage(storage_url: str) -> AsyncIterator[Storage]:
    async with Storage(storage_url, max_connections=4) as s:
        yield s


def fresh(prefix: str = "t") -> str:
    """A store name no other test (or earlier run on the shared server) uses."""
    return f"{prefix}{uuid.uuid4().hex}"


# ---------------------------------------------------------------- round trips


@FEW
@given(record=records, key1=keys, key2=st.none() | keys)
async def test_round_trip(storage: Storage, record: Record, key1: str, key2: str | None) -> None:
    store = storage.store(fresh(), Record)
    version = await store.save(key1, record, key2=key2, version=None)
    row = await store.load(key1, key2)
    assert row == Row(key1, key2, version, record)
    assert await store.load_all(key1) == [row]


@FEW
@given(nick=texts, friends=st.lists(texts, max_size=4), rank=st.integers(0, 10**6))
async def test_pydantic_round_trip(
    storage: Storage, nick: str, friends: list[str], rank: int
) -> None:
    store = storage.store(fresh(), Profile)
    profile = Profile(nick=nick, friends=friends, rank=rank)
    version = await store.save("p", profile, version=None)
    assert await store.load("p") == Row("p", None, version, profile)


async def test_loaded_value_is_a_copy(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    value = Small(1)
    await store.save("k", value, version=None)
    value.n = 2
    row = await store.load("k")
    assert row is not None
    assert row.value == Small(1)


async def test_missing_rows(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    assert await store.load("nobody") is None
    assert await store.load("nobody", "x") is None
    assert await store.load_all("nobody") == []


async def test_int_keys_name_the_same_row_as_their_text(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    version = await store.save(42, Small(1), key2=7, version=None)
    assert await store.load("42", "7") == Row("42", "7", version, Small(1))


async def test_stores_are_separate(storage: Storage) -> None:
    a, b = storage.store(fresh("a"), Small), storage.store(fresh("b"), Small)
    await a.save("k", Small(1), version=None)
    assert await b.load("k") is None
    await b.save("k", Small(2), version=None)
    row = await a.load("k")
    assert row is not None
    assert row.value == Small(1)


# ---------------------------------------------------------------- key2 splits


async def test_key2_splits_a_state_into_rows(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    v_main = await store.save("p1", Small(0), version=None)
    versions = {
        k2: await store.save("p1", Small(i), key2=k2, version=None)
        for i, k2 in enumerate(["b", "a", "c"], start=1)
    }
    await store.save("p2", Small(99), key2="a", version=None)

    rows = await store.load_all("p1")
    assert rows == [
        Row("p1", None, v_main, Small(0)),
        Row("p1", "a", versions["a"], Small(2)),
        Row("p1", "b", versions["b"], Small(1)),
        Row("p1", "c", versions["c"], Small(3)),
    ]
    # write one row: the others keep their versions
    new_b = await store.save("p1", Small(10), key2="b", version=versions["b"])
    await store.delete("p1", key2="c", version=versions["c"])
    rows = await store.load_all("p1")
    assert [(r.key2, r.version, r.value.n) for r in rows] == [
        (None, v_main, 0),
        ("a", versions["a"], 2),
        ("b", new_b, 10),
    ]
    assert [r.value for r in await store.load_all("p2")] == [Small(99)]


async def test_load_all_orders_key2_by_code_point(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    names = ["b", "B", "a", "Z", "é", "ab", "10", "9"]
    for i, k2 in enumerate(names):
        await store.save("k", Small(i), key2=k2, version=None)
    assert [r.key2 for r in await store.load_all("k")] == sorted(names)


# ---------------------------------------------------------------- batches


async def test_batch_applies_saves_and_deletes_together(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    va = await store.save("k", Small(1), key2="a", version=None)
    vb = await store.save("k", Small(2), key2="b", version=None)
    batch = store.batch("k")
    batch.save(Small(10), key2="a", version=va).delete(key2="b", version=vb)
    batch.save(Small(30), key2="c", version=None).save(Small(0), version=None)
    assert len(batch) == 4
    out = await batch.commit()
    assert out[1] is None
    assert all(isinstance(v, int) for v in (out[0], out[2], out[3]))
    rows = await store.load_all("k")
    assert [(r.key2, r.value.n) for r in rows] == [(None, 0), ("a", 10), ("c", 30)]
    assert {r.key2: r.version for r in rows} == {None: out[3], "a": out[0], "c": out[2]}


@pytest.mark.parametrize("stale", ["save", "create", "delete"])
async def test_failing_batch_changes_nothing(storage: Storage, stale: str) -> None:
    store = storage.store(fresh(), Small)
    va = await store.save("k", Small(1), key2="a", version=None)
    vb = await store.save("k", Small(2), key2="b", version=None)
    before = await store.load_all("k")
    batch = store.batch("k").save(Small(10), key2="a", version=va)
    batch.save(Small(5), key2="new", version=None)
    if stale == "save":
        batch.save(Small(20), key2="b", version=vb + 1000)
    elif stale == "create":
        batch.save(Small(20), key2="b", version=None)
    else:
        batch.delete(key2="gone", version=vb)
    batch.save(Small(3), key2="z", version=None)
    with pytest.raises(VersionConflictError) as info:
        await batch.commit()
    assert info.value.key2 == ("gone" if stale == "delete" else "b")
    assert await store.load_all("k") == before


async def test_batch_rules(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    assert await store.batch("k").commit() == []
    batch = store.batch("k").save(Small(1), key2="a", version=None)
    with pytest.raises(InvalidKeyError, match="once"):
        batch.delete(key2="a", version=1)
    await batch.commit()
    with pytest.raises(InvalidKeyError, match="already committed"):
        await batch.commit()
    big = store.batch("k")
    for i in range(koala.storage.MAX_BATCH_OPS):
        big.save(Small(i), key2=str(i), version=None)
    with pytest.raises(InvalidKeyError, match="at most"):
        big.save(Small(0), key2="one too many", version=None)


# ---------------------------------------------------------------- versions


async def test_versions_and_conflicts(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    v1 = await store.save("k", Small(1), version=None)
    with pytest.raises(VersionConflictError) as info:
        await store.save("k", Small(2), version=None)  # it exists already
    assert (info.value.expected, info.value.actual) == (None, v1)
    v2 = await store.save("k", Small(2), version=v1)
    assert v2 > v1
    with pytest.raises(VersionConflictError) as info:
        await store.save("k", Small(3), version=v1)  # a stale writer
    err = info.value
    assert (err.store, err.key1, err.key2, err.expected, err.actual) == (
        store.name,
        "k",
        None,
        v1,
        v2,
    )
    assert f"version {v1}" in str(err)
    assert f"version {v2}" in str(err)
    assert "load" in str(err)
    with pytest.raises(VersionConflictError):
        await store.delete("k", version=v1)
    row = await store.load("k")
    assert row == Row("k", None, v2, Small(2))  # failed writes changed nothing
    await store.delete("k", version=v2)
    assert await store.load("k") is None
    with pytest.raises(VersionConflictError) as info:
        await store.delete("k", version=v2)
    assert info.value.actual is None


async def test_a_recreated_row_never_reuses_a_version(storage: Storage) -> None:
    """A writer that read a row before it was deleted and created again still fails."""
    store = storage.store(fresh(), Small)
    old = await store.save("k", Small(1), version=None)
    await store.delete("k", version=old)
    new = await store.save("k", Small(2), version=None)
    assert new != old
    with pytest.raises(VersionConflictError):
        await store.save("k", Small(3), version=old)


@pytest.mark.parametrize("version", [0, -1, True, 1.5, "1"])
async def test_bad_versions_are_refused(storage: Storage, version: object) -> None:
    store = storage.store(fresh(), Small)
    with pytest.raises(InvalidKeyError, match="version"):
        await store.save("k", Small(1), version=version)  # type: ignore[arg-type]


# ---------------------------------------------------------------- schema evolution


@dataclasses.dataclass
class PlayerV1:
    name: str
    level: int


@dataclasses.dataclass
class PlayerV2:  # a new field with a default
    name: str
    level: int
    gold: int = 0
    items: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PlayerNewRequired:
    name: str
    level: int
    guild: str


@dataclasses.dataclass
class PlayerRetyped:
    name: str
    level: str


@dataclasses.dataclass
class PlayerDropped:
    name: str


class ProfileV1(pydantic.BaseModel):
    nick: str


class ProfileV2(pydantic.BaseModel):
    nick: str
    rank: int = 7


async def test_new_field_with_default_loads_old_rows(storage: Storage) -> None:
    name = fresh()
    v = await storage.store(name, PlayerV1).save("p1", PlayerV1("ann", 3), key2="s", version=None)
    new = storage.store(name, PlayerV2)
    assert await new.load("p1", "s") == Row("p1", "s", v, PlayerV2("ann", 3, 0, []))
    v2 = await new.save("p1", PlayerV2("ann", 4, 9, ["axe"]), key2="s", version=v)
    assert await new.load_all("p1") == [Row("p1", "s", v2, PlayerV2("ann", 4, 9, ["axe"]))]

    pname = fresh()
    pv = await storage.store(pname, ProfileV1).save("p1", ProfileV1(nick="x"), version=None)
    assert await storage.store(pname, ProfileV2).load("p1") == Row(
        "p1", None, pv, ProfileV2(nick="x", rank=7)
    )


@pytest.mark.parametrize(
    ("record_type", "field"),
    [(PlayerNewRequired, "guild"), (PlayerRetyped, "level"), (PlayerDropped, "level")],
)
async def test_a_row_that_no_longer_fits_names_key_and_field(
    storage: Storage, record_type: type[object], field: str
) -> None:
    name = fresh()
    await storage.store(name, PlayerV1).save("p1", PlayerV1("ann", 3), key2="s", version=None)
    store = storage.store(name, record_type)
    for load in (store.load("p1", "s"), store.load_all("p1")):
        with pytest.raises(RecordSchemaError) as info:
            await load
        message = str(info.value)
        assert f"{name}['p1', 's']" in message
        assert field in message
        assert "default" in message  # says what to do
        assert (info.value.store, info.value.key1, info.value.key2) == (name, "p1", "s")


async def test_nested_misfit_names_the_path(storage: Storage) -> None:
    @dataclasses.dataclass
    class Bag:
        items: list[str]

    @dataclasses.dataclass
    class IntBag:
        items: list[int]

    name = fresh()
    await storage.store(name, Bag).save("k", Bag(["1", "x"]), version=None)
    with pytest.raises(RecordSchemaError) as info:
        await storage.store(name, IntBag).load("k")
    assert f"{name}['k'].items[0]" in str(info.value)
    assert info.value.path == (".items", "[0]")


# ---------------------------------------------------------------- concurrency


@pytest.mark.parametrize("read", ["existing", "absent"])
async def test_exactly_one_of_racing_writers_wins(storage: Storage, read: str) -> None:
    store = storage.store(fresh(), Small)
    version = None if read == "absent" else await store.save("k", Small(-1), version=None)
    wins: list[tuple[int, int]] = []
    conflicts: list[VersionConflictError] = []

    async def writer(i: int) -> None:
        try:
            wins.append((i, await store.save("k", Small(i), version=version)))
        except VersionConflictError as exc:
            conflicts.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(writer, i)
    assert len(wins) == 1
    assert len(conflicts) == 7
    ((winner, new_version),) = wins
    assert all(c.actual == new_version for c in conflicts)
    assert await store.load("k") == Row("k", None, new_version, Small(winner))


async def test_concurrent_writers_of_distinct_rows_all_land(storage: Storage) -> None:
    store = storage.store(fresh(), Small)

    async def writer(i: int) -> None:
        v = await store.save("k", Small(0), key2=f"r{i:02}", version=None)
        for n in range(1, 4):
            v = await store.save("k", Small(n), key2=f"r{i:02}", version=v)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(writer, i)
    rows = await store.load_all("k")
    assert [(r.key2, r.value) for r in rows] == [(f"r{i:02}", Small(3)) for i in range(12)]
    stats = storage.statistics()
    assert stats.open_connections <= stats.max_connections == 4


# ---------------------------------------------------------------- bad input


async def test_bad_keys_are_refused(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    with pytest.raises(InvalidKeyError, match="empty"):
        await store.load("")
    with pytest.raises(InvalidKeyError, match="key2=None"):
        await store.save("k", Small(1), key2="", version=None)
    with pytest.raises(InvalidKeyError, match="NUL"):
        await store.load("a\x00b")
    with pytest.raises(InvalidKeyError, match="at most"):
        await store.load("x" * (koala.storage.MAX_KEY_LENGTH + 1))
    with pytest.raises(InvalidKeyError, match="surrogates"):
        await store.load("\ud800")
    with pytest.raises(ArgumentTypeError, match="key1 must be a str or an int"):
        await store.load(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="store name"):
        storage.store("bad name!", Small)


async def test_a_value_that_does_not_fit_is_refused_before_writing(storage: Storage) -> None:
    store = storage.store(fresh(), Small)
    with pytest.raises(ArgumentTypeError, match=r"value for .*\['k'\]\.n: expected int"):
        await store.save("k", Small("one"), version=None)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError):
        await store.save("k", PlayerV1("a", 1), version=None)  # type: ignore[arg-type]
    assert await store.load("k") is None


async def test_record_size_is_bounded(storage_url: str) -> None:
    async with Storage(storage_url, max_record_size=1024) as storage:
        store = storage.store(fresh(), Record)
        big = Record("x", 1, 0.0, b"\0" * 2000, [], [], {}, Color.RED)
        with pytest.raises(RecordTooLargeError, match="max_record_size"):
            await store.save("k", big, version=None)
        assert await store.load("k") is None


async def test_closed_storage_says_so_and_reopens(storage_url: str) -> None:
    storage = Storage(storage_url)
    store = storage.store(fresh(), Small)
    v = await store.save("k", Small(1), version=None)  # opened on first use
    await storage.aclose()
    assert storage.statistics().closed
    with pytest.raises(StorageClosedError, match="async with storage"):
        await store.load("k")
    async with storage:
        row = await store.load("k")
    if storage.backend != "memory":
        assert row == Row("k", None, v, Small(1))


# ---------------------------------------------------------------- without a backend fixture


@pytest.mark.parametrize(
    "url",
    [
        "",
        "mysql://x",
        "memory://x",
        "sqlite://",
        "sqlite://host/x.db",
        "sqlite:///:memory:",
        "sqlite:///x.db?synchronous=off",
        "sqlite:///x.db?journal=1",
    ],
)
def test_bad_urls_fail_at_construction(url: str) -> None:
    with pytest.raises(ConfigError):
        Storage(url)


def test_bad_limits_fail_at_construction() -> None:
    for kwargs in ({"max_connections": 0}, {"max_record_size": -1}, {"connect_timeout": 0}):
        with pytest.raises(ConfigError):
            Storage("memory://", **kwargs)


def test_the_password_never_shows() -> None:
    storage = Storage("postgresql://ann:s3cret@localhost:1/db")
    assert "s3cret" not in repr(storage)
    assert "s3cret" not in storage.url


async def test_an_unreachable_server_is_unavailable() -> None:
    with pytest.raises(StorageUnavailableError, match="PostgreSQL at"):
        async with Storage("postgresql://koala@127.0.0.1:1/db", connect_timeout=2):
            pass


async def test_an_unopenable_sqlite_file_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StorageUnavailableError, match="SQLite"):
        async with Storage(f"sqlite:///{tmp_path}/missing-dir/x.db"):
            pass


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    import sqlite3

    async with Storage(f"sqlite:///{tmp_path / 'w.db'}") as storage:
        await storage.store("s", Small).save("k", Small(1), version=None)
        # closed here: Python 3.13 warns about a connection left to the collector, and
        # the suite turns warnings into errors
        with contextlib.closing(sqlite3.connect(tmp_path / "w.db")) as check:
            mode = check.execute("PRAGMA journal_mode").fetchone()
    assert mode == ("wal",)


def test_public_surface() -> None:
    assert set(koala.storage.__all__) == {
        "DEFAULT_MAX_CONNECTIONS",
        "DEFAULT_MAX_RECORD_SIZE",
        "MAX_BATCH_OPS",
        "MAX_KEY_LENGTH",
        "Batch",
        "InvalidKeyError",
        "PersistentState",
        "RecordSchemaError",
        "RecordStore",
        "RecordTooLargeError",
        "Row",
        "StateHandle",
        "Storage",
        "StorageClosedError",
        "StorageError",
        "StorageStatistics",
        "StorageUnavailableError",
        "VersionConflictError",
    }
    for name in koala.storage.__all__:
        assert getattr(koala.storage, name) is not None


def test_errors_rebuild_intact_across_an_actor_call() -> None:
    from koala._messages import error_info, rebuild_error

    conflict = VersionConflictError("s", "k", "x", 3, 5)
    again = rebuild_error(error_info(conflict))
    assert isinstance(again, VersionConflictError)
    assert (again.store, again.key1, again.key2, again.expected, again.actual) == (
        "s",
        "k",
        "x",
        3,
        5,
    )
    assert str(again) == str(conflict)
    misfit = RecordSchemaError("s", "k", None, "s['k'].a: expected int", ".a")
    again = rebuild_error(error_info(misfit))
    assert isinstance(again, RecordSchemaError)
    assert again.path == (".a",)
    assert str(again) == str(misfit)


async def test_first_use_from_many_tasks_opens_once(storage_url: str) -> None:
    storage = Storage(storage_url, max_connections=3)
    store = storage.store(fresh(), Small)

    async def create(i: int) -> None:
        await store.save(str(i), Small(i), version=None)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(create, i)
        assert [r.value for i in range(10) for r in await store.load_all(str(i))] == [
            Small(i) for i in range(10)
        ]
        assert storage.statistics().open_connections <= 3
    finally:
        await storage.aclose()
