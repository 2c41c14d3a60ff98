"""The public surface is what was meant: names users copy from the seed, nothing more."""

from __future__ import annotations

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
        "HostConfig",
        "HostUnavailableError",
        "InterfaceError",
        "KoalaError",
        "OverloadedError",
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
        assert getattr(koala, name).__module__.startswith("koala")


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
