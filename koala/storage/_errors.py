"""Storage errors. Each says whose fault it is and what to do next."""

from __future__ import annotations

from .._errors import KoalaError


def describe_key(store: str, key1: str, key2: str | None) -> str:
    """``players['p1']`` or ``players['p1', 'sword']``: how messages name a row."""
    if key2 is None:
        return f"{store}[{key1!r}]"
    return f"{store}[{key1!r}, {key2!r}]"


class StorageError(KoalaError):
    """Base class of the errors raised by :mod:`koala.storage`."""


class StorageClosedError(StorageError):
    """You closed this Storage and then used it. Open it again with ``async with storage:``."""


class StorageUnavailableError(StorageError):
    """The database could not be reached or failed (connection lost, disk error, locked).

    A write that fails this way may or may not have been applied: load the row again
    before retrying.
    """


class VersionConflictError(StorageError):
    """A write stated a version that is not the row's current version.

    Another writer changed (or created, or deleted) the row since you read it. Load it
    again, re-apply your change and save with the new version. ``expected`` is the
    version the write stated (None: "the row must not exist"); ``actual`` the version
    found (None: the row does not exist).
    """

    def __init__(
        self,
        store: str,
        key1: str,
        key2: str | None,
        expected: int | None,
        actual: int | None,
    ) -> None:
        # args are the constructor's, so the error rebuilds intact when it crosses
        # an actor call (the caller sees this type, with these attributes)
        super().__init__(store, key1, key2, expected, actual)
        self.store = store
        self.key1 = key1
        self.key2 = key2
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        row = describe_key(self.store, self.key1, self.key2)
        stated = "that the row is new" if self.expected is None else f"version {self.expected}"
        found = (
            "the row does not exist" if self.actual is None else f"it is at version {self.actual}"
        )
        return (
            f"version conflict on {row}: the write stated {stated} but {found} "
            "(another writer changed it since you read it); load the row again, "
            "re-apply your change and save with the version you loaded"
        )


class RecordSchemaError(StorageError):
    """A stored row does not fit its record type any more.

    The message names the row and the field (``path``). Give new fields a default,
    keep removed fields (or make them optional) until every row is rewritten, or
    migrate the rows.
    """

    def __init__(self, store: str, key1: str, key2: str | None, detail: str, *path: str) -> None:
        super().__init__(store, key1, key2, detail, *path)
        self.store = store
        self.key1 = key1
        self.key2 = key2
        self.detail = detail
        self.path = path

    def __str__(self) -> str:
        return (
            f"stored row {self.detail}; the row was written with another shape of the record "
            "type: give new fields a default, keep removed fields until every row is "
            "rewritten, or migrate the row"
        )


class InvalidKeyError(StorageError, ValueError):
    """A key (or store name, or version) is not acceptable; the message says why."""


class RecordTooLargeError(StorageError, ValueError):
    """An encoded record is larger than the Storage's ``max_record_size``."""
