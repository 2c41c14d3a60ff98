"""Calls: typed arguments, copies, several interfaces, errors crossing back."""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import anyio
import pytest
from hypothesis import given, settings

from koala import (
    ActorBase,
    ActorInterface,
    ActorNotFoundError,
    ArgumentTypeError,
    RemoteError,
    RuntimeNotRunningError,
    get_rpc_proxy,
)
from koala.testing import args_strategy, local_runtime

pytestmark = pytest.mark.anyio


@dataclasses.dataclass
class Bag:
    owner: str
    items: list[str]


class GameError(Exception):
    """A user exception type, importable by the caller."""


class IPlayer(ActorInterface):
    @abstractmethod
    async def echo(self, hello: str) -> str: ...

    @abstractmethod
    async def add(self, a: int, b: int = 10) -> int: ...

    @abstractmethod
    async def keep(self, bag: Bag) -> Bag: ...

    @abstractmethod
    async def mutate_kept(self) -> None: ...

    @abstractmethod
    async def fail(self, kind: str) -> None: ...

    @abstractmethod
    async def calls(self) -> int: ...

    @abstractmethod
    async def bad_result(self) -> str: ...


class IStats(ActorInterface):
    @abstractmethod
    async def calls(self) -> int: ...

    @abstractmethod
    async def whoami(self) -> str: ...


class PlayerImpl(IPlayer, IStats, ActorBase):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.bag: Bag | None = None

    async def echo(self, hello: str) -> str:
        self.count += 1
        return hello

    async def add(self, a: int, b: int = 10) -> int:
        self.count += 1
        return a + b

    async def keep(self, bag: Bag) -> Bag:
        self.count += 1
        self.bag = bag
        return bag

    async def mutate_kept(self) -> None:
        assert self.bag is not None
        self.bag.items.append("changed-by-actor")

    async def fail(self, kind: str) -> None:
        if kind == "value":
            raise ValueError("bad value", 42)
        if kind == "game":
            raise GameError("you lost")

        class LocalOnly(Exception):
            pass

        raise LocalOnly("not importable")

    async def calls(self) -> int:
        return self.count

    async def whoami(self) -> str:
        return f"{type(self.key).__name__}:{self.key}"

    async def bad_result(self) -> str:
        return 5  # type: ignore[return-value]


async def test_echo_from_the_seed() -> None:
    async with local_runtime(PlayerImpl):
        proxy = get_rpc_proxy(IPlayer, "1")
        assert await proxy.echo("111222") == "111222"


async def test_keyword_and_default_arguments() -> None:
    async with local_runtime(PlayerImpl):
        proxy = get_rpc_proxy(IPlayer, "1")
        assert await proxy.add(1) == 11
        assert await proxy.add(1, b=2) == 3
        assert await proxy.add(b=5, a=1) == 6
        with pytest.raises(ArgumentTypeError, match="missing a required argument"):
            await proxy.add()  # type: ignore[call-arg]


async def test_wrong_argument_type_fails_at_caller_and_never_runs() -> None:
    async with local_runtime(PlayerImpl):
        proxy = get_rpc_proxy(IPlayer, "1")
        with pytest.raises(ArgumentTypeError, match=r"IPlayer\.add\(\) argument 'a'"):
            await proxy.add("1")  # type: ignore[arg-type]
        with pytest.raises(ArgumentTypeError, match=r"argument 'bag'\.items\[1\]"):
            await proxy.keep(Bag("me", ["ok", 3]))  # type: ignore[list-item]
        assert await get_rpc_proxy(IStats, "1").calls() == 0


async def test_several_interfaces_reach_one_activation() -> None:
    async with local_runtime(PlayerImpl) as rt:
        await get_rpc_proxy(IPlayer, "7").echo("x")
        await get_rpc_proxy(IPlayer, "7").echo("y")
        assert await get_rpc_proxy(IStats, "7").calls() == 2
        assert rt.statistics().activations == 1


