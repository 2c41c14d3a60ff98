"""Koala's wire protocol, sans-IO: frames, events and the connection's state machine.

Nothing here does I/O or imports an event loop (h11 style): :class:`Connection` takes
bytes in (``receive_data``) and gives events out (``next_event``), and turns events
into bytes (``send``). ``koala.transport`` runs it over TCP with anyio. The bytes on
the wire are described in ``docs/protocol.md``.
"""

from ._events import NEED_DATA as NEED_DATA
from ._events import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._events import Auth as Auth
from ._events import Cancel as Cancel
from ._events import ClientClosed as ClientClosed
from ._events import ClientMessage as ClientMessage
from ._events import ClientOpened as ClientOpened
from ._events import Close as Close
from ._events import CloseClient as CloseClient
from ._events import CloseCode as CloseCode
from ._events import ConnectionClosed as ConnectionClosed
from ._events import Event as Event
from ._events import GoAway as GoAway
from ._events import HandshakeComplete as HandshakeComplete
from ._events import Hello as Hello
from ._events import Kind as Kind
from ._events import LocalProtocolError as LocalProtocolError
from ._events import Ping as Ping
from ._events import Pong as Pong
from ._events import ProtocolError as ProtocolError
from ._events import PushToClient as PushToClient
from ._events import RemoteProtocolError as RemoteProtocolError
from ._events import Request as Request
from ._events import Response as Response
from ._events import Welcome as Welcome
from ._protocol import Connection as Connection
from ._protocol import Role as Role
from ._protocol import State as State
from ._wire import DEFAULT_MAX_FRAME_SIZE as DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Auth",
    "Cancel",
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
    "Welcome",
]
