"""The seed's example: an IPlayer actor and an HTTP echo in front of it.

Run it with `koala dev examples/echo.py`, then `curl 127.0.0.1:8000/echo/hi`.
"""

from abc import abstractmethod

from fastapi import FastAPI

from koala import ActorBase, ActorInterface, get_rpc_proxy


class IPlayer(ActorInterface):
    @abstractmethod
    async def echo(self, msg: str) -> str:
        pass


class PlayerImpl(IPlayer, ActorBase):
    def __init__(self) -> None:
        super().__init__()

    async def echo(self, msg: str) -> str:
        return msg


app = FastAPI()


@app.get("/")
def root() -> str:
    return "hello world"


@app.get("/echo/{msg}")
async def echo(msg: str) -> str:
    proxy = get_rpc_proxy(IPlayer, "1")
    result = await proxy.echo(msg)
    return result
