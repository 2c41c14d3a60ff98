"""One contract for the placement driver's store: etcd (real, via its JSON gateway) and
memory behave the same. Every test here runs against both, on every backend."""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest

from koala import ConfigError
from koala.pd.server import (
    EtcdStore,
    LeaseNotFoundError,
    MemoryStore,
    Store,
    StoreError,
    StoreFullError,
    StoreUnavailableError,
)
from tests._etcd import EtcdProcess, etcd_url, free_port, unique_prefix

__all__ = ["etcd_url"]  # the fixture, imported for pytest

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    etcd = EtcdStore(request.getfixturevalue("etcd_url"), timeout=5.0)
    try:
        yield etcd
    finally:
        await etcd.aclose()


@pytest.fixture
def p() -> str:
    return unique_prefix("store")


async def wait_until_gone(store: Store, key: str, within: float = 6.0) -> None:
    with anyio.fail_after(within):
        while await store.get(key) is not None:
            await anyio.sleep(0.05)


async def test_put_then_get(store: Store, p: str) -> None:
    assert await store.get(p + "a") is None
    rev = await store.put(p + "a", b"\x00\xffbinary")
    kv = await store.get(p + "a")
    assert kv is not None
    assert (kv.key, kv.value, kv.version, kv.lease) == (p + "a", b"\x00\xffbinary", 1, 0)
    assert kv.create_revision == kv.mod_revision == rev


async def test_overwrite_keeps_create_revision_and_counts_versions(store: Store, p: str) -> None:
    first = await store.put(p + "k", b"1")
    second = await store.put(p + "k", b"2")
    assert second > first
    kv = await store.get(p + "k")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"2", first, second, 2)


async def test_empty_value(store: Store, p: str) -> None:
    await store.put(p + "e", b"")
    kv = await store.get(p + "e")
    assert kv is not None
    assert kv.value == b""


async def test_prefix_in_key_order_with_limit(store: Store, p: str) -> None:
    for name in ["b", "a", "c/d", "c"]:
        await store.put(p + name, name.encode())
    await store.put(p[:-1] + "x", b"outside")  # shares the text but not the prefix
    keys = [kv.key for kv in await store.get_prefix(p)]
    assert keys == [p + "a", p + "b", p + "c", p + "c/d"]
    assert [kv.key for kv in await store.get_prefix(p, limit=2)] == [p + "a", p + "b"]
    assert await store.get_prefix(p + "zzz") == []


async def test_create_only_if_absent_returns_the_winner(store: Store, p: str) -> None:
    created, kv = await store.create(p + "c", b"first")
    assert created
    assert kv.value == b"first"
    created, kv = await store.create(p + "c", b"second")
    assert not created
    assert kv.value == b"first"
    stored = await store.get(p + "c")
    assert stored is not None
    assert stored.value == b"first"


async def test_concurrent_creates_have_exactly_one_winner(store: Store, p: str) -> None:
    results: list[tuple[bool, bytes]] = []

    async def contender(i: int) -> None:
        created, kv = await store.create(p + "race", str(i).encode())
        results.append((created, kv.value))

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(contender, i)
    winners = [value for created, value in results if created]
    assert len(winners) == 1
    assert {value for _, value in results} == {winners[0]}


async def test_replace_compares_the_mod_revision(store: Store, p: str) -> None:
    assert await store.replace(p + "r", b"1", mod_revision=0)  # 0: only if absent
    assert not await store.replace(p + "r", b"x", mod_revision=0)
    kv = await store.get(p + "r")
    assert kv is not None
    assert await store.replace(p + "r", b"2", mod_revision=kv.mod_revision)
    assert not await store.replace(p + "r", b"3", mod_revision=kv.mod_revision)  # stale
    now = await store.get(p + "r")
    assert now is not None
    assert now.value == b"2"


async def test_delete(store: Store, p: str) -> None:
    await store.put(p + "d", b"1")
    assert await store.delete(p + "d")
    assert not await store.delete(p + "d")
    assert await store.get(p + "d") is None
    created, _ = await store.create(p + "d", b"again")
    assert created


