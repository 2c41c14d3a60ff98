"""Position leases: a host's positions are spread over several leases of its own, so
that when it dies etcd deletes them lease by lease. Against the PD's API (memory store
and a real etcd, every backend) and a host's directory."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import httpx
import pytest

from koala.pd.server import MemoryStore, PlacementDriver, Store
from tests._etcd import etcd_url, unique_prefix
from tests.test_pd_api import client_for, post, register, store

__all__ = ["etcd_url", "store"]

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pd_and_store(store: Store) -> AsyncIterator[tuple[httpx.AsyncClient, Store, str]]:
    prefix = unique_prefix("leases")
    async with client_for(PlacementDriver(store, prefix=prefix)) as client:
        yield client, store, prefix


async def grow(pd: httpx.AsyncClient, server_id: int, lease: int, count: int) -> list[int]:
    body = {"server_id": server_id, "lease_id": lease, "count": count}
    leases: list[int] = (await post(pd, "/membership/grow_leases", body))["position_leases"]
    return leases


async def placed_leases(store: Store, prefix: str) -> list[int]:
    return [kv.lease for kv in await store.get_prefix(prefix + "placement/")]


async def test_positions_spread_over_the_hosts_leases_and_go_with_them(
    pd_and_store: tuple[httpx.AsyncClient, Store, str],
) -> None:
    pd, store, prefix = pd_and_store
    server_id, lease = await register(pd, ["Player"])
    extra = await grow(pd, server_id, lease, 3)
    assert len(extra) == 3
    assert lease not in extra
    body = {"positions": [{"actor_type": "Player", "actor_id": str(i)} for i in range(200)]}
    await post(pd, "/placement/find_positions", body)
    leases = await placed_leases(store, prefix)
    assert len(leases) == 200
    counts = {x: leases.count(x) for x in [lease, *extra]}
    assert set(leases) == set(counts)  # every position on one of the host's leases
    assert min(counts.values()) > 20  # and spread over all of them
    # growing again appends; the record keeps them (and answers never show them)
    again = await grow(pd, server_id, lease, 1)
    assert again[:3] == extra
    view = await post(pd, "/membership/fetch_all")
    assert "position_leases" not in view["hosts"][str(server_id)]
    assert "placement_key" not in view["hosts"][str(server_id)]
    # a renewal renews every lease; deleting the host revokes them all
    await post(pd, "/membership/keep_alive", {"server_id": server_id, "lease_id": lease})
    for one in again:
        assert await store.time_to_live(one) is not None
    await post(pd, "/membership/delete", {"server_id": server_id})
    assert await placed_leases(store, prefix) == []
    for one in again:
        assert await store.time_to_live(one) is None


async def test_a_lost_position_lease_fails_the_renewal(
    pd_and_store: tuple[httpx.AsyncClient, Store, str],
) -> None:
    pd, store, _ = pd_and_store
    server_id, lease = await register(pd, ["Player"])
    grown = await grow(pd, server_id, lease, 2)
    await store.revoke(grown[1])  # its positions are gone
    answer = await post(
        pd, "/membership/keep_alive", {"server_id": server_id, "lease_id": lease}, status=404
    )
    assert answer["error"] == "lease_expired"
    assert "position lease" in answer["message"]


async def test_grow_leases_refuses_what_it_must(
    pd_and_store: tuple[httpx.AsyncClient, Store, str],
) -> None:
    pd, _, _ = pd_and_store
    server_id, lease = await register(pd, ["Player"])
    for body, status, code in [
        ({"server_id": server_id, "lease_id": lease + 1, "count": 1}, 404, "not_registered"),
        ({"server_id": server_id, "lease_id": lease, "count": 0}, 422, "invalid_request"),
        ({"server_id": server_id, "lease_id": lease, "count": 10_000}, 422, "invalid_request"),
        ({"server_id": server_id + 99, "lease_id": lease, "count": 1}, 404, "not_registered"),
    ]:
        answer = await post(pd, "/membership/grow_leases", body, status=status)
        assert answer["error"] == code


async def test_a_host_asks_for_leases_as_its_positions_grow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from koala import HostConfig, Runtime, get_rpc_proxy
    from koala.pd import ClusterDirectory, MemberConfig, PDClient
    from koala.pd import _directory as directory_module
    from koala.pd.server import create_app
    from tests.test_pd_client import IThing, Thing

    monkeypatch.setattr(directory_module, "GROW_LEASES_STEP", 2)
    store = MemoryStore()
    app = create_app(PlacementDriver(store))
    pd = PDClient("http://pd", transport=httpx.ASGITransport(app=app), timeout=2.0)
    directory = ClusterDirectory(
        pd, "127.0.0.1:1", {"Thing": "tests.Thing"}, MemberConfig(ttl=1, positions_per_lease=10)
    )
    rt = Runtime(HostConfig(default_timeout=5), [Thing], directory=directory)
    async with rt, anyio.create_task_group() as tg:
        directory.attach(rt)
        await tg.start(directory.run)
        for i in range(45):
            await get_rpc_proxy(IThing, f"t{i}", runtime=rt).touch()
        with anyio.fail_after(10):  # renewals every 1/3 s ask for 2 more each time: 4 in all
            while len(directory._position_leases) < 4:
                await anyio.sleep(0.05)
        await anyio.sleep(0.5)
        assert len(directory._position_leases) == 4  # 45 // 10
        for i in range(45, 80):
            await get_rpc_proxy(IThing, f"t{i}", runtime=rt).touch()
        leases = {kv.lease for kv in await store.get_prefix("/koala/placement/")}
        assert len(leases) > 2  # new positions go to the new leases too
        assert leases <= {directory.lease_id, *directory._position_leases}
        tg.cancel_scope.cancel()
    await pd.aclose()


async def test_a_departed_hosts_position_leases_are_revoked_one_by_one(store: Store) -> None:
    """Position leases outlive the registration's (3 x TTL); when the host leaves the
    view (its registration lease is gone: it fenced itself), the PD's maintenance
    revokes them one at a time instead of letting them expire together."""
    prefix = unique_prefix("reap")
    driver = PlacementDriver(store, prefix=prefix)
    async with client_for(driver) as pd, anyio.create_task_group() as tg:
        await tg.start(driver.maintain)
        server_id, lease = await register(pd, ["Player"])
        extra = await grow(pd, server_id, lease, 3)
        for one in extra:
            assert (await store.time_to_live(one) or 0) > 30  # 3 x 30 s
        body = {"positions": [{"actor_type": "Player", "actor_id": str(i)} for i in range(60)]}
        await post(pd, "/placement/find_positions", body)
        await driver.hosts(max_age=0.0)
        await store.revoke(lease)  # as if it expired
        with anyio.fail_after(10):
            while await placed_leases(store, prefix):
                await driver.hosts(max_age=0.0)  # the PD sees the host gone
                await anyio.sleep(0.02)
        for one in extra:
            assert await store.time_to_live(one) is None
        driver.stop_maintenance()
