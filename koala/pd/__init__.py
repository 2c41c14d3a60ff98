"""The placement driver (PD): membership, placement and ids for a Koala cluster.

Hosts use the client side: :class:`PDClient` (the HTTP API) and
:class:`ClusterDirectory` (registration, lease renewal, self-fencing, and the
runtime's directory of actor positions). The server side (``koala.pd.server``) keeps
its state in a store (``koala.pd.server.EtcdStore`` or ``MemoryStore``). Hosts never
import the server, and neither does this package: ``import koala.pd`` (and
``koala.gateway``) loads no server code.
"""

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

__all__ = [
    "ActorPosition",
    "ClusterDirectory",
    "DirectoryStatistics",
    "LeaseExpiredError",
    "Member",
    "MemberConfig",
    "Membership",
    "PDClient",
    "PDRequestError",
    "PDUnavailableError",
    "PlacementRemote",
]
