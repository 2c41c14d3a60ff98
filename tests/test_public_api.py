"""The public surface is what was meant: names users copy from the seed, nothing more."""

from __future__ import annotations

import types
from abc import abstractmethod

import pytest
import sniffio

import koala
import koala.testing


def test_public_names() -> None:
    assert set(koala.__all__) == {
        "ActivationState",
        "ActorBase",
        "ActorInterface",
        "ActorNotFoundError",
        "ArgumentTypeError",
        "ConfigError",
        "DeadlineExceededError",
        "Directory",
        "HostConfig",
        "HostUnavailableError",
        "InterfaceError",
        "Key",
        "KoalaError",
        "LOCAL",
        "OverloadedError",
        "RemoteDelivery",
        "RemoteError",
        "Runtime",
        "RuntimeNotRunningError",
        "RuntimeStatistics",
        "ShuttingDownError",
        "TimerHandle",
        "WrongHostError",
        "current_deadline",
        "current_runtime",
        "get_rpc_proxy",
        "one_way",
        "run",
    }
    for name in koala.__all__:
        value = getattr(koala, name)
        if isinstance(value, (type, types.FunctionType)):
            assert value.__module__.startswith("koala")
    assert koala.Key == str | int
    assert isinstance(koala.LOCAL, str)


def test_testing_kit_names() -> None:
    assert set(koala.testing.__all__) == {
        "args_strategy",
        "fail_if_hangs",
        "free_port",
        "local_runtime",
        "test_config",
        "value_strategy",
        "wait_until",
    }


def test_errors_say_whose_fault() -> None:
    assert issubclass(koala.ArgumentTypeError, TypeError)
    assert issubclass(koala.InterfaceError, TypeError)
    assert issubclass(koala.ConfigError, ValueError)
    for name in ("OverloadedError", "ShuttingDownError", "HostUnavailableError", "RemoteError"):
        assert issubclass(getattr(koala, name), koala.KoalaError)


def test_run_honours_koala_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    async def which() -> str:
        return sniffio.current_async_library()

    monkeypatch.setenv("KOALA_BACKEND", "trio")
    assert koala.run(which) == "trio"
    monkeypatch.setenv("KOALA_BACKEND", "asyncio")
    assert koala.run(which) == "asyncio"
    monkeypatch.setenv("KOALA_BACKEND", "curio")
    with pytest.raises(koala.ConfigError, match="not a valid backend"):
        koala.run(which)


class ITouch(koala.ActorInterface):
    @abstractmethod
    async def touch(self) -> int: ...


class Touch(ITouch, koala.ActorBase):
    def __init__(self) -> None:
        self.count = 0

    async def touch(self) -> int:
        self.count += 1
        return self.count


class _Everywhere:
    """A directory written with public names only: every actor is local."""

    def lookup(self, actor_type: str, key: koala.Key) -> str | None:
        return koala.LOCAL

    async def resolve(self, actor_type: str, key: koala.Key) -> str:
        return koala.LOCAL

    def forget(self, actor_type: str, key: koala.Key) -> None:
        pass

    def claim(self, actor_type: str, key: koala.Key, ticket: bytes) -> bool:
        return True

    def released(self, actor_type: str, key: koala.Key) -> None:
        pass


@pytest.mark.anyio
async def test_a_proxy_bound_to_a_runtime_calls_that_one() -> None:
    directory: koala.Directory = _Everywhere()
    config = koala.testing.test_config()
    async with (
        koala.Runtime(config, [Touch], directory=directory) as a,
        koala.Runtime(config, [Touch], directory=directory) as b,
    ):
        assert await koala.get_rpc_proxy(ITouch, "k", runtime=a).touch() == 1
        assert a.is_active("Touch", "k")
        assert not b.is_active("Touch", "k")
        assert await koala.get_rpc_proxy(ITouch, "k").touch() == 1  # the newest: b
        assert await koala.get_rpc_proxy(ITouch, "k", runtime=a).touch() == 2
        assert koala.get_rpc_proxy(ITouch, "k", runtime=a) == koala.get_rpc_proxy(ITouch, "k")
