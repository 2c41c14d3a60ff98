"""PersistentState: an actor's state kept in a RecordStore, in the spirit of Orleans.

::

    class PlayerImpl(IPlayer, ActorBase):
        state = PersistentState(PlayerState, storage=STORAGE, default=PlayerState)

        async def on_activate(self) -> None:
            await self.state.load()

        async def add_gold(self, amount: int) -> int:
            self.state.value.gold += amount
            await self.state.save()
            return self.state.value.gold

The row is ``(actor key, key2)`` in the store named ``store`` (default: the actor
type). Storage stays optional: actors that declare no PersistentState use none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from ._errors import StorageError, VersionConflictError
from ._storage import RecordStore, Storage, _check_key

if TYPE_CHECKING:
    from .._actor import ActorBase  # annotations only: storage sits below the actors

T = TypeVar("T")


class PersistentState(Generic[T]):
    """Declare on an actor class; ``self.<name>`` is then this actor's :class:`StateHandle`.

    ``storage`` is a Storage or a function returning one (looked up at first use).
    ``default()`` makes the value of an actor that has no row yet.
    """

    def __init__(
        self,
        record_type: type[T],
        *,
        storage: Storage | Callable[[], Storage],
        default: Callable[[], T],
        store: str | None = None,
        key2: str | None = None,
    ) -> None:
        if not callable(default):
            raise TypeError("PersistentState(default=...) must be a function making a value")
        if key2 is not None:
            _check_key(key2, "key2")
        self.record_type = record_type
        self.storage = storage
        self.default = default
        self.store_name = store
        self.key2 = key2
        self._attr = "state"

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._attr = name

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> PersistentState[T]: ...
    @overload
    def __get__(self, instance: ActorBase, owner: type[Any]) -> StateHandle[T]: ...
    def __get__(
        self, instance: ActorBase | None, owner: type[Any]
    ) -> PersistentState[T] | StateHandle[T]:
        if instance is None:
            return self
        slot = f"_koala_state_{self._attr}"
        handle: StateHandle[T] | None = instance.__dict__.get(slot)
        if handle is None:
            handle = StateHandle(self, instance)
            instance.__dict__[slot] = handle
        return handle

    def record_store(self, actor_type: str) -> RecordStore[T]:
        storage = self.storage if isinstance(self.storage, Storage) else self.storage()
        return storage.store(self.store_name or actor_type, self.record_type)


class StateHandle(Generic[T]):
    """One actor's state: ``value``, ``version``, ``load()``, ``save()``, ``clear()``.

    A save that meets a newer version (another activation of this actor wrote since
    this one loaded: it is stale) raises VersionConflictError and asks the runtime to
    deactivate this activation, so the next call activates it afresh and loads the
    newest state.
    """

    def __init__(self, spec: PersistentState[T], actor: ActorBase) -> None:
        self._spec = spec
        self._actor = actor
        self._value: T | None = None
        self._loaded = False
        self.version: int | None = None
        """The version loaded or last saved; None if the row does not exist."""

    def _store(self) -> RecordStore[T]:
        return self._spec.record_store(type(self._actor).actor_type)

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def exists(self) -> bool:
        """Whether the row exists in storage (as of the last load or save)."""
        return self.version is not None

    @property
    def value(self) -> T:
        if not self._loaded:
            raise StorageError(
                f"{type(self._actor).__name__}.{self._spec._attr} is not loaded yet: "
                f"call `await self.{self._spec._attr}.load()` in on_activate"
            )
        return self._value  # type: ignore[return-value]

    @value.setter
    def value(self, new: T) -> None:
        self._value = new
        self._loaded = True

    async def load(self) -> T:
        """Read the row (or make the default value if there is none) and return it."""
        row = await self._store().load(self._actor.key, self._spec.key2)
        if row is None:
            self._value, self.version = self._spec.default(), None
        else:
            self._value, self.version = row.value, row.version
        self._loaded = True
        return self._value

    async def save(self) -> int:
        """Write ``value`` over the version loaded; return the new version."""
        value = self.value
        try:
            self.version = await self._store().save(
                self._actor.key, value, key2=self._spec.key2, version=self.version
            )
        except VersionConflictError:
            self._actor.deactivate_on_idle()
            raise
        return self.version

    async def clear(self) -> None:
        """Delete the row (if it exists) and reset ``value`` to the default."""
        if self.version is not None:
            try:
                await self._store().delete(
                    self._actor.key, key2=self._spec.key2, version=self.version
                )
            except VersionConflictError:
                self._actor.deactivate_on_idle()
                raise
        self._value, self.version, self._loaded = self._spec.default(), None, True
