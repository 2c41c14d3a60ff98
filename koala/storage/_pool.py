"""A small, bounded, thread-safe pool of blocking database connections."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from ._errors import StorageClosedError, StorageUnavailableError

C = TypeVar("C")

DEFAULT_ACQUIRE_TIMEOUT = 30.0
"""Seconds a worker thread waits for a free connection before giving up."""


class Pool(Generic[C]):
    """At most ``size`` connections, made on demand, reused last-in first-out.

    ``borrow(discard_on=...)`` hands a connection to one thread; an exception of a type
    in ``discard_on`` (a broken connection) closes it instead of returning it.
    """

    def __init__(
        self,
        connect: Callable[[], C],
        close: Callable[[C], None],
        size: int,
        acquire_timeout: float = DEFAULT_ACQUIRE_TIMEOUT,
    ) -> None:
        self._connect = connect
        self._close = close
        self.size = size
        self._acquire_timeout = acquire_timeout
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[C] = []
        self._open = 0
        self._closed = False

    def stats(self) -> tuple[int, int]:
        with self._lock:
            return self._open, len(self._idle)

    @contextmanager
    def borrow(self, discard_on: tuple[type[BaseException], ...] = ()) -> Iterator[C]:
        if not self._slots.acquire(timeout=self._acquire_timeout):
            raise StorageUnavailableError(
                f"all {self.size} database connections stayed busy for "
                f"{self._acquire_timeout:g} s; raise max_connections or find the stuck query"
            )
        try:
            conn = self._take()
            try:
                yield conn
            except discard_on:
                self._discard(conn)
                raise
            except BaseException:
                self._give_back(conn)
                raise
            else:
                self._give_back(conn)
        finally:
            self._slots.release()

    def _take(self) -> C:
        with self._lock:
            if self._closed:
                raise StorageClosedError(
                    "this Storage was closed; open it again with `async with storage:`"
                )
            if self._idle:
                return self._idle.pop()
            self._open += 1
        try:
            return self._connect()
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give_back(self, conn: C) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        self._discard(conn)

    def _discard(self, conn: C) -> None:
        with self._lock:
            self._open -= 1
        # closing a broken connection may fail again; it is gone anyway
        with contextlib.suppress(Exception):
            self._close(conn)

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)
