"""Call-chain reentrancy: A -> B -> A completes instead of deadlocking.

`koala dev examples/reentrancy.py`, then `curl 127.0.0.1:8000/handshake/alice/bob`:
alice asks bob to shake hands, bob calls alice back inside the same call chain, and
alice answers at once although her first turn is still waiting for bob.
"""

from abc import abstractmethod

from fastapi import FastAPI

from koala import ActorBase, ActorInterface, get_rpc_proxy


class IPerson(ActorInterface):
    @abstractmethod
    async def greet(self, other: str) -> list[str]:
        """Ask `other` to greet back; returns the conversation."""

    @abstractmethod
    async def greet_back(self, caller: str) -> list[str]: ...

    @abstractmethod
    async def name(self) -> str: ...


class Person(IPerson, ActorBase):
    async def greet(self, other: str) -> list[str]:
        reply = await self.get_proxy(IPerson, other).greet_back(str(self.key))
        return [f"{self.key}: hello {other}", *reply]

    async def greet_back(self, caller: str) -> list[str]:
        # Calls the actor whose turn is waiting for us: same chain, so it runs now.
        caller_name = await self.get_proxy(IPerson, caller).name()
        return [f"{self.key}: hello {caller_name}"]

    async def name(self) -> str:
        return str(self.key).title()


app = FastAPI()


@app.get("/handshake/{a}/{b}")
async def handshake(a: str, b: str) -> list[str]:
    return await get_rpc_proxy(IPerson, a).greet(b)
