"""Actor timers: ticks are turns of the actor, on a fixed grid, and end with it.

`koala dev examples/timers.py`, then `curl -X POST 127.0.0.1:8000/counter/c1/start`
and `curl 127.0.0.1:8000/counter/c1` a few times.
"""

from abc import abstractmethod

from fastapi import FastAPI

from koala import ActorBase, ActorInterface, TimerHandle, get_rpc_proxy


class ICounter(ActorInterface):
    @abstractmethod
    async def start(self, every_seconds: float) -> None: ...

    @abstractmethod
    async def stop(self) -> int: ...

    @abstractmethod
    async def value(self) -> int: ...


class Counter(ICounter, ActorBase):
    idle_timeout = 300.0  # an unused counter goes after five minutes, with its timer

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.timer: TimerHandle | None = None

    async def start(self, every_seconds: float) -> None:
        if self.timer is None:
            self.timer = self.register_timer(every_seconds, self.tick)

    async def tick(self) -> None:
        self.count += 1  # no lock needed: a tick never overlaps another turn

    async def stop(self) -> int:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return self.count

    async def value(self) -> int:
        return self.count


app = FastAPI()


@app.post("/counter/{key}/start")
async def start(key: str, every: float = 1.0) -> str:
    await get_rpc_proxy(ICounter, key).start(every)
    return "started"


@app.get("/counter/{key}")
async def value(key: str) -> int:
    return await get_rpc_proxy(ICounter, key).value()


@app.post("/counter/{key}/stop")
async def stop(key: str) -> int:
    return await get_rpc_proxy(ICounter, key).stop()
