"""The placement driver (PD): membership, placement and ids for a Koala cluster.

Hosts use the client side: :class:`PDClient` (the HTTP API) and
:class:`ClusterDirectory` (registration, lease renewal, self-fencing, and the
runtime's directory of actor positions). The server side (``koala.pd.server``) keeps
its state in a :class:`Store`: :class:`EtcdStore` or :class:`MemoryStore`. Hosts never
import the server.
"""

from ._client import ActorPosition as ActorPosition
from ._client import ClusterDirectory as ClusterDirectory
from ._client import DirectoryStatistics as DirectoryStatistics
from ._client import LeaseExpiredError as LeaseExpiredError
from ._client import Member as Member
from ._client import MemberConfig as MemberConfig
from ._client import Membership as Membership
from ._client import PDClient as PDClient
from ._client import PDRequestError as PDRequestError
from ._client import PDUnavailableError as PDUnavailableError
from ._client import PlacementRemote as PlacementRemote
from ._etcd import EtcdStore as EtcdStore
from ._store import KeyValue as KeyValue
from ._store import LeaseNotFoundError as LeaseNotFoundError
from ._store import MemoryStore as MemoryStore
from ._store import Store as Store
from ._store import StoreError as StoreError
from ._store import StoreFullError as StoreFullError
from ._store import StoreStatus as StoreStatus
from ._store import StoreUnavailableError as StoreUnavailableError

__all__ = [
    "ActorPosition",
    "ClusterDirectory",
    "DirectoryStatistics",
    "EtcdStore",
    "KeyValue",
    "LeaseExpiredError",
    "LeaseNotFoundError",
    "Member",
    "MemberConfig",
    "Membership",
    "MemoryStore",
    "PDClient",
    "PDRequestError",
    "PDUnavailableError",
    "PlacementRemote",
    "Store",
    "StoreError",
    "StoreFullError",
    "StoreStatus",
    "StoreUnavailableError",
]