async def test_lease_binds_keys_and_revoke_deletes_them(store: Store, p: str) -> None:
    lease = await store.grant(30)
    assert lease != 0
    await store.put(p + "l1", b"1", lease=lease)
    created, kv = await store.create(p + "l2", b"2", lease=lease)
    assert created
    assert kv.lease == lease
    assert await store.keep_alive(lease) == 30
    left = await store.time_to_live(lease)
    assert left is not None
    assert 0 < left <= 30
    assert await store.lease_keys(lease) == [p + "l1", p + "l2"]
    await store.delete(p + "l1")
    assert await store.lease_keys(lease) == [p + "l2"]
    assert await store.revoke(lease)
    assert await store.get(p + "l1") is None
    assert await store.get(p + "l2") is None
    assert not await store.revoke(lease)
    assert await store.time_to_live(lease) is None
    assert await store.lease_keys(lease) is None
    with pytest.raises(LeaseNotFoundError):
        await store.keep_alive(lease)


async def test_writes_on_a_dead_lease_fail(store: Store, p: str) -> None:
    lease = await store.grant(30)
    await store.revoke(lease)
    with pytest.raises(LeaseNotFoundError):
        await store.put(p + "x", b"1", lease=lease)
    with pytest.raises(LeaseNotFoundError):
        await store.create(p + "x", b"1", lease=lease)
    assert await store.get(p + "x") is None
    # a create that loses to an existing key does not look at its lease
    await store.put(p + "y", b"there")
    created, kv = await store.create(p + "y", b"mine", lease=lease)
    assert not created
    assert kv.value == b"there"


async def test_rebinding_a_key_moves_it_to_the_new_lease(store: Store, p: str) -> None:
    old, new = await store.grant(30), await store.grant(30)
    await store.put(p + "m", b"1", lease=old)
    await store.put(p + "m", b"2", lease=new)
    await store.revoke(old)
    kv = await store.get(p + "m")
    assert kv is not None
    assert (kv.value, kv.lease) == (b"2", new)
    await store.revoke(new)
    assert await store.get(p + "m") is None


async def test_an_expired_lease_takes_its_keys(store: Store, p: str) -> None:
    lease = await store.grant(1)
    await store.put(p + "e", b"1", lease=lease)
    await store.put(p + "stays", b"1")
    await wait_until_gone(store, p + "e")
    assert await store.time_to_live(lease) is None
    with pytest.raises(LeaseNotFoundError):
        await store.keep_alive(lease)
    assert await store.get(p + "stays") is not None


async def test_keep_alive_holds_a_lease(store: Store, p: str) -> None:
    lease = await store.grant(1)
    await store.put(p + "h", b"1", lease=lease)
    for _ in range(6):  # 1.8 s: well past the TTL
        await anyio.sleep(0.3)
        await store.keep_alive(lease)
    assert await store.get(p + "h") is not None
    await store.revoke(lease)


async def test_bad_input_is_a_clear_error(store: Store) -> None:
    with pytest.raises(StoreError, match="non-empty"):
        await store.get("")
    with pytest.raises(StoreError, match="TTL"):
        await store.grant(0)
    with pytest.raises(StoreError, match="TTL"):
        await store.grant(True)


