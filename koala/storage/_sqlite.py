"""``sqlite:///path``: the embedded default. One file, WAL mode, no server.

The stdlib ``sqlite3`` driver is blocking; the Storage runs these methods in worker
threads. Readers run in parallel on their own connections (WAL lets them read while a
write commits); writers of this process take turns on a lock, so they never spin on
SQLite's busy handler against each other (other processes still wait up to
``busy_timeout``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from ._engine import NO_KEY2, WriteOp
from ._errors import StorageError, StorageUnavailableError, VersionConflictError
from ._pool import Pool

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS koala_records (
    store   TEXT    NOT NULL,
    key1    TEXT    NOT NULL,
    key2    TEXT    NOT NULL,
    version INTEGER NOT NULL,
    value   BLOB    NOT NULL,
    PRIMARY KEY (store, key1, key2)
);
CREATE TABLE IF NOT EXISTS koala_meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO koala_meta (name, value) VALUES ('schema', 1), ('version', 0);
"""

SQL_LOAD = "SELECT version, value FROM koala_records WHERE store = ? AND key1 = ? AND key2 = ?"
SQL_LOAD_ALL = (
    "SELECT key2, version, value FROM koala_records WHERE store = ? AND key1 = ? ORDER BY key2"
)
SQL_NEXT_VERSION = "UPDATE koala_meta SET value = value + 1 WHERE name = 'version' RETURNING value"
SQL_INSERT = (
    "INSERT INTO koala_records (store, key1, key2, version, value) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING"
)
SQL_UPDATE = (
    "UPDATE koala_records SET version = ?, value = ? "
    "WHERE store = ? AND key1 = ? AND key2 = ? AND version = ?"
)
SQL_DELETE = "DELETE FROM koala_records WHERE store = ? AND key1 = ? AND key2 = ? AND version = ?"
SQL_VERSION = "SELECT version FROM koala_records WHERE store = ? AND key1 = ? AND key2 = ?"

SYNCHRONOUS = ("full", "normal")


class SqliteEngine:
    kind = "sqlite"
    inline = False

    def __init__(
        self, path: str, *, synchronous: str, busy_timeout: float, max_connections: int
    ) -> None:
        self.path = path
        self._synchronous = synchronous.upper()
        self._busy_timeout = busy_timeout
        self._pool: Pool[sqlite3.Connection] = Pool(self._connect, _close, max_connections)
        self._write_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        with self._errors():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout,
                isolation_level=None,  # we say BEGIN and COMMIT ourselves
                check_same_thread=False,  # a connection moves between worker threads
            )
            try:
                conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            except BaseException:
                conn.close()
                raise
            return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise StorageUnavailableError(f"SQLite database {self.path!r}: {exc}") from exc
        except sqlite3.Error as exc:
            raise StorageError(f"SQLite database {self.path!r}: {exc}") from exc

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        with self._errors(), self._pool.borrow(discard_on=(sqlite3.Error,)) as conn:
            yield conn

    def open(self) -> None:
        self._pool.reopen()
        with self._conn() as conn, self._write_lock:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"SQLite database {self.path!r} refused WAL mode (journal_mode={mode}); "
                    "put it on a local file system"
                )
            conn.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                row = conn.execute("SELECT value FROM koala_meta WHERE name = 'schema'").fetchone()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if row[0] > SCHEMA_VERSION:
            raise StorageError(
                f"SQLite database {self.path!r} has storage schema {row[0]}, newer than this "
                f"Koala understands ({SCHEMA_VERSION}); upgrade Koala"
            )

    def close(self) -> None:
        self._pool.close()

    def connections(self) -> tuple[int, int]:
        return self._pool.stats()

    def load(self, store: str, key1: str, key2: str) -> tuple[int, bytes] | None:
        with self._conn() as conn:
            row = conn.execute(SQL_LOAD, (store, key1, key2)).fetchone()
        return None if row is None else (row[0], row[1])

    def load_all(self, store: str, key1: str) -> list[tuple[str, int, bytes]]:
        with self._conn() as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(SQL_LOAD_ALL, (store, key1))]

    def write(self, store: str, key1: str, ops: Sequence[WriteOp]) -> list[int | None]:
        with self._conn() as conn, self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = self._apply(conn, store, key1, ops)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

    def _apply(
        self, conn: sqlite3.Connection, store: str, key1: str, ops: Sequence[WriteOp]
    ) -> list[int | None]:
        version: int = conn.execute(SQL_NEXT_VERSION).fetchone()[0]
        out: list[int | None] = []
        for op in ops:
            if op.value is None:
                cur = conn.execute(SQL_DELETE, (store, key1, op.key2, op.expected))
            elif op.expected is None:
                cur = conn.execute(SQL_INSERT, (store, key1, op.key2, version, op.value))
            else:
                cur = conn.execute(
                    SQL_UPDATE, (version, op.value, store, key1, op.key2, op.expected)
                )
            if cur.rowcount != 1:
                found = conn.execute(SQL_VERSION, (store, key1, op.key2)).fetchone()
                key2 = None if op.key2 == NO_KEY2 else op.key2
                actual = None if found is None else found[0]
                raise VersionConflictError(store, key1, key2, op.expected, actual)
            out.append(None if op.value is None else version)
        return out


def _close(conn: sqlite3.Connection) -> None:
    conn.close()
