"""The implementations a host serves, and which one a call through an interface reaches."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .._actor import ActorBase, implementations_of, implemented_interfaces
from .._errors import ActorNotFoundError
from .._interface import ActorInterface, MethodSpec, interfaces_of
from .._messages import Request

MAX_TARGETS: Final = 10_000  # wire targets remembered (names come from peers: bounded)


class Served:
    """``actors``: the implementations this host serves (None: every one defined in
    the process)."""

    def __init__(self, actors: Iterable[type[ActorBase]] | None) -> None:
        self.actors = list(actors) if actors is not None else None
        self.impls: dict[type[ActorInterface], type[ActorBase]] = {}
        self._targets: dict[tuple[str, str, str], tuple[type[ActorBase], MethodSpec]] = {}
        for impl in self.actors or ():
            if not (isinstance(impl, type) and issubclass(impl, ActorBase)):
                raise TypeError(f"{impl!r} is not an ActorBase implementation")
            for iface in interfaces_of(impl):
                self.impls[iface] = impl

    def serves(self, impl: type[ActorBase]) -> bool:
        return self.actors is None or impl in self.actors

    def impl_for(self, interface: type[ActorInterface]) -> type[ActorBase]:
        """The implementations this host serves come first; a host may also call actors
        it does not serve (they live elsewhere), as long as their class is importable."""
        found = self.impls.get(interface)
        if found is not None:
            return found
        served = [a for a in self.actors or () if issubclass(a, interface)]
        candidates = served or implementations_of(interface)
        # the same class defined again (a reloaded module) replaces the old one
        candidates = list({(c.__module__, c.__qualname__): c for c in candidates}.values())
        if not candidates:
            raise ActorNotFoundError(
                f"no implementation of {interface.__name__} is known to this host: define a "
                f"class that subclasses {interface.__name__} and ActorBase, and import it"
            )
        if len(candidates) > 1:
            names = ", ".join(sorted(c.__qualname__ for c in candidates))
            raise ActorNotFoundError(
                f"{interface.__name__} has several implementations ({names}); pass the one "
                "this host serves in actors=[...]"
            )
        self.impls[interface] = candidates[0]
        return candidates[0]

    def target_of(self, req: Request) -> tuple[type[ActorBase], MethodSpec]:
        """Implementation and method named by a wire request (only interface methods
        are callable). Cached per (interface, actor type, method)."""
        target = (req.interface, req.actor_type, req.method)
        found = self._targets.get(target)
        if found is not None:
            return found
        for iface in self._interfaces():
            if iface.__name__ == req.interface:
                impl = self.impl_for(iface)
                spec = iface.__koala_methods__.get(req.method)
                if impl.actor_type != req.actor_type or spec is None:
                    continue
                if len(self._targets) < MAX_TARGETS:
                    self._targets[target] = (impl, spec)
                return impl, spec
        raise ActorNotFoundError(
            f"this host serves no {req.interface}.{req.method} for actor type {req.actor_type}"
        )

    def _interfaces(self) -> list[type[ActorInterface]]:
        if self.actors is not None:
            return [iface for impl in self.actors for iface in interfaces_of(impl)]
        return implemented_interfaces()
