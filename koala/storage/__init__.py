"""Actor storage: typed records keyed ``(key1, optional key2)``, versioned, on one URL.

``memory://`` (tests), ``sqlite:///path.db`` (embedded default), ``postgresql://...``
(clusters). See docs/storage.md.
"""

from ._errors import InvalidKeyError as InvalidKeyError
from ._errors import RecordSchemaError as RecordSchemaError
from ._errors import RecordTooLargeError as RecordTooLargeError
from ._errors import StorageClosedError as StorageClosedError
from ._errors import StorageError as StorageError
from ._errors import StorageUnavailableError as StorageUnavailableError
from ._errors import VersionConflictError as VersionConflictError
from ._state import PersistentState as PersistentState
from ._state import StateHandle as StateHandle
from ._storage import DEFAULT_MAX_CONNECTIONS as DEFAULT_MAX_CONNECTIONS
from ._storage import DEFAULT_MAX_RECORD_SIZE as DEFAULT_MAX_RECORD_SIZE
from ._storage import MAX_BATCH_OPS as MAX_BATCH_OPS
from ._storage import MAX_KEY_LENGTH as MAX_KEY_LENGTH
from ._storage import Batch as Batch
from ._storage import RecordStore as RecordStore
from ._storage import Row as Row
from ._storage import Storage as Storage
from ._storage import StorageStatistics as StorageStatistics

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_RECORD_SIZE",
    "MAX_BATCH_OPS",
    "MAX_KEY_LENGTH",
    "Batch",
    "InvalidKeyError",
    "PersistentState",
    "RecordSchemaError",
    "RecordStore",
    "RecordTooLargeError",
    "Row",
    "StateHandle",
    "Storage",
    "StorageClosedError",
    "StorageError",
    "StorageStatistics",
    "StorageUnavailableError",
    "VersionConflictError",
]
