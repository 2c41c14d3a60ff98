"""The WebSocket gateway: first-packet auth, then client frames to actors and back.

Actors serve clients by mixing in :class:`ClientHandler`; the gateway (in-process with
``koala dev --gateway``, or ``koala gateway`` in a cluster) authenticates each client's
first packet and binds it to an actor. See ``docs/gateway.md``.
"""

from ._auth import AuthError as AuthError
from ._auth import FirstPacket as FirstPacket
from ._auth import check_first_packet as check_first_packet
from ._auth import checksum as checksum
from ._auth import sign as sign
from ._auth import signing_text as signing_text
from ._bridge import HostBridge as HostBridge
from ._cluster import ClusterLink as ClusterLink
from ._cluster import ClusterLinkStatistics as ClusterLinkStatistics
from ._codes import ClientCloseCode as ClientCloseCode
from ._config import GatewayConfig as GatewayConfig
from ._gateway import Gateway as Gateway
from ._gateway import GatewayStatistics as GatewayStatistics
from ._gateway import LocalLink as LocalLink
from ._session import ActorRef as ActorRef
from ._session import ClientHandler as ClientHandler
from ._session import ClientSession as ClientSession
from ._session import IAccount as IAccount
from ._session import SessionClosedError as SessionClosedError

__all__ = [
    "ActorRef",
    "AuthError",
    "ClientCloseCode",
    "ClientHandler",
    "ClientSession",
    "ClusterLink",
    "ClusterLinkStatistics",
    "FirstPacket",
    "Gateway",
    "GatewayConfig",
    "GatewayStatistics",
    "HostBridge",
    "IAccount",
    "LocalLink",
    "SessionClosedError",
    "check_first_packet",
    "checksum",
    "sign",
    "signing_text",
]
