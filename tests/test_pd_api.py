"""The PD's HTTP API over both stores (memory, real etcd), on every backend: paths,
fields and errors as docs/pd.md describes them."""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from koala.pd.server import (
    EtcdStore,
    MaintenanceConfig,
    MemoryStore,
    PlacementDriver,
    Position,
    Store,
    StoreUnavailableError,
    create_app,
)
from koala.pd.server import _membership as membership_module
from koala.pd.server._api import check_address
from koala.pd.server._driver import MAX_BATCH
from koala.pd.server._store import CreateOutcome
from tests._etcd import etcd_url, unique_prefix
from tests.test_pd_store import SMALL_QUOTA, fill, small_store

__all__ = ["etcd_url", "small_store"]  # the fixtures, imported for pytest

pytestmark = pytest.mark.anyio

API = "/pd/api/v1"


@pytest.fixture(params=["memory", "etcd"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    etcd = EtcdStore(request.getfixturevalue("etcd_url"))
    try:
        yield etcd
    finally:
        await etcd.aclose()


def client_for(pd: PlacementDriver) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(pd))
    return httpx.AsyncClient(transport=transport, base_url="http://pd")


@pytest.fixture
async def pd(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(PlacementDriver(store, prefix=unique_prefix("api"))) as client:
        yield client


# server id -> the owner key the tests register it with (ids repeat across prefixes:
# one key per id serves them all, and a PD only compares a key with its record's hash)
OWNERS: dict[int, bytes] = {}


async def post(
    client: httpx.AsyncClient,
    path: str,
    body: Any = None,
    status: int = 200,
    *,
    owner: bytes | None = None,
) -> Any:
    """POST ``body``; a body naming a server id carries its owner key (``owner``, else
    the one it was registered with here, a new one for a registration)."""
    headers = {}
    server_id = body.get("server_id") if isinstance(body, dict) else None
    if owner is None and isinstance(server_id, int):
        if path == "/membership/register":
            owner = OWNERS.setdefault(server_id, secrets.token_bytes(32))
        else:
            owner = OWNERS.get(server_id)
    if owner is not None:
        headers["Koala-Owner"] = owner.hex()
    resp = await client.post(API + path, json=body if body is not None else {}, headers=headers)
    assert resp.status_code == status, resp.text
    return resp.json()


async def register(
    client: httpx.AsyncClient, services: list[str], load: int = 0
) -> tuple[int, int]:
    server_id = (await post(client, "/id/new_server_id"))["id"]
    body = {
        "server_id": server_id,
        "address": f"127.0.0.1:{7000 + server_id}",
        "services": {s: f"app.{s}" for s in services},
        "ttl": 30,
        "load": load,
        "desc": "test host",
        "labels": {"zone": "a"},
    }
    answer = await post(client, "/membership/register", body)
    assert answer["server_id"] == server_id
    assert answer["ttl"] == 30
    return server_id, answer["lease_id"]


async def test_version(pd: httpx.AsyncClient) -> None:
    resp = await pd.get(API + "/version")
    assert resp.json() == {"version": "koala-pd/2"}


async def test_server_ids_are_unique_and_increasing(pd: httpx.AsyncClient) -> None:
    ids = [(await post(pd, "/id/new_server_id"))["id"] for _ in range(5)]
    assert ids == sorted(set(ids))
    assert ids[0] >= 1


async def test_sequences_hand_out_unique_ids_across_pds(store: Store) -> None:
    prefix = unique_prefix("seq")
    got: list[int] = []
    async with (
        client_for(PlacementDriver(store, prefix=prefix)) as one,
        client_for(PlacementDriver(store, prefix=prefix)) as two,
    ):
        for _ in range(7):
            for client in (one, two):
                got.append((await post(client, "/id/new_sequence/orders/3"))["id"])
        other = (await post(one, "/id/new_sequence/other/100"))["id"]
    assert len(set(got)) == len(got)
    assert other == 1  # sequences are independent


async def test_bad_sequence_requests(pd: httpx.AsyncClient) -> None:
    body = await post(pd, "/id/new_sequence/orders/0", status=400)
    assert body["error"] == "bad_request"
    assert "step" in body["message"]
    body = await post(pd, "/id/new_sequence/has space/5", status=400)
    assert body["error"] == "bad_request"
    body = await post(pd, "/id/new_sequence/orders/many", status=422)
    assert (body["error"], body["field"]) == ("invalid_request", "step")


async def test_register_keep_alive_and_membership(pd: httpx.AsyncClient) -> None:
    a, lease_a = await register(pd, ["Player"])
    b, _ = await register(pd, ["Player", "Room"])
    view = await post(
        pd, "/membership/keep_alive", {"server_id": a, "lease_id": lease_a, "load": 7}
    )
    assert set(view["hosts"]) == {str(a), str(b)}
    host = view["hosts"][str(a)]
    assert host["load"] == 7
    assert host["services"] == {"Player": "app.Player"}
    assert (host["desc"], host["labels"], host["ttl"]) == ("test host", {"zone": "a"}, 30)
    assert host["lease_id"] == lease_a
    assert host["start_time"] <= host["renew_time"] <= view["now"]
    assert isinstance(view["events"], list)
    everything = await post(pd, "/membership/fetch_all")
    assert set(everything["hosts"]) == {str(a), str(b)}


async def test_membership_events_report_adds_and_removes(pd: httpx.AsyncClient) -> None:
    a, lease_a = await register(pd, ["Player"])
    await post(pd, "/membership/fetch_all")  # the PD's first view: a
    b, _ = await register(pd, ["Player"])
    await post(pd, "/membership/fetch_all")  # b added
    await post(pd, "/membership/delete", {"server_id": b})
    view = await post(pd, "/membership/keep_alive", {"server_id": a, "lease_id": lease_a})
    assert set(view["hosts"]) == {str(a)}
    assert [(e["add"], e["remove"]) for e in view["events"]] == [([b], []), ([], [b])]
    assert all(e["time"] <= view["now"] for e in view["events"])


async def test_register_twice_is_refused(pd: httpx.AsyncClient) -> None:
    a, _ = await register(pd, ["Player"])
    body = {"server_id": a, "address": "127.0.0.1:1", "services": {}, "ttl": 30}
    answer = await post(pd, "/membership/register", body, status=409)
    assert answer["error"] == "already_registered"


async def test_register_validates_its_input(pd: httpx.AsyncClient) -> None:
    answer = await post(pd, "/membership/register", {"server_id": "x"}, status=422)
    assert (answer["error"], answer["field"]) == ("invalid_request", "server_id")
    assert "server_id" in answer["message"]
    assert "address" in answer["message"]
    body = {"server_id": 5, "address": "127.0.0.1:1", "ttl": 0}
    answer = await post(pd, "/membership/register", body, status=422)
    assert answer["field"] == "ttl"
    resp = await pd.post(API + "/membership/register", content=b"garbage")
    assert resp.status_code == 422
    assert resp.json()["field"] == "body"
    assert "Content-Type: application/json" in resp.json()["message"]
    # the owner key is required: it binds the registration
    resp = await pd.post(API + "/membership/register", json={"server_id": 5, "address": "a:1"})
    assert resp.status_code == 422
    assert resp.json()["field"] == "Koala-Owner"


async def test_keep_alive_on_a_dead_lease_says_register_again(pd: httpx.AsyncClient) -> None:
    a, lease = await register(pd, ["Player"])
    await post(pd, "/membership/delete", {"server_id": a})
    body = {"server_id": a, "lease_id": lease, "load": 1}
    answer = await post(pd, "/membership/keep_alive", body, status=404)
    assert answer["error"] == "lease_expired"
    answer = await post(pd, "/membership/delete", {"server_id": a}, status=404)
    assert answer["error"] == "not_registered"


async def test_find_position_places_once_and_answers_the_same(pd: httpx.AsyncClient) -> None:
    a, lease = await register(pd, ["Player"])
    await register(pd, ["Room"])  # does not serve Player: never chosen for it
    body = {"actor_type": "Player", "actor_id": "p1", "ttl": 60}
    first = await post(pd, "/placement/find_position", body)
    assert first["server_id"] == a
    assert first["server_address"] == f"127.0.0.1:{7000 + a}"
    assert (first["actor_type"], first["actor_id"], first["ttl"]) == ("Player", "p1", 60)
    assert first["created"] is True
    assert first["lease_id"] == lease
    again = await post(pd, "/placement/find_position", body)
    assert again["created"] is False
    assert again["create_time"] == first["create_time"]


async def test_find_position_errors(pd: httpx.AsyncClient) -> None:
    body = {"actor_type": "Nobody", "actor_id": "1"}
    answer = await post(pd, "/placement/find_position", body, status=503)
    assert answer["error"] == "no_host"
    assert "Nobody" in answer["message"]
    answer = await post(pd, "/placement/find_position", {"actor_type": "", "actor_id": "1"}, 422)
    assert (answer["error"], answer["field"]) == ("invalid_request", "actor_type")
    answer = await post(pd, "/placement/find_position", {"actor_type": "A/B", "actor_id": "1"}, 422)
    assert (answer["error"], answer["field"]) == ("invalid_request", "actor_type")


async def test_positions_die_with_the_host(pd: httpx.AsyncClient) -> None:
    a, _ = await register(pd, ["Player"])
    body = {"actor_type": "Player", "actor_id": "p1"}
    assert (await post(pd, "/placement/find_position", body))["server_id"] == a
    await post(pd, "/membership/delete", {"server_id": a})
    b, _ = await register(pd, ["Player"])
    again = await post(pd, "/placement/find_position", body)
    assert (again["server_id"], again["created"]) == (b, True)


async def test_placement_prefers_less_loaded_hosts(pd: httpx.AsyncClient) -> None:
    busy, _ = await register(pd, ["Player"], load=1000)
    idle = [(await register(pd, ["Player"], load=0))[0] for _ in range(2)]
    placed = Counter[int]()
    for i in range(60):
        body = {"actor_type": "Player", "actor_id": f"p{i}"}
        placed[(await post(pd, "/placement/find_position", body))["server_id"]] += 1
    assert placed[busy] == 0  # two choices: the busy host always loses
    assert all(placed[s] > 10 for s in idle)  # and the idle ones share the burst


async def test_two_pds_racing_agree_on_every_position(store: Store) -> None:
    prefix = unique_prefix("race")
    answers: dict[str, set[int]] = {}
    async with (
        client_for(PlacementDriver(store, prefix=prefix)) as one,
        client_for(PlacementDriver(store, prefix=prefix)) as two,
    ):
        for _ in range(3):
            await register(one, ["Player"])

        async def find(client: httpx.AsyncClient, key: str) -> None:
            body = {"actor_type": "Player", "actor_id": key}
            answer = await post(client, "/placement/find_position", body)
            answers.setdefault(key, set()).add(answer["server_id"])

        async with anyio.create_task_group() as tg:
            for i in range(60):
                key = f"k{i % 15}"
                tg.start_soon(find, one if i % 2 else two, key)
    assert len(answers) == 15
    assert all(len(servers) == 1 for servers in answers.values()), answers


async def test_find_positions_answers_each_actor_in_order(pd: httpx.AsyncClient) -> None:
    a, lease = await register(pd, ["Player"])
    single = await post(pd, "/placement/find_position", {"actor_type": "Player", "actor_id": "p0"})
    actors = [{"actor_type": "Player", "actor_id": f"p{i}"} for i in range(5)]
    actors += [
        {"actor_type": "Player", "actor_id": "p3"},  # asked twice in one batch
        {"actor_type": "Nobody", "actor_id": "1"},
        {"actor_type": "A/B", "actor_id": "1"},
        {"actor_type": "Player", "actor_id": "x" * 300},
    ]
    answer = await post(pd, "/placement/find_positions", {"positions": actors, "ttl": 9})
    got = answer["positions"]
    assert len(got) == len(actors)
    for item, asked in zip(got[:6], actors[:6], strict=True):
        assert (item["actor_type"], item["actor_id"]) == (asked["actor_type"], asked["actor_id"])
        assert (item["server_id"], item["lease_id"], item["ttl"]) == (a, lease, 9)
    assert got[0]["created"] is False  # placed before, by find_position
    assert got[0]["create_time"] == single["create_time"]
    assert [g["created"] for g in got[1:5]] == [True] * 4
    assert got[5] == got[3]
    assert (got[6]["status"], got[6]["error"]) == (503, "no_host")
    assert "Nobody" in got[6]["message"]
    assert [(g["status"], g["error"]) for g in got[7:]] == [(400, "bad_request")] * 2
    again = await post(pd, "/placement/find_positions", {"positions": actors[:5]})
    assert [g["created"] for g in again["positions"]] == [False] * 5
    assert [g["create_time"] for g in again["positions"]] == [g["create_time"] for g in got[:5]]


async def test_find_positions_bad_requests(pd: httpx.AsyncClient) -> None:
    answer = await post(pd, "/placement/find_positions", {"positions": "no"}, 422)
    assert (answer["error"], answer["field"]) == ("invalid_request", "positions")
    answer = await post(pd, "/placement/find_positions", {}, 422)
    assert "positions" in answer["message"]
    many = [{"actor_type": "Player", "actor_id": str(i)} for i in range(MAX_BATCH + 1)]
    answer = await post(pd, "/placement/find_positions", {"positions": many}, 422)
    assert (answer["error"], answer["field"]) == ("invalid_request", "positions")
    one = [{"actor_type": "Player", "actor_id": 5}]  # not a string: no coercion
    answer = await post(pd, "/placement/find_positions", {"positions": one}, 422)
    assert answer["field"] == "positions.0.actor_id"
    assert (await post(pd, "/placement/find_positions", {"positions": []})) == {"positions": []}


async def test_a_batch_spreads_over_hosts_and_skips_a_dead_one(store: Store) -> None:
    driver = PlacementDriver(store, prefix=unique_prefix("dead"))
    async with client_for(driver) as pd:
        hosts = [await register(pd, ["Player"]) for _ in range(3)]
        await driver.hosts(max_age=0.0)  # the PD's view has all three ...
        dead_id, dead_lease = hosts[0]
        await store.revoke(dead_lease)  # ... and one dies behind its back
        actors = [{"actor_type": "Player", "actor_id": f"p{i}"} for i in range(60)]
        got = (await post(pd, "/placement/find_positions", {"positions": actors}))["positions"]
        placed = Counter(g["server_id"] for g in got)
        assert dead_id not in placed
        assert set(placed) == {hosts[1][0], hosts[2][0]}
        assert all(n > 10 for n in placed.values())  # a burst in one batch still spreads
        assert all(g["created"] for g in got)
        # and once every host is gone, nothing is placed
        for _, lease in hosts[1:]:
            await store.revoke(lease)
        got = (await post(pd, "/placement/find_positions", {"positions": actors[:1]}))["positions"]
        # the position died with its hosts' lease, and no host is left to take it
        assert (got[0]["status"], got[0]["error"]) == (503, "no_host")


async def test_racing_batches_on_two_pds_place_each_actor_once(store: Store) -> None:
    prefix = unique_prefix("batchrace")
    answers: dict[str, set[int]] = {}
    created = Counter[str]()
    async with (
        client_for(PlacementDriver(store, prefix=prefix)) as one,
        client_for(PlacementDriver(store, prefix=prefix)) as two,
    ):
        for _ in range(3):
            await register(one, ["Player"])

        async def find(client: httpx.AsyncClient, keys: list[str]) -> None:
            body = {"positions": [{"actor_type": "Player", "actor_id": k} for k in keys]}
            for item in (await post(client, "/placement/find_positions", body))["positions"]:
                answers.setdefault(item["actor_id"], set()).add(item["server_id"])
                created[item["actor_id"]] += item["created"]

        async with anyio.create_task_group() as tg:
            for i in range(12):
                keys = [f"k{(i * 7 + j) % 50}" for j in range(25)]
                tg.start_soon(find, one if i % 2 else two, keys)
    assert len(answers) == 50
    assert all(len(servers) == 1 for servers in answers.values()), answers
    assert set(created.values()) == {1}  # exactly one request created each position


class GatedStore(MemoryStore):
    """A memory store whose batch creates wait for a gate, and count themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = anyio.Event()
        self.batches: list[int] = []
        self.fail = False

    async def create_many(self, items: Sequence[tuple[str, bytes, int]]) -> list[CreateOutcome]:
        self.batches.append(len(items))
        await self.gate.wait()
        if self.fail:
            raise StoreUnavailableError("etcd is down (a test)")
        return await super().create_many(items)


async def test_concurrent_requests_share_store_batches() -> None:
    store = GatedStore()
    driver = PlacementDriver(store, prefix=unique_prefix("share"))
    async with client_for(driver) as pd:
        await register(pd, ["Player"])
        answers: dict[int, list[Any]] = {}
        cancelled = anyio.CancelScope()

        async def find(n: int) -> None:
            # every caller asks for k0..k3 (collisions) and for its own keys
            keys = [f"k{n % 4}", f"mine{n}a", f"mine{n}b"]
            answers[n] = await driver.find_positions([("Player", k) for k in keys])

        async def abandoned() -> None:
            with cancelled:
                await driver.find_positions([("Player", "abandoned")])

        async with anyio.create_task_group() as tg:
            try:
                for n in range(20):
                    tg.start_soon(find, n)
                # two callers hold the two slots; the other 18 wait in the queue
                await wait_until(lambda: len(driver.creates._queue) == 18)
                tg.start_soon(abandoned)  # after them, so that it waits too (trio's order varies)
                await wait_until(lambda: len(driver.creates._queue) == 19)
                cancelled.cancel()  # a waiting caller gives up: nothing else is affected
                await wait_until(lambda: len(driver.creates._queue) == 18)
            finally:
                store.gate.set()  # even when a wait failed: the senders' store calls are shielded
        assert store.batches[:2] == [3, 3]  # the first two went alone (two slots) ...
        assert len(store.batches) < 20  # ... the others waited and went together
        placed: dict[str, set[int]] = {}
        created: Counter[str] = Counter()
        for found in answers.values():
            for pos in found:
                assert isinstance(pos, Position)
                placed.setdefault(pos.actor_id, set()).add(pos.server_id)
                created[pos.actor_id] += pos.created
        assert len(placed) == 4 + 40
        assert all(len(s) == 1 for s in placed.values())
        assert set(created.values()) == {1}
        assert await store.get(driver._position_key("Player", "abandoned")) is None

        # a failing store fails every caller waiting on it, and leaks no slot
        store.fail = True
        errors: list[str] = []

        async def failing(n: int) -> None:
            try:
                await driver.find_positions([("Player", f"fail{n}")])
            except StoreUnavailableError as exc:
                errors.append(str(exc))

        async with anyio.create_task_group() as tg:
            for n in range(6):
                tg.start_soon(failing, n)
        assert len(errors) == 6
        store.fail = False
        (pos,) = await driver.find_positions([("Player", "after")])
        assert isinstance(pos, Position)
        assert pos.created
        assert driver.creates._running == 0


async def wait_until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not condition():
            await anyio.sleep(0.001)


# ---------------------------------------------------------------- renewals, deltas, store


async def test_renewals_make_no_store_write(store: Store) -> None:
    pd = PlacementDriver(store, prefix=unique_prefix("renew"))
    async with client_for(pd) as client:
        a, lease_a = await register(client, ["Player"], load=4)
        b, _ = await register(client, ["Player"])
        before = (await store.status()).revision
        for n in range(5):
            body = {"server_id": a, "lease_id": lease_a, "load": 10 + n, "activations": n}
            await post(client, "/membership/keep_alive", body)
        # a host not registered under that lease: refused, without a write either
        wrong = {"server_id": b, "lease_id": lease_a}
        assert (await post(client, "/membership/keep_alive", wrong, 404))["error"] == (
            "not_registered"
        )
        assert (await store.status()).revision == before
        # the loads are this PD's memory: fetch_all shows the last report, the record in
        # the store still holds the load of the registration
        host = (await post(client, "/membership/fetch_all"))["hosts"][str(a)]
        assert (host["load"], host["activations"]) == (14, 4)
        assert host["renew_time"] >= host["start_time"]
        kv = await store.get(f"{pd.prefix}hosts/{a}")
        assert kv is not None
        assert b'"load": 4' in kv.value
        # another PD has no report of a: it uses the load of the registration
        async with client_for(PlacementDriver(store, prefix=pd.prefix)) as other:
            assert (await post(other, "/membership/fetch_all"))["hosts"][str(a)]["load"] == 4


async def test_keep_alive_answers_membership_deltas(store: Store) -> None:
    prefix = unique_prefix("delta")
    async with (
        client_for(PlacementDriver(store, prefix=prefix)) as pd,
        client_for(PlacementDriver(store, prefix=prefix)) as other,
    ):
        a, lease_a = await register(pd, ["Player"])

        async def renew(version: int | None, client: httpx.AsyncClient = pd) -> Any:
            body: dict[str, Any] = {"server_id": a, "lease_id": lease_a}
            if version is not None:
                body["version"] = version
            return await post(client, "/membership/keep_alive", body)

        first = await renew(None)  # no version: the whole table
        assert (first["full"], set(first["hosts"]), first["removed"]) == (True, {str(a)}, [])
        v1 = first["version"]
        same = await renew(v1)
        assert (same["full"], same["hosts"], same["removed"], same["version"]) == (
            False,
            {},
            [],
            v1,
        )
        b, _ = await register(pd, ["Room"])
        joined = await renew(v1)
        assert (joined["full"], set(joined["hosts"]), joined["removed"]) == (False, {str(b)}, [])
        assert joined["hosts"][str(b)]["services"] == {"Room": "app.Room"}  # in full
        assert joined["events"] == []  # a delta names its changes itself
        v2 = joined["version"]
        assert v2 > v1
        await post(pd, "/membership/delete", {"server_id": b})
        left = await renew(v2)
        assert (left["full"], left["hosts"], left["removed"]) == (False, {}, [b])
        # from v1, b came and went: it is reported removed (the caller may have missed it)
        both = await renew(v1)
        assert (both["hosts"], both["removed"]) == ({}, [b])
        # a version this PD never gave: the whole table
        for unknown in (v1 - 1, left["version"] + 1, 0, -5):
            answer = await renew(unknown)
            assert (answer["full"], set(answer["hosts"])) == (True, {str(a)}), unknown
        # versions are per PD: another PD answers the whole table to this one's version
        elsewhere = await renew(left["version"], other)
        assert (elsewhere["full"], set(elsewhere["hosts"])) == (True, {str(a)})
        assert (await renew(elsewhere["version"], other))["full"] is False
        # fetch_all: always the whole table, with the version
        everything = await post(pd, "/membership/fetch_all")
        assert (everything["full"], everything["version"]) == (True, left["version"])
        bad = await post(pd, "/membership/keep_alive", {**{"server_id": a}, "version": "x"}, 422)
        assert bad["error"] == "invalid_request"


async def test_old_version_horizon_answers_the_whole_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(membership_module, "MAX_VERSIONS", 8)  # changes a PD remembers
    pd = PlacementDriver(MemoryStore(), prefix="/h/")
    async with client_for(pd) as client:
        a, lease_a = await register(client, ["Player"])
        body = {"server_id": a, "lease_id": lease_a}
        start = (await post(client, "/membership/keep_alive", body))["version"]
        for _ in range(9):  # each one a change the PD sees
            await register(client, ["Player"])
            await post(client, "/membership/fetch_all")
        answer = await post(client, "/membership/keep_alive", {**body, "version": start})
        assert (answer["full"], len(answer["hosts"])) == (True, 10)
        recent = await post(client, "/membership/keep_alive", {**body, "version": start + 2})
        assert (recent["full"], len(recent["hosts"])) == (False, 7)


async def test_a_full_store_keeps_hosts_and_placed_actors_then_recovers(small_store: Store) -> None:
    store = small_store
    config = MaintenanceConfig(check_interval=0.1, compact_interval=0, quota_bytes=SMALL_QUOTA)
    pd = PlacementDriver(store, prefix="/full/", maintenance=config)
    async with client_for(pd) as client, anyio.create_task_group() as tg:
        await tg.start(pd.maintain)
        a, lease_a = await register(client, ["Player"])
        placed = await post(
            client, "/placement/find_position", {"actor_type": "Player", "actor_id": "1"}
        )
        junk = await fill(store, "/junk/")
        # the host renews; the placed actor is answered; a new one fails fast, saying why
        for _ in range(3):
            view = await post(
                client, "/membership/keep_alive", {"server_id": a, "lease_id": lease_a}
            )
            assert set(view["hosts"]) == {str(a)}
        body = {
            "positions": [
                {"actor_type": "Player", "actor_id": "1"},
                {"actor_type": "Player", "actor_id": "2"},
            ]
        }
        one, two = (await post(client, "/placement/find_positions", body))["positions"]
        assert (one["server_id"], one["created"], one["create_time"]) == (
            a,
            False,
            placed["create_time"],
        )
        assert (two["status"], two["error"]) == (507, "store_full")
        assert "--quota-backend-bytes" in two["message"]
        single = {"actor_type": "Player", "actor_id": "3"}
        assert (await post(client, "/placement/find_position", single, 507))[
            "error"
        ] == "store_full"
        fresh = {"server_id": 999, "address": "127.0.0.1:1", "ttl": 30}
        assert (await post(client, "/membership/register", fresh, 507))["error"] == "store_full"
        assert pd.maintenance_statistics().full
        await anyio.sleep(0.5)  # still full: the alarm is not disarmed
        assert pd.maintenance_statistics().disarms == 0
        # space is freed (deletes work while full): the PD recovers by itself
        for n in range(junk):
            await store.delete(f"/junk/{n}")
        with anyio.fail_after(10):
            while True:
                resp = await client.post(API + "/placement/find_position", json=single)
                if resp.status_code == 200:
                    break
                assert resp.json()["error"] == "store_full"
                await anyio.sleep(0.1)
        stats = pd.maintenance_statistics()
        assert stats.disarms >= 1
        assert not stats.full
        assert (await store.status()).alarms == ()
        tg.cancel_scope.cancel()


async def test_the_pd_compacts_history_on_a_schedule(store: Store) -> None:
    config = MaintenanceConfig(compact_interval=0.1, history=0.3, check_interval=0.1)
    pd = PlacementDriver(store, prefix=unique_prefix("compact"), maintenance=config)
    early = await store.put(pd.prefix + "k", b"0")
    async with anyio.create_task_group() as tg:
        await tg.start(pd.maintain)
        with anyio.fail_after(10):
            while pd.maintenance_statistics().compacted_revision < early:
                await store.put(pd.prefix + "k", b"1")
                await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    stats = pd.maintenance_statistics()
    assert stats.compactions >= 1
    # it keeps `history` seconds: the newest revisions were not compacted
    assert stats.compacted_revision < (await store.status()).revision
    if isinstance(store, EtcdStore):  # etcd itself says the early revision is gone
        async with httpx.AsyncClient() as raw:
            resp = await raw.post(
                store.endpoints[0] + "/v3/kv/range", json={"key": "AA==", "revision": str(early)}
            )
        assert "compacted" in resp.text


def test_maintenance_config_is_validated() -> None:
    from koala import ConfigError

    for bad in (
        {"compact_interval": -1},
        {"history": float("nan")},
        {"check_interval": 0},
        {"quota_bytes": -1},
        {"compact_interval": "60"},
    ):
        with pytest.raises(ConfigError, match="MaintenanceConfig"):
            MaintenanceConfig(**bad)


# ---------------------------------------------------------------- strict input


async def test_lax_input_is_refused_with_422_naming_the_field(store: Store) -> None:
    """What an adversary got accepted before: a string server id, an address with a NUL
    and a surrogate, a load of -10^18 (it then won every placement), a NUL in an actor id.
    Each is refused, naming its field, and nothing is stored."""
    prefix = unique_prefix("strict")
    async with client_for(PlacementDriver(store, prefix=prefix)) as pd:
        a, lease = await register(pd, ["Player"])
        before = {kv.key: kv.value for kv in await store.get_prefix(prefix)}
        good = {"server_id": 99, "address": "127.0.0.1:7099", "services": {"Player": "x"}}
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("/membership/register", {**good, "server_id": "99"}, "server_id"),
            ("/membership/register", {**good, "server_id": 99.0}, "server_id"),
            ("/membership/register", {**good, "server_id": True}, "server_id"),
            ("/membership/register", {**good, "address": "\0../\ud7ff:x"}, "address"),
            ("/membership/register", {**good, "address": "127.0.0.1:0"}, "address"),
            ("/membership/register", {**good, "address": "host"}, "address"),
            ("/membership/register", {**good, "load": -(10**18)}, "load"),
            ("/membership/register", {**good, "ttl": 3601}, "ttl"),
            ("/membership/register", {**good, "services": {"A/B": "x"}}, "services.A/B.[key]"),
            ("/membership/register", {**good, "surprise": 1}, "surprise"),
            ("/membership/keep_alive", {"server_id": a, "lease_id": lease, "load": -1}, "load"),
            ("/membership/keep_alive", {"server_id": a, "lease_id": str(lease)}, "lease_id"),
            ("/membership/grow_leases", {"server_id": a, "lease_id": lease, "count": 257}, "count"),
            ("/placement/find_position", {"actor_type": "Player", "actor_id": "a\0b"}, "actor_id"),
            (
                "/placement/find_position",
                {"actor_type": "Player", "actor_id": "x" * 257},
                "actor_id",
            ),
            (
                "/placement/release",
                {
                    "server_id": a,
                    "positions": [{"actor_type": "Player", "actor_id": "\0", "revision": 5}],
                },
                "positions.0.actor_id",
            ),
            ("/membership/delete", {"server_id": -a}, "server_id"),
        ]
        for path, body, field in cases:
            answer = await post(pd, path, body, status=422)
            assert (answer["error"], answer["field"]) == ("invalid_request", field), (path, body)
            assert answer["message"].startswith(field)
        assert {kv.key: kv.value for kv in await store.get_prefix(prefix)} == before
        # a NUL in one actor of a batch fails that actor alone
        body = {"positions": [{"actor_type": "Player", "actor_id": "a\0"}]}
        (only,) = (await post(pd, "/placement/find_positions", body))["positions"]
        assert (only["status"], only["error"]) == (400, "bad_request")
        assert "control" in only["message"]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.ip_addresses(v=4).map(str),
        st.ip_addresses(v=6).map(lambda ip: f"[{ip}]"),
        st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9](\.[a-z][a-z0-9-]{0,20}[a-z0-9]){0,3}\Z"),
    ),
    st.integers(min_value=1, max_value=65535),
)
def test_every_host_port_address_is_accepted(host: str, port: int) -> None:
    assert check_address(f"{host}:{port}") == f"{host}:{port}"


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.integers(min_value=0, max_value=10**6))
def test_an_address_with_a_bad_character_or_port_is_refused(junk: str, port: int) -> None:
    bad = any(not (c.isascii() and c.isprintable()) or c in " " for c in junk)
    address = f"h{junk}:{port}"
    if bad or not 1 <= port <= 65535:
        with pytest.raises(ValueError, match=r"printable ASCII|port|HOST:PORT"):
            check_address(address)
