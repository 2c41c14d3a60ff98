"""A player whose state outlives the process, with koala.storage.

    koala dev examples/player_state.py
    curl -X POST 127.0.0.1:8000/players/ann/gold/10    # {"name": "ann", "gold": 10, ...}
    # stop it (Ctrl-C), start it again:
    curl 127.0.0.1:8000/players/ann                    # still 10

With no setup the state goes to SQLite (``player_state.db`` in the current
directory). The same code runs on PostgreSQL by changing the URL::

    KOALA_STORAGE_URL=postgresql://user:password@host:5432/db koala dev examples/player_state.py

Without HTTP: ``python examples/player_state.py ann 10`` adds 10 gold and prints it.
"""

from __future__ import annotations

import os
import sys
from abc import abstractmethod
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

from koala import ActorBase, ActorInterface, HostConfig, Runtime, get_rpc_proxy, run
from koala.storage import PersistentState, Storage

# Opened on first use; nothing to set up for SQLite.
STORAGE = Storage(os.environ.get("KOALA_STORAGE_URL", "sqlite:///player_state.db"))


@dataclass
class PlayerState:
    name: str = ""
    gold: int = 0
    items: list[str] = field(default_factory=list)
    # a field added later needs a default: rows saved before it still load
    level: int = 1


class IPlayer(ActorInterface):
    @abstractmethod
    async def get(self) -> PlayerState: ...

    @abstractmethod
    async def add_gold(self, amount: int) -> PlayerState: ...

    @abstractmethod
    async def give(self, item: str) -> PlayerState: ...


class PlayerImpl(IPlayer, ActorBase):
    state = PersistentState(PlayerState, storage=STORAGE, default=PlayerState, store="players")

    async def on_activate(self) -> None:
        await self.state.load()
        if not self.state.exists:
            self.state.value.name = str(self.key)

    async def get(self) -> PlayerState:
        return self.state.value

    async def add_gold(self, amount: int) -> PlayerState:
        self.state.value.gold += amount
        self.state.value.level = 1 + self.state.value.gold // 100
        await self.state.save()  # a stale activation would fail here, loudly
        return self.state.value

    async def give(self, item: str) -> PlayerState:
        self.state.value.items.append(item)
        await self.state.save()
        return self.state.value


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    await STORAGE.open()  # fail at start, not at the first request, if the URL is wrong
    yield
    # not closed here: actors may still save while the runtime drains after HTTP stops


app = FastAPI(lifespan=lifespan)


@app.get("/players/{player}")
async def get_player(player: str) -> PlayerState:
    return await get_rpc_proxy(IPlayer, player).get()


@app.post("/players/{player}/gold/{amount}")
async def add_gold(player: str, amount: int) -> PlayerState:
    return await get_rpc_proxy(IPlayer, player).add_gold(amount)


@app.post("/players/{player}/items/{item}")
async def give(player: str, item: str) -> PlayerState:
    return await get_rpc_proxy(IPlayer, player).give(item)


async def main(player: str, amount: int) -> None:
    async with STORAGE, Runtime(HostConfig(), actors=[PlayerImpl]):
        state = await get_rpc_proxy(IPlayer, player).add_gold(amount)
        print(f"{state.name}: gold {state.gold}, level {state.level}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or not sys.argv[2].lstrip("-").isdigit():
        sys.exit("usage: python examples/player_state.py PLAYER AMOUNT")
    player, amount = sys.argv[1], int(sys.argv[2])
    run(lambda: main(player, amount))  # on the loop KOALA_BACKEND picks