async def test_create_many_creates_the_absent_and_answers_the_existing(
    store: Store, p: str
) -> None:
    lease = await store.grant(30)
    await store.put(p + "b", b"there")
    outcomes = await store.create_many(
        [(p + "a", b"1", lease), (p + "b", b"2", 0), (p + "c", b"3", 0)]
    )
    assert len(outcomes) == 3
    a, b, c = outcomes
    assert not isinstance(a, Exception)
    assert not isinstance(b, Exception)
    assert not isinstance(c, Exception)
    assert a[0]
    assert c[0]
    assert not b[0]
    assert (a[1].key, a[1].value, a[1].lease, a[1].version) == (p + "a", b"1", lease, 1)
    assert b[1].value == b"there"
    for key, value in ((p + "a", b"1"), (p + "b", b"there"), (p + "c", b"3")):
        kv = await store.get(key)
        assert kv is not None
        assert kv.value == value
    stored = await store.get(p + "a")
    assert stored == a[1]  # what create_many answered is what is stored
    assert [
        kv.value if kv else None for kv in await store.get_many([p + "c", p + "x", p + "b"])
    ] == [
        b"3",
        None,
        b"there",
    ]
    await store.revoke(lease)
    assert await store.get(p + "a") is None


async def test_create_many_with_a_dead_lease_fails_only_its_keys(store: Store, p: str) -> None:
    alive, dead = await store.grant(30), await store.grant(30)
    await store.revoke(dead)
    await store.put(p + "taken", b"before")
    items = [
        (p + "x", b"1", dead),
        (p + "y", b"2", alive),
        (p + "taken", b"3", dead),  # exists: its lease is never looked at
        (p + "z", b"4", dead),
    ]
    x, y, taken, z = await store.create_many(items)
    assert isinstance(x, LeaseNotFoundError)
    assert isinstance(z, LeaseNotFoundError)
    assert not isinstance(y, Exception)
    assert y[0]
    assert y[1].lease == alive
    assert not isinstance(taken, Exception)
    assert not taken[0]
    assert taken[1].value == b"before"
    assert await store.get(p + "x") is None
    assert await store.get(p + "z") is None
    await store.revoke(alive)


async def test_create_many_concurrent_batches_have_one_winner_per_key(store: Store, p: str) -> None:
    keys = [f"{p}k{i}" for i in range(40)]
    won: dict[str, list[bytes]] = {k: [] for k in keys}
    answers: dict[str, set[bytes]] = {k: set() for k in keys}

    async def contender(n: int) -> None:
        mine = keys[n % 3 :: 1 + n % 2]  # overlapping subsets
        for key, outcome in zip(
            mine, await store.create_many([(k, str(n).encode(), 0) for k in mine]), strict=True
        ):
            assert not isinstance(outcome, Exception)
            created, kv = outcome
            if created:
                won[key].append(kv.value)
            answers[key].add(kv.value)

    async with anyio.create_task_group() as tg:
        for n in range(8):
            tg.start_soon(contender, n)
    for key in keys:
        assert len(won[key]) == 1, key
        assert answers[key] == set(won[key])


async def test_batches_reject_duplicate_keys(store: Store, p: str) -> None:
    with pytest.raises(StoreError, match="distinct"):
        await store.create_many([(p + "a", b"1", 0), (p + "a", b"2", 0)])
    with pytest.raises(StoreError, match="distinct"):
        await store.get_many([p + "a", p + "a"])
    with pytest.raises(StoreError, match="non-empty"):
        await store.create_many([("", b"1", 0)])
    assert await store.create_many([]) == []
    assert await store.get_many([]) == []
    with pytest.raises(StoreError, match="distinct"):
        await store.delete_many([(p + "a", 1), (p + "a", 2)])
    assert await store.delete_many([]) == []


async def test_delete_many_deletes_only_the_revision_asked(store: Store, p: str) -> None:
    lease = await store.grant(30)
    revs = [await store.put(f"{p}k{i}", b"v", lease=lease) for i in range(4)]
    newer = await store.put(p + "k1", b"replaced")  # a newer value than the one asked for
    done = await store.delete_many(
        [(p + "k0", revs[0]), (p + "k1", revs[1]), (p + "none", 5), (p + "k3", revs[3])]
    )
    assert done == [True, False, False, True]
    found = await store.get_many([f"{p}k{i}" for i in range(4)])
    assert [kv.value if kv else None for kv in found] == [None, b"replaced", b"v", None]
    assert found[1] is not None
    assert found[1].mod_revision == newer
    # a late repeat deletes nothing, and the lease still holds what is left
    assert await store.delete_many([(p + "k0", revs[0]), (p + "k3", revs[3])]) == [False, False]
    assert await store.revoke(lease)
    assert await store.get(p + "k2") is None


