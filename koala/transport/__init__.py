"""Koala's transport between nodes: the wire protocol (``koala.wire``) over TCP with anyio.

``Transport`` keeps a node's connections (``Channel``) and listener. The protocol's
names (``Connection`` and the events) are re-exported from ``koala.wire``, which does
no I/O and imports no event loop. The bytes on the wire are in ``docs/protocol.md``.
"""

from ..wire import DEFAULT_MAX_FRAME_SIZE as DEFAULT_MAX_FRAME_SIZE
from ..wire import NEED_DATA as NEED_DATA
from ..wire import PROTOCOL_VERSION as PROTOCOL_VERSION
from ..wire import Auth as Auth
from ..wire import Cancel as Cancel
from ..wire import ClientClosed as ClientClosed
from ..wire import ClientMessage as ClientMessage
from ..wire import ClientOpened as ClientOpened
from ..wire import Close as Close
from ..wire import CloseClient as CloseClient
from ..wire import CloseCode as CloseCode
from ..wire import Connection as Connection
from ..wire import ConnectionClosed as ConnectionClosed
from ..wire import Event as Event
from ..wire import GoAway as GoAway
from ..wire import HandshakeComplete as HandshakeComplete
from ..wire import Hello as Hello
from ..wire import Kind as Kind
from ..wire import LocalProtocolError as LocalProtocolError
from ..wire import Ping as Ping
from ..wire import Pong as Pong
from ..wire import ProtocolError as ProtocolError
from ..wire import PushToClient as PushToClient
from ..wire import RemoteProtocolError as RemoteProtocolError
from ..wire import Request as Request
from ..wire import Response as Response
from ..wire import Role as Role
from ..wire import State as State
from ..wire import Welcome as Welcome
from ._channel import Channel as Channel
from ._config import TransportConfig as TransportConfig
from ._observe import TransportStatistics as TransportStatistics
from ._remote import Transport as Transport

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Auth",
    "Cancel",
    "Channel",
    "ClientClosed",
    "ClientMessage",
    "ClientOpened",
    "Close",
    "CloseClient",
    "CloseCode",
    "Connection",
    "ConnectionClosed",
    "Event",
    "GoAway",
    "HandshakeComplete",
    "Hello",
    "Kind",
    "LocalProtocolError",
    "Ping",
    "Pong",
    "ProtocolError",
    "PushToClient",
    "RemoteProtocolError",
    "Request",
    "Response",
    "Role",
    "State",
    "Transport",
    "TransportConfig",
    "TransportStatistics",
    "Welcome",
]