async def test_str_and_int_keys_are_distinct_actors() -> None:
    async with local_runtime(PlayerImpl) as rt:
        assert await get_rpc_proxy(IStats, "1").whoami() == "str:1"
        assert await get_rpc_proxy(IStats, 1).whoami() == "int:1"
        assert rt.statistics().activations == 2


async def test_arguments_and_results_are_copies() -> None:
    async with local_runtime(PlayerImpl):
        proxy = get_rpc_proxy(IPlayer, "1")
        bag = Bag("me", ["sword"])
        returned = await proxy.keep(bag)
        assert returned == bag
        assert returned is not bag
        bag.items.append("changed-by-caller")
        returned.items.append("changed-in-result")
        await proxy.mutate_kept()
        kept = await proxy.keep(Bag("me", []))
        assert kept.items == []
        assert bag.items == ["sword", "changed-by-caller"]


async def test_builtin_error_keeps_its_type_args_and_traceback() -> None:
    async with local_runtime(PlayerImpl):
        with pytest.raises(ValueError, match="bad value") as info:
            await get_rpc_proxy(IPlayer, "1").fail("value")
        assert info.value.args == ("bad value", 42)
        assert info.value.remote_type == "builtins.ValueError"  # type: ignore[attr-defined]
        assert "in fail" in info.value.remote_traceback  # type: ignore[attr-defined]


async def test_user_error_keeps_its_type() -> None:
    async with local_runtime(PlayerImpl):
        with pytest.raises(GameError, match="you lost") as info:
            await get_rpc_proxy(IPlayer, "1").fail("game")
        assert "raise GameError" in info.value.remote_traceback  # type: ignore[attr-defined]


async def test_unimportable_error_becomes_remote_error() -> None:
    async with local_runtime(PlayerImpl):
        with pytest.raises(RemoteError) as info:
            await get_rpc_proxy(IPlayer, "1").fail("local")
        assert "LocalOnly" in info.value.remote_type
        assert info.value.remote_message == "not importable"
        assert "raise LocalOnly" in info.value.remote_traceback


async def test_result_that_does_not_fit_is_an_error_for_the_caller() -> None:
    async with local_runtime(PlayerImpl):
        with pytest.raises(ArgumentTypeError, match=r"result of IPlayer\.bad_result"):
            await get_rpc_proxy(IPlayer, "1").bad_result()


async def test_actor_survives_its_errors() -> None:
    async with local_runtime(PlayerImpl):
        proxy = get_rpc_proxy(IPlayer, "1")
        with pytest.raises(ValueError, match="bad value"):
            await proxy.fail("value")
        assert await proxy.echo("still here") == "still here"


async def test_proxy_works_from_background_tasks() -> None:
    async with local_runtime(PlayerImpl):
        results: list[str] = []

        async def worker(i: int) -> None:
            results.append(await get_rpc_proxy(IPlayer, str(i % 3)).echo(str(i)))

        async with anyio.create_task_group() as tg:
            for i in range(30):
                tg.start_soon(worker, i)
        assert sorted(results) == sorted(str(i) for i in range(30))


async def test_proxy_outside_a_runtime_says_what_to_do() -> None:
    proxy = get_rpc_proxy(IPlayer, "1")  # making one is fine anywhere
    with pytest.raises(RuntimeNotRunningError, match="koala dev"):
        await proxy.echo("x")


@settings(max_examples=20, deadline=None)
@given(args=args_strategy(IPlayer.keep))
async def test_keep_returns_what_it_got(args: tuple[Bag]) -> None:
    async with local_runtime(PlayerImpl):
        assert await get_rpc_proxy(IPlayer, "h").keep(*args) == args[0]


class IUnserved(ActorInterface):
    @abstractmethod
    async def ping(self) -> str: ...


class UnservedImpl(IUnserved, ActorBase):
    async def ping(self) -> str:
        return "pong"


async def test_a_host_does_not_activate_types_it_does_not_serve() -> None:
    async with local_runtime(PlayerImpl) as rt:
        with pytest.raises(ActorNotFoundError, match="does not serve UnservedImpl"):
            await get_rpc_proxy(IUnserved, "x").ping()
        assert rt.statistics().activations == 0
