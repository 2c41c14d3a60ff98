"""``memory://``: rows in a dict, for tests. The same semantics as the databases."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from ._engine import NO_KEY2, WriteOp
from ._errors import VersionConflictError


class MemoryEngine:
    """Rows live in this process and die with the Storage. Never blocks: runs inline."""

    kind = "memory"
    inline = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: dict[tuple[str, str], dict[str, tuple[int, bytes]]] = {}
        self._version = 0

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def connections(self) -> tuple[int, int]:
        return 0, 0

    def load(self, store: str, key1: str, key2: str) -> tuple[int, bytes] | None:
        with self._lock:
            return self._rows.get((store, key1), {}).get(key2)

    def load_all(self, store: str, key1: str) -> list[tuple[str, int, bytes]]:
        with self._lock:
            rows = self._rows.get((store, key1), {})
            return [(k2, v, b) for k2, (v, b) in sorted(rows.items())]

    def write(self, store: str, key1: str, ops: Sequence[WriteOp]) -> list[int | None]:
        with self._lock:
            rows = self._rows.get((store, key1), {})
            for op in ops:  # check everything first: a failing batch changes nothing
                found = rows.get(op.key2)
                actual = None if found is None else found[0]
                if actual != op.expected:
                    key2 = None if op.key2 == NO_KEY2 else op.key2
                    raise VersionConflictError(store, key1, key2, op.expected, actual)
            self._version += 1
            version = self._version
            rows = self._rows.setdefault((store, key1), rows)
            out: list[int | None] = []
            for op in ops:
                if op.value is None:
                    del rows[op.key2]
                    out.append(None)
                else:
                    rows[op.key2] = (version, op.value)
                    out.append(version)
            if not rows:
                del self._rows[(store, key1)]
            return out
