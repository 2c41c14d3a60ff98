"""Interfaces are checked when defined; only their methods are callable."""

from __future__ import annotations

from abc import abstractmethod

import pytest

from koala import ActorBase, ActorInterface, InterfaceError, get_rpc_proxy, one_way


def test_sync_method_is_rejected_naming_it() -> None:
    with pytest.raises(TypeError, match=r"IBad\.hello must be declared 'async def'"):

        class IBad(ActorInterface):
            @abstractmethod
            def hello(self, name: str) -> str: ...


def test_missing_parameter_annotation_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"IBad\.hello parameter 'name' has no type annotation"):

        class IBad(ActorInterface):
            @abstractmethod
            async def hello(self, name) -> str: ...  # type: ignore[no-untyped-def]


def test_missing_return_annotation_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"IBad\.hello has no return annotation"):

        class IBad(ActorInterface):
            @abstractmethod
            async def hello(self, name: str): ...  # type: ignore[no-untyped-def]


def test_star_args_are_rejected() -> None:
    with pytest.raises(InterfaceError, match=r"cannot take \*args"):

        class IBad(ActorInterface):
            @abstractmethod
            async def hello(self, *args: str) -> str: ...


def test_one_way_must_return_none() -> None:
    with pytest.raises(InterfaceError, match="one-way, so it must be annotated '-> None'"):

        class IBad(ActorInterface):
            @one_way
            @abstractmethod
            async def fire(self, x: int) -> int: ...


def test_sync_implementation_is_rejected() -> None:
    class IGood(ActorInterface):
        @abstractmethod
        async def hello(self) -> str: ...

    with pytest.raises(TypeError, match=r"Impl\.hello implements IGood\.hello"):

        class Impl(IGood, ActorBase):
            def hello(self) -> str:  # type: ignore[override]
                return "x"


def test_interface_methods_are_collected_with_inheritance() -> None:
    class IBase(ActorInterface):
        @abstractmethod
        async def a(self) -> None: ...

    class IDerived(IBase):
        @abstractmethod
        async def b(self, x: int = 3) -> int: ...

        def _private_helper(self) -> None:
            """Private names are not part of the interface."""

    assert set(IDerived.__koala_methods__) == {"a", "b"}
    assert set(IBase.__koala_methods__) == {"a"}


def test_proxy_exposes_only_interface_methods() -> None:
    class IOnly(ActorInterface):
        @abstractmethod
        async def visible(self) -> int: ...

    class OnlyImpl(IOnly, ActorBase):
        async def visible(self) -> int:
            return 1

        async def hidden(self) -> int:
            return 2

    proxy = get_rpc_proxy(IOnly, "k")
    assert isinstance(proxy, IOnly)
    assert not hasattr(proxy, "hidden")
    assert proxy == get_rpc_proxy(IOnly, "k")
    assert proxy != get_rpc_proxy(IOnly, 1)


@pytest.mark.parametrize("key", [1.5, None, True, b"x", ("a",)])
def test_keys_are_str_or_int(key: object) -> None:
    class IK(ActorInterface):
        @abstractmethod
        async def f(self) -> None: ...

    with pytest.raises(TypeError, match="an actor key is a str or an int"):
        get_rpc_proxy(IK, key)  # type: ignore[arg-type]


def test_non_interface_is_rejected() -> None:
    with pytest.raises(InterfaceError, match="is not an actor interface"):
        get_rpc_proxy(int, "1")  # type: ignore[type-var]


def test_bad_idle_timeout_is_rejected() -> None:
    class IT(ActorInterface):
        @abstractmethod
        async def f(self) -> None: ...

    with pytest.raises(InterfaceError, match="idle_timeout must be a positive number"):

        class Impl(IT, ActorBase):
            idle_timeout = -1

            async def f(self) -> None:
                return None
