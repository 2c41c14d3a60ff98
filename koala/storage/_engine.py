"""The seam between the typed API and a database: a synchronous, thread-safe engine.

Engines see bytes and text keys only; typing, CBOR and the event loop live above them.
The :class:`Storage` calls an engine in a worker thread (``anyio.to_thread``) unless
the engine is ``inline`` (the memory engine, which never blocks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

NO_KEY2 = ""
"""How "no key2" is stored: the empty string (so key2 can be in the primary key)."""


@dataclass(frozen=True, slots=True)
class WriteOp:
    """One write of a batch: a save (``value`` set) or a delete (``value`` None).

    ``expected`` is the version the writer read; None means "the row must not exist".
    """

    key2: str
    value: bytes | None
    expected: int | None


class Engine(Protocol):
    """A database behind a Storage. Every method may be called from any thread."""

    kind: str
    inline: bool

    def open(self) -> None:
        """Connect and create the schema if needed (idempotent)."""

    def close(self) -> None:
        """Close every connection; in-use ones close when released."""

    def load(self, store: str, key1: str, key2: str) -> tuple[int, bytes] | None:
        """The version and bytes of one row, or None."""

    def load_all(self, store: str, key1: str) -> list[tuple[str, int, bytes]]:
        """Every row of key1 as (key2, version, bytes), ordered by key2."""

    def write(self, store: str, key1: str, ops: Sequence[WriteOp]) -> list[int | None]:
        """Apply the ops atomically; return each save's new version (None for deletes).

        Raises VersionConflictError (and changes nothing) if any op's ``expected``
        is not the row's current version.
        """

    def connections(self) -> tuple[int, int]:
        """(open, idle) connections."""
