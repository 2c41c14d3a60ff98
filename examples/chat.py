"""An actor-backed chat room behind the WebSocket gateway.

Run it with ``koala dev examples/chat.py --gateway 127.0.0.1:8001``, then connect two
clients: ``python examples/chat_client.py alice`` and ``python examples/chat_client.py bob``.

Each client is bound to its own ``ChatUser`` actor (the first packet names it); a user
joins the room ``lobby`` when its session opens. A text line is said in the room; the
room tells every member (``deliver``), and each member pushes the line to its session.
``/join NAME`` moves to another room.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod

from koala import ActorBase, ActorInterface, one_way
from koala.gateway import ClientHandler, ClientSession, SessionClosedError


class IRoom(ActorInterface):
    @abstractmethod
    async def join(self, user: str) -> int: ...

    @abstractmethod
    async def leave(self, user: str) -> None: ...

    @abstractmethod
    async def say(self, user: str, text: str) -> None: ...


class IChatUser(ActorInterface):
    @abstractmethod
    @one_way
    async def deliver(self, line: str) -> None: ...


class Room(IRoom, ActorBase):
    def __init__(self) -> None:
        self.members: set[str] = set()

    async def join(self, user: str) -> int:
        self.members.add(user)
        await self.say("*", f"{user} joined")
        return len(self.members)

    async def leave(self, user: str) -> None:
        self.members.discard(user)
        await self.say("*", f"{user} left")

    async def say(self, user: str, text: str) -> None:
        line = f"[{self.key}] {user}: {text}"
        for member in self.members:
            await self.get_proxy(IChatUser, member).deliver(line)


class ChatUser(IChatUser, ClientHandler, ActorBase):
    def __init__(self) -> None:
        self.room = "lobby"

    def _room(self) -> IRoom:
        return self.get_proxy(IRoom, self.room)

    async def on_client_open(self, session: ClientSession, rebind: bool) -> None:
        count = await self._room().join(str(self.key))
        await session.push(f"welcome {self.key}: {count} in {self.room}")

    async def on_client_message(self, session: ClientSession, data: bytes | str) -> None:
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        if text.startswith("/join "):
            await self._room().leave(str(self.key))
            self.room = text.removeprefix("/join ").strip() or "lobby"
            await self._room().join(str(self.key))
        else:
            await self._room().say(str(self.key), text)

    async def on_client_close(self, session: ClientSession, reason: str) -> None:
        if not self.client_sessions:
            await self._room().leave(str(self.key))

    async def deliver(self, line: str) -> None:
        for session in self.client_sessions:
            with contextlib.suppress(SessionClosedError):  # that client just left
                await session.push(line)
