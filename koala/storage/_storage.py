"""The typed API: Storage (a database), RecordStore (typed rows), Batch, Row."""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Generic, TypeVar

import anyio
import anyio.lowlevel
import cbor2
from opentelemetry.trace import SpanKind

from .. import _metrics, _tracing
from .._codec import codec_for
from .._errors import ArgumentTypeError, ConfigError
from ._engine import NO_KEY2, Engine, WriteOp
from ._errors import (
    InvalidKeyError,
    RecordSchemaError,
    RecordTooLargeError,
    StorageClosedError,
    VersionConflictError,
    describe_key,
)
from ._url import make_engine, redact

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_MAX_CONNECTIONS: Final = 8
"""Connections (and worker threads) one Storage uses at most."""
DEFAULT_MAX_RECORD_SIZE: Final = 16 * 1024 * 1024
"""Largest encoded record, in bytes."""
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
DEFAULT_BUSY_TIMEOUT: Final = 10.0
MAX_BATCH_OPS: Final = 1000
"""Most saves and deletes in one batch."""
MAX_KEY_LENGTH: Final = 512
"""Longest key1 or key2, in characters."""

_STORE_NAME = re.compile(r"[A-Za-z0-9_.:/-]{1,128}")

Key = str | int


@dataclass(frozen=True, slots=True)
class Row(Generic[T]):
    """One stored record: its keys, its version (pass it to the next save) and value."""

    key1: str
    key2: str | None
    version: int
    value: T


@dataclass(frozen=True, slots=True)
class StorageStatistics:
    backend: str
    max_connections: int
    open_connections: int
    idle_connections: int
    closed: bool


