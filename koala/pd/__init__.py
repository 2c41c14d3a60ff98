"""The placement driver (PD): membership, placement and ids for a Koala cluster.

Hosts use the client side: :class:`PDClient` (the HTTP API) and
:class:`ClusterDirectory` (registration, lease renewal, self-fencing, and the
runtime's directory of actor positions). The server side (``koala.pd.server``) keeps
its state in a :class:`Store`: :class:`EtcdStore` or :class:`MemoryStore`. Hosts never
import the server: the store names are re-exported here, but only loaded when one of
them is asked for, so ``import koala.pd`` (and ``koala.gateway``) loads no server code.
"""

from typing import TYPE_CHECKING, Any

from .._errors import LeaseExpiredError as LeaseExpiredError
from .._errors import PDRequestError as PDRequestError
from .._errors import PDUnavailableError as PDUnavailableError
from ._directory import ClusterDirectory as ClusterDirectory
from ._directory import DirectoryStatistics as DirectoryStatistics
from ._http import PDClient as PDClient
from ._membership import MemberConfig as MemberConfig
from ._records import ActorPosition as ActorPosition
from ._records import Member as Member
from ._records import Membership as Membership
from ._remote import PlacementRemote as PlacementRemote

if TYPE_CHECKING:
    from .server import EtcdStore as EtcdStore
    from .server import KeyValue as KeyValue
    from .server import LeaseNotFoundError as LeaseNotFoundError
    from .server import MemoryStore as MemoryStore
    from .server import Store as Store
    from .server import StoreError as StoreError
    from .server import StoreFullError as StoreFullError
    from .server import StoreStatus as StoreStatus
    from .server import StoreUnavailableError as StoreUnavailableError

_SERVER_NAMES = frozenset(
    {
        "EtcdStore",
        "KeyValue",
        "LeaseNotFoundError",
        "MemoryStore",
        "Store",
        "StoreError",
        "StoreFullError",
        "StoreStatus",
        "StoreUnavailableError",
    }
)


def __getattr__(name: str) -> Any:
    """The store names, from ``koala.pd.server``, imported on first use."""
    if name in _SERVER_NAMES:
        from . import server

        value = getattr(server, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