# ---------------------------------------------------------------- maintenance

SMALL_QUOTA = 1024 * 1024  # bytes: a full store in a few hundred writes


@pytest.fixture(params=["memory", "etcd"])
async def small_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A store of this test alone with a quota of SMALL_QUOTA bytes."""
    if request.param == "memory":
        yield MemoryStore(quota_bytes=SMALL_QUOTA)
        return
    server = EtcdProcess(quota_bytes=SMALL_QUOTA)
    try:
        server.start()
        etcd = EtcdStore(server.url, timeout=5.0)
        try:
            yield etcd
        finally:
            await etcd.aclose()
    finally:
        server.destroy()


async def fill(store: Store, prefix: str, size: int = 4096, limit: int = 10_000) -> int:
    """Write junk under ``prefix`` until the store is full; how many keys it took."""
    for n in range(limit):
        try:
            await store.put(f"{prefix}{n}", b"j" * size)
        except StoreFullError:
            return n
    raise AssertionError(f"the store took {limit} keys of {size} bytes without filling up")


async def test_status_reports_the_revision_and_sizes(store: Store, p: str) -> None:
    revision = await store.put(p + "s", b"1" * 1000)
    status = await store.status()
    assert status.revision >= revision
    assert status.db_size >= status.db_size_in_use > 0
    assert status.alarms == ()
    with pytest.raises(StoreError, match="revision"):
        await store.compact(0)


async def test_compaction_is_harmless_to_repeat_and_refuses_the_future(
    store: Store, p: str
) -> None:
    first = await store.put(p + "c", b"1")
    last = await store.put(p + "c", b"2")
    await store.compact(last)
    await store.compact(last)  # again: another PD got there first
    await store.compact(first)  # below the last compaction: nothing to do
    with pytest.raises(StoreError, match="future"):
        await store.compact((await store.status()).revision + 1000)
    kv = await store.get(p + "c")
    assert kv is not None
    assert kv.value == b"2"  # compaction keeps the keys as they are now


async def test_compaction_frees_the_history_of_overwritten_keys(store: Store, p: str) -> None:
    for n in range(300):
        await store.put(p + "o", str(n).encode() * 500)
    before = await store.status()
    await store.compact(before.revision)
    # etcd frees the old revisions' pages in the background, and counts them free at
    # its next write
    with anyio.fail_after(10):
        while (await store.status()).db_size_in_use > before.db_size_in_use - 300_000:
            await anyio.sleep(0.1)
            await store.put(p + "tick", b"")


async def test_a_full_store_refuses_writes_and_keeps_reads_deletes_and_leases(
    small_store: Store, p: str
) -> None:
    store = small_store
    lease = await store.grant(30)
    await store.put(p + "placed", b"here", lease=lease)
    junk = await fill(store, p + "junk/")
    assert junk > 10
    assert (await store.status()).alarms == ("NOSPACE",)
    with pytest.raises(StoreFullError, match="space"):
        await store.put(p + "new", b"1")
    with pytest.raises(StoreFullError):
        await store.create(p + "placed", b"mine")  # even a create that would not write
    with pytest.raises(StoreFullError):
        await store.create_many([(p + "placed", b"1", 0), (p + "new", b"2", 0)])
    with pytest.raises(StoreFullError):
        await store.replace(p + "placed", b"x", mod_revision=0)
    with pytest.raises(StoreFullError):
        await store.grant(30)
    # what still works: reads, lease keep-alives, deletes
    kv = await store.get(p + "placed")
    assert kv is not None
    assert kv.value == b"here"
    assert [k.value if k else None for k in await store.get_many([p + "placed", p + "new"])] == [
        b"here",
        None,
    ]
    assert await store.keep_alive(lease) == 30
    for n in range(junk):
        assert await store.delete(f"{p}junk/{n}")
    # deleting alone does not end the alarm: compact, defragment, disarm
    with pytest.raises(StoreFullError):
        await store.put(p + "new", b"1")
    await store.compact((await store.status()).revision)
    await store.defragment()
    status = await store.status()
    assert status.db_size < SMALL_QUOTA // 2
    await store.disarm()
    assert (await store.status()).alarms == ()
    await store.put(p + "new", b"1")
    await store.revoke(lease)


def test_memory_quota_is_checked() -> None:
    with pytest.raises(ConfigError, match="quota_bytes"):
        MemoryStore(quota_bytes=-1)


# ---------------------------------------------------------------- etcd only


async def test_batches_larger_than_etcds_txn_limit_are_split(etcd_url: str, p: str) -> None:
    store = EtcdStore(etcd_url, max_txn_ops=16)
    try:
        lease = await store.grant(30)
        await store.put(p + "k7", b"there")
        items = [(f"{p}k{i}", str(i).encode(), lease) for i in range(50)]
        outcomes = await store.create_many(items)
        created = [o[0] for o in outcomes if not isinstance(o, Exception)]
        assert len(created) == 50
        assert created.count(False) == 1
        assert not created[7]
        found = await store.get_many([f"{p}k{i}" for i in range(50)] + [p + "none"])
        assert [kv.value if kv else None for kv in found] == [
            b"there" if i == 7 else str(i).encode() for i in range(50)
        ] + [None]
        # etcd's own limit (128 operations per txn) holds for the default store too
        default = EtcdStore(etcd_url)
        try:
            big = [(f"{p}big{i}", b"v", 0) for i in range(300)]
            assert all(
                not isinstance(o, Exception) and o[0] for o in await default.create_many(big)
            )
            assert all(kv is not None for kv in await default.get_many([k for k, _, _ in big]))
        finally:
            await default.aclose()
        # guarded deletes are split the same way
        stored = await store.get_many([f"{p}k{i}" for i in range(50)])
        asked = [(kv.key, kv.mod_revision) for kv in stored if kv is not None]
        asked[3] = (asked[3][0], asked[3][1] + 1000)  # not its revision: left alone
        done = await store.delete_many(asked)
        assert done == [i != 3 for i in range(50)]
        assert [kv is not None for kv in await store.get_many([k for k, _ in asked])] == [
            i == 3 for i in range(50)
        ]
        await store.revoke(lease)
    finally:
        await store.aclose()
    with pytest.raises(ConfigError, match="max_txn_ops"):
        EtcdStore(etcd_url, max_txn_ops=0)


async def test_unreachable_etcd_is_a_clear_error() -> None:
    store = EtcdStore(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    try:
        with anyio.fail_after(10), pytest.raises(StoreUnavailableError, match="cannot be reached"):
            await store.get("/k")
    finally:
        await store.aclose()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


async def test_silent_etcd_times_out_instead_of_hanging(silent_server: int) -> None:
    store = EtcdStore(f"http://127.0.0.1:{silent_server}", timeout=0.5)
    try:
        with anyio.fail_after(10), pytest.raises(StoreUnavailableError):
            await store.keep_alive(1)
    finally:
        await store.aclose()


async def test_second_endpoint_is_used_when_the_first_is_down(etcd_url: str, p: str) -> None:
    store = EtcdStore(f"http://127.0.0.1:{free_port()},{etcd_url}", timeout=2.0)
    try:
        await store.put(p + "two", b"ok")
        kv = await store.get(p + "two")
        assert kv is not None
        assert kv.value == b"ok"
    finally:
        await store.aclose()


def test_bad_etcd_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="http://"):
        EtcdStore("127.0.0.1:2379")
    with pytest.raises(ConfigError, match="empty"):
        EtcdStore(" , ")
    with pytest.raises(ConfigError, match="timeout"):
        EtcdStore("http://127.0.0.1:2379", timeout=0)
