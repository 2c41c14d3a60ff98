"""The app the gateway cluster tests run in `koala host` processes.

``Player`` serves WebSocket clients: it greets each session with the pid of the process
that holds it, echoes frames (text stays text, binary stays binary), and answers a few
text commands; a frame ``n-<i>`` (a numbered burst) takes a few ms. Its hooks append
``open|msg|close KEY PID ...`` lines to the file named by ``KOALA_TEST_EVENTS``, so a
test sees what the actors saw across processes.
"""

from __future__ import annotations

import os
from abc import abstractmethod

import anyio

from koala import ActorBase, ActorInterface
from koala.gateway import ActorRef, ClientHandler, ClientSession, IAccount

EVENTS_ENV = "KOALA_TEST_EVENTS"


def record(*words: object) -> None:
    path = os.environ.get(EVENTS_ENV)
    if path:
        line = (" ".join(str(w) for w in words) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: lines never interleave
        finally:
            os.close(fd)


class IPlayer(ActorInterface):
    @abstractmethod
    async def pid(self) -> int: ...


class Player(IPlayer, ClientHandler, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.frames = 0

    async def pid(self) -> int:
        return os.getpid()

    async def on_client_open(self, session: ClientSession, rebind: bool) -> None:
        record("open", self.key, os.getpid(), rebind)
        if str(self.key).startswith("refuse"):
            raise PermissionError("this player is banned")
        await session.push(f"welcome {session.open_id} pid={os.getpid()} rebind={rebind}")

    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        self.frames += 1
        record("msg", self.key, os.getpid(), repr(data))
        if isinstance(data, str) and data.startswith("n-"):
            await anyio.sleep(0.004)  # so that a burst is still in flight when a test kills
        if data == "pid":
            await session.push(f"pid={os.getpid()} frames={self.frames}")
        elif data == "close":
            await session.close(4100, "asked to")
        else:
            await session.push(data)

    async def on_client_close(self, session: ClientSession, reason: str) -> None:
        record("close", self.key, os.getpid(), reason.replace(" ", "_"))


class Account(IAccount, ActorBase):
    """Binds open ids starting with 'x' to nothing; others to Player/acct-<open_id>."""

    async def find_actor(self, server_id: str) -> ActorRef:
        assert isinstance(self.key, str)
        if self.key.startswith("x"):
            raise LookupError(f"no player for {self.key}")
        return ActorRef("Player", f"acct-{self.key}")
