"""The placement driver (PD): membership, placement and ids for a Koala cluster.

The store (:class:`Store`, with :class:`EtcdStore` and :class:`MemoryStore`) is what
the PD server keeps its state in. Hosts never import the server: they talk to it over
HTTP through the client.
"""

from ._etcd import EtcdStore as EtcdStore
from ._store import KeyValue as KeyValue
from ._store import LeaseNotFoundError as LeaseNotFoundError
from ._store import MemoryStore as MemoryStore
from ._store import Store as Store
from ._store import StoreError as StoreError
from ._store import StoreUnavailableError as StoreUnavailableError

__all__ = [
    "EtcdStore",
    "KeyValue",
    "LeaseNotFoundError",
    "MemoryStore",
    "Store",
    "StoreError",
    "StoreUnavailableError",
]