class Storage:
    """A database of record stores, chosen by URL. Use ``async with Storage(url) as s:``.

    Operations open it on first use, so a module-level ``Storage(...)`` works too (an
    actor app has no place to open it); ``async with`` opens it eagerly (bad
    credentials fail at start) and closes it. A closed Storage may be opened again,
    also under another event loop: it holds no loop-bound object between uses.

    Blocking drivers run in worker threads, at most ``max_connections`` at a time, each
    on its own connection.
    """

    def __init__(
        self,
        url: str,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        for name, value in (
            ("max_connections", max_connections),
            ("max_record_size", max_record_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"Storage {name} must be a positive integer, got {value!r}")
        if (
            isinstance(connect_timeout, bool)
            or not isinstance(connect_timeout, (int, float))
            or not math.isfinite(connect_timeout)
            or connect_timeout <= 0
        ):
            raise ConfigError(
                f"Storage connect_timeout must be a positive number, got {connect_timeout!r}"
            )
        self.url = redact(url)
        self.max_connections = max_connections
        self.max_record_size = max_record_size
        self._engine: Engine = make_engine(
            url,
            max_connections=max_connections,
            connect_timeout=float(connect_timeout),
            busy_timeout=DEFAULT_BUSY_TIMEOUT,
        )
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._state = "new"  # new -> open -> closed -> open ...
        self._limiter: tuple[object, anyio.CapacityLimiter] | None = None

    def __repr__(self) -> str:
        return f"Storage({self.url!r})"

    @property
    def backend(self) -> str:
        """``memory``, ``sqlite`` or ``postgresql``."""
        return self._engine.kind

    def store(self, name: str, record_type: type[T]) -> RecordStore[T]:
        """The rows named ``name``, typed ``record_type`` (a dataclass or pydantic model)."""
        return RecordStore(self, name, record_type)

    def statistics(self) -> StorageStatistics:
        open_, idle = self._engine.connections()
        return StorageStatistics(
            backend=self._engine.kind,
            max_connections=self.max_connections,
            open_connections=open_,
            idle_connections=idle,
            closed=self._state == "closed",
        )

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect and create the schema if needed. Opens a closed Storage again."""
        with self._lock:
            if self._state == "closed":
                self._state = "new"
        await self._run(_nothing)

    async def aclose(self) -> None:
        """Close every connection. Later operations raise StorageClosedError."""
        with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
        if self._engine.inline:
            self._engine.close()
        else:
            await anyio.to_thread.run_sync(self._engine.close, limiter=self._thread_limiter())

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------ running engine calls

    def _ensure_open(self) -> None:
        """Runs where the engine runs (a worker thread for blocking engines).

        Connecting may take seconds, so it happens under ``_open_lock``, which only
        worker threads wait on; ``_lock`` (also taken on the event loop) is held only
        for a moment.
        """
        if self._state == "open":
            return
        with self._open_lock:
            with self._lock:
                state = self._state
            if state == "new":
                self._engine.open()
                with self._lock:
                    if self._state == "new":
                        self._state = "open"
                    state = self._state
                if state == "closed":  # closed while we connected
                    self._engine.close()
            if state == "closed":
                raise StorageClosedError(
                    f"{self!r} was closed; open it again with `async with storage:` "
                    "or `await storage.open()`"
                )

    def _call(self, fn: Callable[..., R], *args: Any) -> R:
        self._ensure_open()
        return fn(*args)

    def _thread_limiter(self) -> anyio.CapacityLimiter:
        # A CapacityLimiter belongs to one event loop: keep one per loop, made on demand.
        token = anyio.lowlevel.current_token()
        pair = self._limiter
        if pair is None or pair[0] != token:
            pair = (token, anyio.CapacityLimiter(self.max_connections))
            self._limiter = pair
        return pair[1]

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        operation = _OPERATIONS.get(fn.__name__, fn.__name__)
        active = _tracing.tracer
        if active is None:
            return await self._timed(operation, fn, args)
        attributes = {"db.system": self._engine.kind, "db.operation": operation}
        if args:
            attributes["koala.store"] = str(args[0])
        with _tracing.span(active, f"storage {operation}", SpanKind.CLIENT, attributes):
            return await self._timed(operation, fn, args)

    async def _timed(self, operation: str, fn: Callable[..., R], args: tuple[Any, ...]) -> R:
        """Run ``fn`` where the engine runs, counted and timed for the metrics."""
        start = time.perf_counter()
        outcome = "cancelled"  # unless it ends otherwise
        try:
            if self._engine.inline:
                await anyio.lowlevel.checkpoint()
                result = self._call(fn, *args)
            else:
                result = await anyio.to_thread.run_sync(
                    self._call, fn, *args, limiter=self._thread_limiter()
                )
            outcome = "ok"
            return result
        except VersionConflictError:
            outcome = "conflict"  # the optimistic check did its job
            raise
        except Exception:
            outcome = "error"
            raise
        finally:
            kind = self._engine.kind
            _metrics.storage_operations.inc((kind, operation, outcome))
            _metrics.storage_seconds.observe((kind, operation), time.perf_counter() - start)


# the engine functions by the names the metrics give them
_OPERATIONS: Final = {"_nothing": "open", "load": "load", "load_all": "load_all", "write": "write"}


def _nothing() -> None:
    return None


def _check_key(value: Any, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ArgumentTypeError(f"{what} must be a str or an int, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text:
        raise InvalidKeyError(f"{what} must not be empty (for 'no key2', pass key2=None)")
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"{what} is {len(text)} characters; at most {MAX_KEY_LENGTH}")
    if "\x00" in text:
        raise InvalidKeyError(f"{what} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(f"{what} must be valid Unicode text (no lone surrogates)") from None
    return text


def _check_version(value: Any, *, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = " or None for a row that must not exist yet" if allow_none else ""
        raise InvalidKeyError(
            f"version must be the version you loaded (an int >= 1){hint}, got {value!r}"
        )
    return value


class RecordStore(Generic[T]):
    """Typed rows ``(key1, key2 or None) -> record`` in one Storage. See :meth:`Storage.store`.

    Keys are str or int; an int is stored as its decimal text, so 5 and "5" name the
    same row. Every row has a version; every write states the version it read (None:
    "the row must not exist") and fails with VersionConflictError if it is not current.
    """

    def __init__(self, storage: Storage, name: str, record_type: type[T]) -> None:
        if not isinstance(name, str) or not _STORE_NAME.fullmatch(name):
            raise InvalidKeyError(
                f"store name {name!r} must be 1-128 characters of letters, digits and _.:/-"
            )
        self.storage = storage
        self.name = name
        self.record_type = record_type
        self._codec = codec_for(record_type)

    def __repr__(self) -> str:
        return f"RecordStore({self.name!r}, {getattr(self.record_type, '__name__', '?')})"

    # ------------------------------------------------------------ encoding

    def _encode(self, value: T, key1: str, key2: str | None) -> bytes:
        where = f"value for {describe_key(self.name, key1, key2)}"
        data = cbor2.dumps(self._codec.to_wire(value, where))
        if len(data) > self.storage.max_record_size:
            raise RecordTooLargeError(
                f"{where} is {len(data)} bytes encoded, more than max_record_size "
                f"({self.storage.max_record_size}); split it into rows with key2, or raise "
                "Storage(max_record_size=...)"
            )
        return data

    def _decode(self, key1: str, key2: str, version: int, data: bytes) -> Row[T]:
        k2 = None if key2 == NO_KEY2 else key2
        where = describe_key(self.name, key1, k2)
        try:
            plain = cbor2.loads(data)
        except Exception as exc:
            raise RecordSchemaError(
                self.name, key1, k2, f"{where} is not valid CBOR ({exc})"
            ) from exc
        try:
            value = self._codec.from_wire(plain, where)
        except ArgumentTypeError as exc:
            raise RecordSchemaError(self.name, key1, k2, str(exc), *exc.path) from None
        return Row(key1, k2, version, value)

    # ------------------------------------------------------------ operations

    async def load(self, key1: Key, key2: Key | None = None) -> Row[T] | None:
        """The row, or None if there is none."""
        k1 = _check_key(key1, "key1")
        k2 = NO_KEY2 if key2 is None else _check_key(key2, "key2")
        found = await self.storage._run(self.storage._engine.load, self.name, k1, k2)
        return None if found is None else self._decode(k1, k2, found[0], found[1])

    async def load_all(self, key1: Key) -> list[Row[T]]:
        """Every row of key1 (the key2=None row first, then by key2)."""
        k1 = _check_key(key1, "key1")
        rows = await self.storage._run(self.storage._engine.load_all, self.name, k1)
        return [self._decode(k1, k2, version, data) for k2, version, data in rows]

    async def save(
        self, key1: Key, value: T, *, key2: Key | None = None, version: int | None
    ) -> int:
        """Write the row if its current version is ``version``; return the new version.

        ``version=None`` creates the row and fails if it exists.
        """
        batch = self.batch(key1).save(value, key2=key2, version=version)
        new = (await batch.commit())[0]
        assert new is not None
        return new

    async def delete(self, key1: Key, *, key2: Key | None = None, version: int) -> None:
        """Delete the row if its current version is ``version``."""
        await self.batch(key1).delete(key2=key2, version=version).commit()

    def batch(self, key1: Key) -> Batch[T]:
        """Saves and deletes of rows of one key1, applied together or not at all."""
        return Batch(self, _check_key(key1, "key1"))


class Batch(Generic[T]):
    """Collects writes to the rows of one key1; :meth:`commit` applies all or none.

    Each row appears at most once. If any write's version is stale, the commit raises
    VersionConflictError (naming that row) and changes nothing.
    """

    def __init__(self, store: RecordStore[T], key1: str) -> None:
        self._store = store
        self.key1 = key1
        self._ops: list[WriteOp] = []
        self._seen: set[str] = set()
        self._committed = False

    def __len__(self) -> int:
        return len(self._ops)

    def _add(self, key2: Key | None, value: bytes | None, expected: int | None) -> None:
        if self._committed:
            raise InvalidKeyError("this batch was already committed; start a new one")
        k2 = NO_KEY2 if key2 is None else _check_key(key2, "key2")
        if k2 in self._seen:
            row = describe_key(self._store.name, self.key1, None if k2 == NO_KEY2 else k2)
            raise InvalidKeyError(f"the batch already writes {row}; a row may appear once")
        if len(self._ops) >= MAX_BATCH_OPS:
            raise InvalidKeyError(f"a batch holds at most {MAX_BATCH_OPS} writes; commit it")
        self._seen.add(k2)
        self._ops.append(WriteOp(k2, value, expected))

    def save(self, value: T, *, key2: Key | None = None, version: int | None) -> Batch[T]:
        """Add a save (validated and encoded now: a bad value fails here)."""
        expected = _check_version(version, allow_none=True)
        k2 = None if key2 is None else _check_key(key2, "key2")
        self._add(key2, self._store._encode(value, self.key1, k2), expected)
        return self

    def delete(self, *, key2: Key | None = None, version: int) -> Batch[T]:
        """Add a delete of the row at ``version``."""
        self._add(key2, None, _check_version(version, allow_none=False))
        return self

    async def commit(self) -> list[int | None]:
        """Apply every write; return each save's new version (None for deletes), in order."""
        if self._committed:
            raise InvalidKeyError("this batch was already committed; start a new one")
        self._committed = True
        if not self._ops:
            return []
        store = self._store
        return await store.storage._run(
            store.storage._engine.write, store.name, self.key1, self._ops
        )
