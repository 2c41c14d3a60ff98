"""ActorBase: what an implementation inherits, and the registry of implementations."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ._errors import InterfaceError
from ._interface import ActorInterface, interfaces_of
from ._messages import Key
from ._proxy import make_proxy

if TYPE_CHECKING:
    from .host import Activation, TimerHandle

I = TypeVar("I", bound=ActorInterface)

# interface -> implementations defined in this process (most recent last)
_implementations: dict[type[ActorInterface], list[type[ActorBase]]] = {}


class ActorBase:
    """Base of actor implementations: ``class PlayerImpl(IPlayer, ActorBase)``.

    The runtime creates instances; an ``__init__`` takes no arguments. ``self.key`` is the
    actor's key. Override ``on_activate``/``on_deactivate`` for the first and last turn.
    Set the class attribute ``idle_timeout`` (seconds) to change when an unused
    activation is collected, and ``actor_type`` to change the type name used for placement.
    """

    __koala_actor_base__: ClassVar[bool] = True
    idle_timeout: ClassVar[float | None] = None
    actor_type: ClassVar[str] = "ActorBase"
    _koala_activation: Activation

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "actor_type" not in cls.__dict__:
            cls.actor_type = cls.__name__
        timeout = cls.__dict__.get("idle_timeout")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise InterfaceError(
                f"{cls.__name__}.idle_timeout must be a positive number of seconds or None"
            )
        ifaces = interfaces_of(cls)
        for iface in ifaces:
            for name, spec in iface.__koala_methods__.items():
                impl = getattr(cls, name, None)
                if impl is spec.func or impl is None:
                    continue  # still abstract: ABC refuses to instantiate it, with the name
                if not inspect.iscoroutinefunction(impl):
                    raise InterfaceError(
                        f"{cls.__name__}.{name} implements {spec.qualname} and must be 'async def'"
                    )
        if ifaces and not inspect.isabstract(cls):
            for iface in ifaces:
                _implementations.setdefault(iface, []).append(cls)

    @property
    def key(self) -> Key:
        """This actor's key (str or int)."""
        return self._koala_activation.key

    def get_proxy(self, interface: Callable[..., I], key: Key) -> I:
        """A proxy to another actor (or this one), for calls made from inside this actor."""
        return make_proxy(interface, key, self._koala_activation.runtime)

    def register_timer(
        self, interval: float, callback: Callable[[], Awaitable[Any]]
    ) -> TimerHandle:
        """Call ``callback()`` every ``interval`` seconds, as a turn of this actor.

        Tick n is due at start + n * interval (no drift); a late tick is not replayed in a
        burst; an exception is logged and the timer goes on. Timers end with the activation.
        """
        return self._koala_activation.register_timer(interval, callback)

    def deactivate_on_idle(self) -> None:
        """Deactivate this activation as soon as the current turn ends."""
        self._koala_activation.deactivate_on_idle()

    def delay_deactivation(self, seconds: float) -> None:
        """Keep this activation alive for at least ``seconds`` more, even if idle."""
        self._koala_activation.delay_deactivation(seconds)

    async def on_activate(self) -> None:
        """The first turn of an activation. Raising here fails the triggering call."""

    async def on_deactivate(self) -> None:
        """The last turn of an activation (idle collection, deactivate_on_idle, shutdown)."""


def implementations_of(interface: type[ActorInterface]) -> list[type[ActorBase]]:
    """The implementations of ``interface`` defined in this process, oldest first."""
    return list(_implementations.get(interface, ()))


def implemented_interfaces() -> list[type[ActorInterface]]:
    """Every interface some implementation defined in this process implements."""
    return list(_implementations)
