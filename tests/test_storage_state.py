"""PersistentState: an actor's state survives deactivation and a new Runtime."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from abc import abstractmethod
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from koala import ActorBase, ActorInterface, HostConfig, Runtime, get_rpc_proxy
from koala.storage import PersistentState, Row, Storage, StorageError, VersionConflictError
from tests._postgres import PostgresServer, postgres_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass
class Wallet:
    gold: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Bag:
    items: list[str] = dataclasses.field(default_factory=list)


CURRENT: list[Storage] = []  # the storage of the running test (storage= may be a function)
activations: Counter[str] = Counter()


class IWallet(ActorInterface):
    @abstractmethod
    async def add(self, amount: int, note: str) -> int: ...

    @abstractmethod
    async def put(self, item: str) -> list[str]: ...

    @abstractmethod
    async def snapshot(self) -> tuple[Wallet, Bag, int | None]: ...

    @abstractmethod
    async def leave(self) -> None: ...

    @abstractmethod
    async def forget(self) -> None: ...


class WalletImpl(IWallet, ActorBase):
    wallet = PersistentState(Wallet, storage=lambda: CURRENT[0], default=Wallet, store="wallets")
    bag = PersistentState(Bag, storage=lambda: CURRENT[0], default=Bag, store="bags", key2="bag")

    async def on_activate(self) -> None:
        activations[str(self.key)] += 1
        await self.wallet.load()
        await self.bag.load()

    async def add(self, amount: int, note: str) -> int:
        self.wallet.value.gold += amount
        self.wallet.value.notes.append(note)
        await self.wallet.save()
        return self.wallet.value.gold

    async def put(self, item: str) -> list[str]:
        self.bag.value.items.append(item)
        await self.bag.save()
        return self.bag.value.items

    async def snapshot(self) -> tuple[Wallet, Bag, int | None]:
        return self.wallet.value, self.bag.value, self.wallet.version

    async def leave(self) -> None:
        self.deactivate_on_idle()

    async def forget(self) -> None:
        await self.wallet.clear()
        await self.bag.clear()


class ICareless(ActorInterface):
    @abstractmethod
    async def peek(self) -> int: ...


class CarelessImpl(ICareless, ActorBase):
    """Forgets to load its state in on_activate."""

    wallet = PersistentState(Wallet, storage=lambda: CURRENT[0], default=Wallet)

    async def peek(self) -> int:
        return self.wallet.value.gold


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_server").url
    async with Storage(url) as s:
        CURRENT[:] = [s]
        yield s
    CURRENT.clear()


def host() -> Runtime:
    return Runtime(HostConfig(shutdown_grace=5), actors=[WalletImpl, CarelessImpl])


async def test_state_survives_deactivation_and_a_new_runtime(storage: Storage) -> None:
    key = f"w{uuid.uuid4().hex}"
    async with host():
        wallet = get_rpc_proxy(IWallet, key)
        assert await wallet.add(5, "quest") == 5
        assert await wallet.add(7, "loot") == 12
        assert await wallet.put("sword") == ["sword"]
        await wallet.leave()
        assert await wallet.add(1, "tip") == 13  # a new activation, loaded from storage
        assert activations[key] == 2
    async with host():
        value, bag, version = await get_rpc_proxy(IWallet, key).snapshot()
        assert value == Wallet(13, ["quest", "loot", "tip"])
        assert bag == Bag(["sword"])
        assert activations[key] == 3
    rows = await storage.store("wallets", Wallet).load_all(key)
    assert [(r.key2, r.version) for r in rows] == [(None, version)]
    bags = await storage.store("bags", Bag).load_all(key)
    assert [(r.key2, r.value) for r in bags] == [("bag", Bag(["sword"]))]


async def test_a_stale_activation_fails_loudly_and_reloads(storage: Storage) -> None:
    key = f"w{uuid.uuid4().hex}"
    store = storage.store("wallets", Wallet)
    async with host():
        wallet = get_rpc_proxy(IWallet, key)
        await wallet.add(10, "mine")
        # another writer (say, a newer activation elsewhere) moves the row on
        row = await store.load(key)
        assert row is not None
        newer = await store.save(key, Wallet(100, ["elsewhere"]), version=row.version)
        with pytest.raises(VersionConflictError) as info:
            await wallet.add(1, "stale")
        assert info.value.expected == row.version
        assert info.value.actual == newer
        # the stale activation was retired: the next call loads the newest state
        assert await wallet.add(1, "fresh") == 101
        assert activations[key] == 2
    final = await store.load(key)
    assert final is not None
    assert final.value == Wallet(101, ["elsewhere", "fresh"])


async def test_clear_deletes_the_rows(storage: Storage) -> None:
    key = f"w{uuid.uuid4().hex}"
    async with host():
        wallet = get_rpc_proxy(IWallet, key)
        await wallet.add(3, "x")
        await wallet.put("shield")
        await wallet.forget()
        assert await wallet.snapshot() == (Wallet(), Bag(), None)
        assert await storage.store("wallets", Wallet).load_all(key) == []
        assert await storage.store("bags", Bag).load_all(key) == []
        assert await wallet.add(2, "again") == 2


async def test_using_state_before_load_says_what_to_do(storage: Storage) -> None:
    async with host():
        with pytest.raises(StorageError, match=r"await self\.wallet\.load\(\)"):
            await get_rpc_proxy(ICareless, "c").peek()


async def test_default_store_name_is_the_actor_type(storage: Storage) -> None:
    key = f"c{uuid.uuid4().hex}"
    version = await storage.store("CarelessImpl", Wallet).save(key, Wallet(4), version=None)
    handle = WalletImpl.wallet
    assert isinstance(handle, PersistentState)
    assert handle.record_store("X").name == "wallets"
    assert CarelessImpl.wallet.record_store(CarelessImpl.actor_type).name == "CarelessImpl"
    loaded = await storage.store(CarelessImpl.actor_type, Wallet).load(key)
    assert loaded == Row(key, None, version, Wallet(4))


# ---------------------------------------------------------------- the example


def run_example(url: str, *args: str) -> str:
    env = {**os.environ, "KOALA_STORAGE_URL": url}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "player_state.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_example_keeps_state_across_restarts(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'players.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.url
    player = f"p{uuid.uuid4().hex[:8]}"
    assert f"{player}: gold 10" in run_example(url, player, "10")
    assert f"{player}: gold 35" in run_example(url, player, "25")  # a new process
