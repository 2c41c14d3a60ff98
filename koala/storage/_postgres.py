"""``postgresql://...``: a real server, for clusters.

Driver: psycopg 3, its blocking API, run in the Storage's worker threads (psycopg's
async API needs asyncio; threads work the same under asyncio, uvloop and trio).
Connections are in autocommit mode: a single save or delete is one statement and one
round trip; a batch is one transaction whose rows are locked in key2 order, so two
batches on the same key1 cannot deadlock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg

from ._engine import NO_KEY2, WriteOp
from ._errors import StorageError, StorageUnavailableError, VersionConflictError
from ._pool import Pool

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA_LOCK = 0x6B6F616C61  # pg_advisory_xact_lock id: "koala"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS koala_records (
        store   TEXT   COLLATE "C" NOT NULL,
        key1    TEXT   COLLATE "C" NOT NULL,
        key2    TEXT   COLLATE "C" NOT NULL,
        version BIGINT NOT NULL,
        value   BYTEA  NOT NULL,
        PRIMARY KEY (store, key1, key2)
    )""",
    "CREATE SEQUENCE IF NOT EXISTS koala_record_version",
    "CREATE TABLE IF NOT EXISTS koala_meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    "INSERT INTO koala_meta (name, value) VALUES ('schema', 1) ON CONFLICT DO NOTHING",
)

SQL_LOAD = "SELECT version, value FROM koala_records WHERE store = %s AND key1 = %s AND key2 = %s"
SQL_LOAD_ALL = (
    "SELECT key2, version, value FROM koala_records WHERE store = %s AND key1 = %s ORDER BY key2"
)
SQL_INSERT = (
    "INSERT INTO koala_records (store, key1, key2, version, value) "
    "VALUES (%s, %s, %s, nextval('koala_record_version'), %s) "
    "ON CONFLICT DO NOTHING RETURNING version"
)
SQL_UPDATE = (
    "UPDATE koala_records SET version = nextval('koala_record_version'), value = %s "
    "WHERE store = %s AND key1 = %s AND key2 = %s AND version = %s RETURNING version"
)
SQL_DELETE = (
    "DELETE FROM koala_records WHERE store = %s AND key1 = %s AND key2 = %s AND version = %s"
)
SQL_VERSION = "SELECT version FROM koala_records WHERE store = %s AND key1 = %s AND key2 = %s"


class PostgresEngine:
    kind = "postgresql"
    inline = False

    def __init__(self, url: str, shown: str, *, connect_timeout: float, max_connections: int):
        self._url = url
        self._shown = shown  # the URL without its password, for messages
        self._connect_timeout = connect_timeout
        self._pool: Pool[psycopg.Connection[Any]] = Pool(self._connect, _close, max_connections)

    def _connect(self) -> psycopg.Connection[Any]:
        with self._errors():
            return psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=max(1, round(self._connect_timeout)),
                application_name="koala",
            )

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.OperationalError as exc:
            raise StorageUnavailableError(f"PostgreSQL at {self._shown}: {exc}") from exc
        except psycopg.Error as exc:
            raise StorageError(f"PostgreSQL at {self._shown}: {exc}") from exc

    @contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._errors(), self._pool.borrow(discard_on=(psycopg.OperationalError,)) as conn:
            yield conn

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run a read; retry once on a fresh connection if a pooled one went stale."""
        try:
            with self._conn() as conn:
                return fn(conn)
        except StorageUnavailableError:
            with self._conn() as conn:
                return fn(conn)

    def open(self) -> None:
        self._pool.reopen()
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for stmt in _SCHEMA:
                conn.execute(stmt)
            row = conn.execute("SELECT value FROM koala_meta WHERE name = 'schema'").fetchone()
        if row is not None and row[0] > SCHEMA_VERSION:
            raise StorageError(
                f"PostgreSQL at {self._shown} has storage schema {row[0]}, newer than this "
                f"Koala understands ({SCHEMA_VERSION}); upgrade Koala"
            )

    def close(self) -> None:
        self._pool.close()

    def connections(self) -> tuple[int, int]:
        return self._pool.stats()

    def load(self, store: str, key1: str, key2: str) -> tuple[int, bytes] | None:
        def run(conn: psycopg.Connection[Any]) -> tuple[int, bytes] | None:
            row = conn.execute(SQL_LOAD, (store, key1, key2), binary=True).fetchone()
            return None if row is None else (row[0], row[1])

        return self._read(run)

    def load_all(self, store: str, key1: str) -> list[tuple[str, int, bytes]]:
        def run(conn: psycopg.Connection[Any]) -> list[tuple[str, int, bytes]]:
            cur = conn.execute(SQL_LOAD_ALL, (store, key1), binary=True)
            return [(r[0], r[1], r[2]) for r in cur]

        return self._read(run)

    def write(self, store: str, key1: str, ops: Sequence[WriteOp]) -> list[int | None]:
        with self._conn() as conn:
            if len(ops) == 1:
                return [self._apply(conn, store, key1, ops[0])]
            out: list[int | None] = [None] * len(ops)
            with conn.transaction():
                for i in sorted(range(len(ops)), key=lambda i: ops[i].key2):
                    out[i] = self._apply(conn, store, key1, ops[i])
            return out

    def _apply(
        self, conn: psycopg.Connection[Any], store: str, key1: str, op: WriteOp
    ) -> int | None:
        if op.value is None:
            cur = conn.execute(SQL_DELETE, (store, key1, op.key2, op.expected))
            if cur.rowcount == 1:
                return None
        else:
            if op.expected is None:
                cur = conn.execute(SQL_INSERT, (store, key1, op.key2, op.value))
            else:
                cur = conn.execute(SQL_UPDATE, (op.value, store, key1, op.key2, op.expected))
            row = cur.fetchone()
            if row is not None:
                return int(row[0])
        found = conn.execute(SQL_VERSION, (store, key1, op.key2)).fetchone()
        key2 = None if op.key2 == NO_KEY2 else op.key2
        raise VersionConflictError(
            store, key1, key2, op.expected, None if found is None else found[0]
        )


def _close(conn: psycopg.Connection[Any]) -> None:
    conn.close()
